"""Targets from instance labels and their inversion by post-processing: touching nuclei come back apart."""
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.measure import label

from nucleiseg.metrics import dsb_score
from nucleiseg.postprocess import (flood, flow_convergence, flow_markers, follow_flows, instances, peak_markers, remove_small,
                                   remove_unsure, star_polygons)
from nucleiseg.synthetic import nuclei_image
from nucleiseg.targets import (N_RAYS, RAY_SCALE, centre_flows, contact_map, contour_classes, encode, flip_rays, loss,
                               n_channels, normalised_distance, probabilities, ray_distances, small_nucleus_map,
                               transpose_rays)


def two_touching_discs():
    yy, xx = np.mgrid[0:40, 0:60]
    lab = np.zeros((40, 60), np.int32)
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 <= 100] = 1
    lab[((yy - 20) ** 2 + (xx - 39) ** 2 <= 100) & (lab == 0)] = 2
    return lab


def perfect_maps(labels, design):
    """Probability maps a perfect network would output for ``labels``."""
    t = encode(labels, design)
    if design in ("distance", "contact", "flow", "star"):
        fg = t[0]
        extra = {"distance": [], "contact": [t[2]], "flow": list(t[4:6]), "star": list(t[4:6]) + list(t[6:] * RAY_SCALE)}[design]
        return np.stack([1 - fg, fg, t[1]] + extra)
    classes = t[0].astype(int)
    return np.eye(n_channels(design), dtype=np.float32)[classes].transpose(2, 0, 1)


def test_contour_classes_mark_the_shared_border():
    lab = two_touching_discs()
    cls = contour_classes(lab)
    assert set(np.unique(cls)) == {0, 1, 2}
    # where the two discs touch, both sides are boundary: interior pixels of 1 and 2 never touch
    interior = np.where(cls == 1, lab, 0)
    from skimage.segmentation import find_boundaries
    assert not np.any(find_boundaries(interior, mode="inner") & (interior > 0) & (np.roll(interior, 1, 1) > 0)
                      & (np.roll(interior, 1, 1) != interior))


def test_distance_target_is_normalised_per_object():
    lab = two_touching_discs()
    d = normalised_distance(lab)
    assert d[lab == 0].max() == 0
    for k in (1, 2):
        assert d[lab == k].max() == pytest.approx(1.0)


@pytest.mark.parametrize("design", ["contour", "distance", "contact", "flow", "star"])
def test_perfect_maps_separate_touching_nuclei(design):
    lab = two_touching_discs()
    pred = instances(perfect_maps(lab, design), design, {"min_size": 5})
    assert pred.max() == 2
    assert dsb_score(lab, pred) > 0.85


def test_semantic_merges_touching_nuclei():
    lab = two_touching_discs()
    pred = instances(perfect_maps(lab, "semantic"), "semantic", {"min_size": 5})
    assert pred.max() == 1  # the baseline this project goes beyond


@pytest.mark.parametrize("design", ["contour", "distance", "contact", "flow", "star"])
def test_perfect_maps_on_synthetic_crowd(design):
    _, lab = nuclei_image((192, 192), n=40, seed=3, touching=0.5)
    pred = instances(perfect_maps(lab, design), design, {"min_size": 5})
    assert dsb_score(lab, pred) > 0.8


def two_peaks(saddle_depth_scale=1.0):
    """A blurred distance-like map of two overlapping nuclei: peaks 1.0 and 0.8, saddle about 0.5."""
    yy, xx = np.mgrid[0:40, 0:60].astype(np.float32)
    a = np.exp(-((yy - 20) ** 2 + (xx - 22) ** 2) / (2 * 7.0 ** 2))
    b = 0.8 * np.exp(-((yy - 20) ** 2 + (xx - 38) ** 2) / (2 * 7.0 ** 2))
    return np.maximum(a, b)


def _peak_markers_region_by_region(seed_map, region, h, floor):
    """The definition peak_markers implements, one region at a time: local maxima on the region's box (the rest
    at 0), h-maxima where there are several; markers numbered by region, then in raster order."""
    from skimage.morphology import h_maxima
    regions = label(region, connectivity=1)
    markers, n = np.zeros(region.shape, np.int32), 0
    for i, sl in enumerate(ndi.find_objects(regions), start=1):
        inside = regions[sl] == i
        crop = np.where(inside, seed_map[sl], 0).astype(np.float32)
        found, k = ndi.label((crop == ndi.maximum_filter(crop, size=3)) & inside & (crop > floor), structure=np.ones((3, 3)))
        if k > 1:
            found, k = ndi.label(h_maxima(crop, h) & inside & (crop > floor), structure=np.ones((3, 3)))
        markers[sl][found > 0] = found[found > 0] + n
        n += k
    return markers


@pytest.mark.parametrize("h", [0.2, 0.5])
def test_peak_markers_match_their_region_by_region_definition(h):
    # many touching nuclei (regions with several peaks, some diagonal contacts between regions), noisy seeds
    _, lab = nuclei_image((192, 192), n=60, touching=0.6, seed=3)
    rng = np.random.default_rng(0)
    seed_map = ndi.gaussian_filter(normalised_distance(lab) + rng.normal(0, 0.08, lab.shape).astype(np.float32), 1.0)
    seed_map = np.clip(seed_map, 0, 1).astype(np.float32)
    region = lab > 0
    expected = _peak_markers_region_by_region(seed_map, region, h, 0.3)
    assert expected.max() > label(region).max()  # some regions are split: the test covers the h-maxima path
    np.testing.assert_array_equal(peak_markers(seed_map, region, h, 0.3), expected)


def test_flood_is_the_watershed_of_the_parts_with_several_markers():
    from skimage.segmentation import watershed
    _, lab = nuclei_image((160, 160), n=45, touching=0.6, seed=4)
    mask = lab > 0
    surface = ndi.gaussian_filter(normalised_distance(lab), 1.0)
    markers = label(surface > 0.6)  # several markers in some parts, one in others
    parts = label(mask)
    markers[parts == 3] = 0  # none in one part
    shared = markers.max() + 1  # one marker label in two parts, as flow markers can be
    for k in (1, 2):
        markers[tuple(np.argwhere(parts == k)[0])] = shared
    counts = [len(np.unique(markers[(parts == k) & (markers > 0)])) for k in range(1, parts.max() + 1)]
    assert {0, 1} < set(counts) and max(counts) > 1
    np.testing.assert_array_equal(flood(surface, markers, mask), watershed(-surface, markers, mask=mask))


def test_peak_markers_keep_peaks_above_their_saddle_by_h():
    seed = two_peaks()
    saddle = seed[20, 22:39].min()
    assert 0.45 < saddle < 0.55
    region = seed > 0.1
    assert peak_markers(seed, region, h=0.1).max() == 2  # the lower peak rises 0.8 - saddle > 0.1
    assert peak_markers(seed, region, h=0.4).max() == 1  # ... but not 0.4: one nucleus
    assert peak_markers(seed, region, h=0.1, floor=0.9).max() == 1  # peaks at or below the floor seed nothing
    # two separate regions with one peak each get one marker each, whatever h
    assert peak_markers(np.hstack([seed[:, :30], seed[:, :30]]), np.hstack([region[:, :30]] * 2), h=0.5).max() == 2


def test_peak_h_splits_nuclei_joined_by_a_high_saddle():
    seed = two_peaks()
    maps = np.stack([np.where(seed > 0.1, 0.0, 1.0), np.where(seed > 0.1, 1.0, 0.0), seed]).astype(np.float32)
    # the saddle (about 0.5) is above the marker threshold: one region, one nucleus without peak_h
    assert instances(maps, "distance", {"mask": 0.5, "marker": 0.4, "min_size": 0}).max() == 1
    assert instances(maps, "distance", {"mask": 0.5, "marker": 0.4, "min_size": 0, "peak_h": 0.1}).max() == 2


def test_remove_small_and_relabel():
    lab = np.zeros((10, 10), np.int32)
    lab[0:2, 0:2] = 5
    lab[5:10, 5:10] = 9
    out = remove_small(lab, 10)
    assert set(np.unique(out)) == {0, 1}
    assert (out == 1).sum() == 25


@pytest.mark.parametrize("design", ["semantic", "distance"])
def test_object_prob_drops_faint_objects_and_keeps_confident_ones(design):
    """Two nuclei of the same shape, one the network is sure of (probability 0.95) and one it barely
    sees (0.6): a 0.75 object threshold keeps only the first; 0 keeps both."""
    lab = np.zeros((40, 80), np.int32)
    yy, xx = np.mgrid[0:40, 0:80]
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 <= 64] = 1
    lab[(yy - 20) ** 2 + (xx - 60) ** 2 <= 64] = 2
    maps = perfect_maps(lab, "distance")
    fg = np.where(lab == 1, 0.95, np.where(lab == 2, 0.6, 0.02)).astype(np.float32)
    maps[0], maps[1] = 1 - fg, fg
    if design == "semantic":
        maps = maps[:2]
    kept = instances(maps, design, {"min_size": 5, "object_prob": 0.75})
    assert kept.max() == 1 and kept[20, 20] == 1 and kept[20, 60] == 0
    assert instances(maps, design, {"min_size": 5, "object_prob": 0.0}).max() == 2
    assert np.array_equal(remove_unsure(lab, fg, 0.5), lab)  # both above 0.5: nothing dropped


def test_object_prob_with_unused_label_numbers_warns_not():
    """The watershed can leave label numbers unused: they are neither dropped nor divided by zero."""
    lab = np.zeros((20, 20), np.int32)
    lab[2:8, 2:8], lab[12:18, 12:18] = 1, 4  # numbers 2 and 3 unused
    fg = np.where(lab == 1, 0.9, np.where(lab == 4, 0.3, 0.0)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = remove_unsure(lab, fg, 0.5)
    assert set(np.unique(kept)) == {0, 1}


def test_holes_inside_one_nucleus_are_filled_but_not_between_nuclei():
    maps = np.zeros((3, 30, 30), np.float32)
    maps[0] = 1
    yy, xx = np.mgrid[0:30, 0:30]
    ring = ((yy - 15) ** 2 + (xx - 15) ** 2 <= 64) & ((yy - 15) ** 2 + (xx - 15) ** 2 > 4)
    maps[0][ring], maps[1][ring] = 0, 1
    pred = instances(maps, "contour", {"min_size": 5})
    assert pred.max() == 1
    assert pred[15, 15] == 1  # the hole is filled


@pytest.mark.parametrize("design", ["semantic", "contour", "distance", "contact", "flow", "star"])
def test_loss_decreases_towards_targets(design):
    lab = two_touching_discs()
    target = torch.from_numpy(encode(lab, design))[None]
    logits = torch.zeros(1, n_channels(design), *lab.shape, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    first = None
    for _ in range(30):
        value = loss(logits, target, design, dice_weight=0.5)
        first = first if first is not None else value.item()
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < 0.5 * first
    maps = probabilities(logits.detach(), design)[0].numpy()
    assert dsb_score(lab, instances(maps, design, {"min_size": 5})) > 0.5 or design == "semantic"


def test_contact_map_marks_only_where_two_nuclei_meet():
    lab = two_touching_discs()
    contact = contact_map(lab)
    ys, xs = np.nonzero(contact)
    assert contact.any() and set(np.unique(contact)) == {0.0, 1.0}
    assert xs.min() >= 29 - 3 and xs.max() <= 30 + 3  # a band around the shared edge (columns 29 | 30)
    alone = lab.copy()
    alone[alone == 2] = 0
    assert not contact_map(alone).any()  # a single nucleus touches nobody


def test_contact_weight_counts_errors_where_nuclei_meet_more():
    lab = two_touching_discs()
    target = torch.from_numpy(encode(lab, "distance"))[None]
    contact = target[0, 2] > 0
    # logits that are right everywhere (margin 6) except on the contact band, where they are wrong
    sign = torch.where(target[0, 0] > 0, 1.0, -1.0)
    sign[contact] *= -1
    logits = torch.stack([-3 * sign, 3 * sign, 6 * (2 * target[0, 1] - 1)])[None]
    plain = loss(logits, target, "distance").item()
    weighted = loss(logits, target, "distance", contact_weight=5.0).item()
    assert weighted > 3 * plain
    # with the errors away from the contacts instead, the weight hardly matters
    sign = torch.where(target[0, 0] > 0, 1.0, -1.0)
    sign[~contact & (torch.arange(60)[None, :] < 10)] *= -1
    logits = torch.stack([-3 * sign, 3 * sign, 6 * (2 * target[0, 1] - 1)])[None]
    assert loss(logits, target, "distance", contact_weight=5.0).item() == pytest.approx(
        loss(logits, target, "distance").item(), rel=0.1)


def test_small_nucleus_map_grades_nuclei_by_area_with_a_ring():
    yy, xx = np.mgrid[0:40, 0:80]
    lab = np.zeros((40, 80), np.int32)
    lab[(yy - 20) ** 2 + (xx - 10) ** 2 <= 9] = 1     # 29 px: fully small
    lab[(yy - 20) ** 2 + (xx - 35) ** 2 <= 36] = 2    # 113 px: in between
    lab[(yy - 20) ** 2 + (xx - 62) ** 2 <= 144] = 3   # 441 px: big
    small = small_nucleus_map(lab)
    assert small[20, 10] == 1.0 and small[20, 62] == 0.0
    assert small[20, 35] == pytest.approx((160 - 113) / 120)
    assert small[20, 10 + 3 + 2] == 1.0 and small[20, 10 + 3 + 3] == 0.0  # a 2-pixel ring, no further
    assert not small[:, 22:25].any() and small[0, 0] == 0.0  # background away from small nuclei is unweighted


def test_remove_small_drops_label_discs_for_training():
    """`train --min-label-size 25` passes training labels through remove_small: a 21-px disc goes, 25 px stays."""
    yy, xx = np.mgrid[0:40, 0:80]
    lab = np.zeros((40, 80), np.uint16)
    lab[(yy - 20) ** 2 + (xx - 10) ** 2 <= 6] = 7     # 21 px: a DSB2018-style disc
    lab[(yy - 20) ** 2 + (xx - 30) ** 2 <= 8] = 3     # 25 px: kept at min_size 25
    lab[(yy - 20) ** 2 + (xx - 55) ** 2 <= 144] = 9   # touches nothing, big
    lab[20, 12] = 9                                   # a stray pixel of a big nucleus does not make it small
    areas = {int(v): int((lab == v).sum()) for v in np.unique(lab) if v}
    assert areas[7] < 25 <= areas[3]
    out = remove_small(lab, 25)
    assert not out[lab == 7].any() and out.max() == 2
    assert ((out == out[20, 30]) == (lab == 3)).all() and ((out == out[20, 55]) == (lab == 9)).all()
    assert ((remove_small(lab, 0) > 0) == (lab > 0)).all() and not remove_small(np.zeros_like(lab), 25).any()


def test_small_weight_counts_errors_on_small_nuclei_more():
    yy, xx = np.mgrid[0:40, 0:80]
    lab = np.zeros((40, 80), np.int32)
    lab[(yy - 20) ** 2 + (xx - 10) ** 2 <= 9] = 1
    lab[(yy - 20) ** 2 + (xx - 55) ** 2 <= 144] = 2
    target = torch.from_numpy(encode(lab, "distance"))[None]
    right = torch.where(target[0, 0] > 0, 1.0, -1.0)

    def logits_missing(label):  # right everywhere (margin 3) except that nucleus ``label`` is called background
        sign = right.clone()
        sign[torch.from_numpy(lab == label)] = -1
        return torch.stack([-3 * sign, 3 * sign, 6 * (2 * target[0, 1] - 1)])[None]

    plain, weighted = (loss(logits_missing(1), target, "distance", small_weight=w).item() for w in (0.0, 3.0))
    assert weighted > 2 * plain  # missing the small nucleus costs about 4 times as much
    big_plain, big_weighted = (loss(logits_missing(2), target, "distance", small_weight=w).item() for w in (0.0, 3.0))
    assert big_weighted == pytest.approx(big_plain, rel=0.15)  # the big one's ring-free pixels are unweighted



def test_distance_weight_scales_only_the_distance_term():
    lab = two_touching_discs()
    target = torch.from_numpy(encode(lab, "distance"))[None]
    fg = torch.where(target[0, 0] > 0, 2.0, -2.0)
    logits = torch.stack([-fg, fg, torch.zeros_like(fg)])[None]  # classes right, distance flat at 0.5
    class_only, one, three = (loss(logits, target, "distance", distance_weight=w).item() for w in (0.0, 1.0, 3.0))
    assert one > class_only > 0
    assert three - class_only == pytest.approx(3 * (one - class_only), rel=1e-5)

def merged_peak_maps(contact_probability: float) -> np.ndarray:
    """Contact-design maps of two touching discs whose distance map has one merged peak (a blurred
    distance, as a network gives for nuclei it cannot tell apart), with the contact channel at
    ``contact_probability`` on the band where the discs meet."""
    lab = two_touching_discs()
    fg = (lab > 0).astype(np.float32)
    yy, xx = np.mgrid[0:40, 0:60].astype(np.float32)
    seed = fg * np.exp(-((yy - 20) ** 2 + (xx - 29.5) ** 2) / (2 * 12.0 ** 2))  # one peak, on the contact
    contact = contact_map(lab) * contact_probability
    return np.stack([1 - fg, fg, seed, contact]).astype(np.float32)


def test_predicted_contacts_split_nuclei_that_share_one_distance_peak():
    lab = two_touching_discs()
    t = {"mask": 0.5, "marker": 0.3, "min_size": 5, "peak_h": 0.1, "contact": 0.5}
    maps = merged_peak_maps(contact_probability=0.9)
    assert instances(maps[:3], "distance", t).max() == 1  # the distance design alone merges them
    pred = instances(maps, "contact", t)
    assert pred.max() == 2 and dsb_score(lab, pred) > 0.7
    # a contact probability below the threshold cuts nothing; the watershed still fills the whole mask
    weak = instances(merged_peak_maps(contact_probability=0.3), "contact", t)
    assert weak.max() == 1 and (weak > 0).sum() == (lab > 0).sum()
    assert instances(maps, "contact", {**t, "peak_h": 0.0}).max() == 2  # also with plain thresholded seeds


def test_contact_loss_scores_the_contact_channel():
    lab = two_touching_discs()
    target = torch.from_numpy(encode(lab, "contact"))[None]
    right = torch.stack([-6 * (2 * target[0, 0] - 1), 6 * (2 * target[0, 0] - 1),
                         6 * (2 * target[0, 1] - 1), 6 * (2 * target[0, 2] - 1)])[None]
    wrong = right.clone()
    wrong[:, 3] = -wrong[:, 3]  # only the contact channel is wrong
    assert loss(wrong, target, "contact").item() > loss(right, target, "contact").item() + 3
    # the first three channels are scored exactly as the distance design scores them
    assert loss(right[:, :3], target, "distance").item() == pytest.approx(
        loss(right, target, "contact").item() - torch.nn.functional.binary_cross_entropy_with_logits(
            right[0, 3], target[0, 2]).item(), abs=1e-5)


def test_contact_pos_weight_counts_missed_contacts_more():
    lab = two_touching_discs()
    target = torch.from_numpy(encode(lab, "contact"))[None]
    logits = torch.stack([-6 * (2 * target[0, 0] - 1), 6 * (2 * target[0, 0] - 1),
                          6 * (2 * target[0, 1] - 1), torch.full_like(target[0, 2], -6.0)])[None]  # no contact anywhere
    missed = torch.nn.functional.softplus(torch.tensor(6.0)).item() * target[0, 2].mean().item()  # BCE of the misses
    plain, weighted = (loss(logits, target, "contact", contact_pos_weight=w).item() for w in (1.0, 20.0))
    assert weighted - plain == pytest.approx(19 * missed, rel=1e-3)


def test_centre_flows_are_unit_vectors_to_each_nucleus_centre():
    lab = two_touching_discs()  # centres (20, 20) and (20, 39)
    flows = centre_flows(lab)
    assert np.all(flows[:, lab == 0] == 0)
    norm = np.hypot(flows[0], flows[1])
    inside = (lab > 0) & (norm > 0)
    assert np.allclose(norm[inside], 1, atol=1e-5) and (lab > 0).sum() - inside.sum() == 2  # 0 only at the 2 centres
    assert np.allclose(flows[:, 20, 12], [0, 1]) and np.allclose(flows[:, 12, 20], [1, 0])  # left of / above centre 1
    assert lab[20, 30] == 1 and lab[20, 31] == 2  # either side of the contact, the flows point apart
    assert np.allclose(flows[:, 20, 30], [0, -1]) and flows[1, 20, 31] > 0.95


def test_following_flows_gathers_each_nucleus_at_its_centre():
    lab = two_touching_discs()
    start, end = follow_flows(centre_flows(lab), lab > 0)
    ends = {k: {tuple(e) for e in end.T[lab[start[0], start[1]] == k]} for k in (1, 2)}
    assert all(abs(y - 20) <= 1 and abs(x - 20) <= 1 for y, x in ends[1])
    assert all(abs(y - 20) <= 1 and abs(x - 39) <= 1 for y, x in ends[2])
    markers = flow_markers(centre_flows(lab), lab > 0, min_count=10)
    assert markers.max() == 2 and np.array_equal(markers > 0, lab > 0)


def merged_peak_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two small touching nuclei and their flow maps with a blurred (predicted-like) distance map that has
    one merged peak for both."""
    from scipy import ndimage as ndi

    lab = np.zeros((20, 30), np.int32)
    yy, xx = np.mgrid[0:20, 0:30]
    lab[(yy - 10) ** 2 + (xx - 11) ** 2 <= 16] = 1
    lab[((yy - 10) ** 2 + (xx - 18) ** 2 <= 16) & (lab == 0)] = 2
    maps = perfect_maps(lab, "flow")
    maps[2] = ndi.gaussian_filter((lab > 0).astype(np.float32), 3) * (lab > 0)
    return lab, maps


def test_flows_split_touching_nuclei_that_share_one_distance_peak():
    """The distance watershed sees one nucleus in the merged-peak pair, the flows still point to two centres."""
    lab, maps = merged_peak_pair()
    assert instances(maps[:3], "distance", {"min_size": 5}).max() == 1
    pred = instances(maps, "flow", {"min_size": 5, "flow_seed": 10})
    assert pred.max() == 2 and dsb_score(lab, pred) > 0.8


def test_flow_convergence_rises_at_centres_and_dips_where_nuclei_touch():
    lab = two_touching_discs()  # centres (20, 20) and (20, 39), touching between columns 30 and 31
    c = flow_convergence(centre_flows(lab))
    assert c[20, 20] > 0.3 and c[20, 39] > 0.3
    assert c[20, 30] < -0.3 and c[20, 31] < -0.3
    assert c[20, 25] > c[20, 30]  # halfway to the contact it is still above the contact's dip


def test_flow_convergence_splits_touching_nuclei_that_share_one_distance_peak():
    """Adding the flows' convergence to the merged-peak pair's distance map gives it two peaks, so the
    distance watershed (no flow paths followed) separates them; with weight 0 it does not."""
    lab, maps = merged_peak_pair()
    t = {"min_size": 5, "peak_h": 0.2, "flow_seed": 0}
    assert instances(maps, "flow", t).max() == 1
    pred = instances(maps, "flow", {**t, "flow_convergence": 1.0})
    assert pred.max() == 2 and dsb_score(lab, pred) > 0.8


def predicted_like_flow_maps(touching: float, flow_noise: float = 0.0):
    """Labels and flow maps of two synthetic images as a network might predict them: the distance map blurred
    and noisy, the flows noisy when ``flow_noise`` > 0."""
    rng = np.random.default_rng(5)
    labels, maps = [], []
    for seed in (11, 12):
        _, lab = nuclei_image((96, 96), n=14, seed=seed, touching=touching)
        m = perfect_maps(lab, "flow")
        m[2] = ndi.gaussian_filter(m[2], 1.5) + rng.normal(0, 0.05, m[2].shape).astype(np.float32)
        if flow_noise > 0:
            m[3:5] += rng.normal(0, flow_noise, m[3:5].shape).astype(np.float32)
        labels.append(lab)
        maps.append(m)
    return labels, maps


def test_tuning_in_worker_processes_chooses_what_one_process_chooses():
    """Thresholds of noisy, blurred (predicted-like) flow maps of synthetic nuclei tuned in 2 worker processes
    and in one: the same choice and score, and never worse than the start."""
    from nucleiseg.evaluate import _score, tune_thresholds

    labels, maps = predicted_like_flow_maps(touching=0.5)
    start = {"min_size": 5}
    serial = tune_thresholds(maps, labels, "flow", start=start, workers=1)
    parallel = tune_thresholds(maps, labels, "flow", start=start, workers=2)
    assert serial == parallel
    assert serial["tuned_dsb_score"] >= round(_score(maps, labels, "flow", start), 5)


def test_tuning_tries_both_ways_of_seeding_flow_maps():
    """Crowded synthetic nuclei with noisy flows and a good distance map: one coordinate search from the defaults
    ends with flow seeds; searching within each way of seeding finds the distance seeds' better score."""
    from nucleiseg.evaluate import _coordinate_search, tune_thresholds, tuning_grid
    from nucleiseg.postprocess import DEFAULT_THRESHOLDS

    labels, maps = predicted_like_flow_maps(touching=0.8, flow_noise=0.6)
    tuned = tune_thresholds(maps, labels, "flow", workers=1)
    one_search, one_score = _coordinate_search(maps, labels, "flow", dict(DEFAULT_THRESHOLDS), tuning_grid("flow"), 1)
    assert one_search["flow_seed"] > 0
    assert tuned["flow_seed"] == 0 and tuned["tuned_dsb_score"] > round(one_score, 5) + 0.01


def test_flow_loss_scores_the_flow_channels_on_nuclei_only():
    lab = two_touching_discs()
    target = torch.from_numpy(encode(lab, "flow"))[None]
    good = torch.zeros(1, 5, *lab.shape)
    good[:, 3:5] = torch.atanh(target[:, 4:6].clamp(-0.999, 0.999))
    reversed_ = good.clone()
    reversed_[:, 3:5] *= -1
    background_only = good.clone()
    background_only[:, 3:5][:, :, lab == 0] = 5.0  # background flows carry no loss
    assert loss(good, target, "flow") < loss(reversed_, target, "flow")
    assert torch.isclose(loss(background_only, target, "flow"), loss(good, target, "flow"))
    assert torch.isclose(loss(reversed_, target, "flow", flow_weight=0), loss(good, target, "flow", flow_weight=0))


def test_flow_seed_zero_seeds_from_the_distance_map():
    """With flow_seed 0 a flow model's maps are separated like a distance model's (its flows unused)."""
    _, lab = nuclei_image((128, 128), n=20, seed=4, touching=0.5)
    maps = perfect_maps(lab, "flow")
    maps[3:5] = np.random.default_rng(0).uniform(-1, 1, maps[3:5].shape)  # flows that would scramble the split
    t = {"min_size": 5, "peak_h": 0.2, "flow_seed": 0}
    assert np.array_equal(instances(maps, "flow", t), instances(maps[:3], "distance", t))
    assert not np.array_equal(instances(maps, "flow", {**t, "flow_seed": 3}), instances(maps[:3], "distance", t))


def test_ray_distances_reach_the_border_of_their_own_nucleus():
    lab = np.zeros((30, 40), np.int32)
    lab[5:16, 4:25] = 1  # an 11 x 21 rectangle
    lab[5:16, 25:32] = 2  # touching it on the right
    r = ray_distances(lab, n_rays=8)
    assert r.shape == (8, 30, 40) and np.all(r[:, lab == 0] == 0)
    # from (10, 10): right (ray 0) to column 24, down (ray 2) to row 15, left (4) to column 4, up (6) to row 5
    assert r[:, 10, 10][[0, 2, 4, 6]].tolist() == [14.5, 5.5, 6.5, 5.5]
    assert r[0, 10, 25] == 6.5 and r[4, 10, 25] == 0.5  # the neighbour's rays stop at the shared border
    assert r[0, 10, 31] == 0.5  # the image edge ends a ray like background


def test_flip_rays_matches_the_rays_of_the_flipped_labels():
    _, lab = nuclei_image((96, 96), n=12, seed=5, touching=0.5)
    rays = ray_distances(lab)
    for axis, name in ((0, "y"), (1, "x")):
        flipped = ray_distances(np.ascontiguousarray(np.flip(lab, axis)))
        assert np.array_equal(np.flip(flip_rays(flipped, name), axis + 1), rays)


def test_transpose_rays_matches_the_rays_of_the_transposed_labels():
    _, lab = nuclei_image((80, 112), n=12, seed=5, touching=0.5)
    rays = ray_distances(lab)
    transposed = ray_distances(np.ascontiguousarray(lab.T))
    assert np.allclose(transpose_rays(transposed).transpose(0, 2, 1), rays)
    assert not np.allclose(transposed.transpose(0, 2, 1), rays)  # unordered, the rays point elsewhere


def test_star_polygons_keep_one_polygon_per_nucleus_and_suppress_overlaps():
    lab = two_touching_discs()
    maps = perfect_maps(lab, "star")
    polys = star_polygons(maps[5:], maps[2], maps[2] > 0.3, nms=0.4)
    assert polys.max() == 2 and dsb_score(lab, polys) > 0.85
    # proposals of discs of radius 8: centres 10 px apart overlap with IoU about 0.15
    rays = np.zeros((N_RAYS, 40, 60), np.float32)
    rays[:, 20, 23] = 8.0
    rays[:, 20, 13] = 8.0
    rays[:, 20, 21] = 3.0  # inside the best disc: proposes nothing
    rays[:, 20, 50] = 5.0  # a disc elsewhere
    score = np.zeros((40, 60), np.float32)
    score[20, 23], score[20, 21], score[20, 13], score[20, 50] = 1.0, 0.95, 0.9, 0.5
    kept = star_polygons(rays, score, rays[0] > 0, nms=0.1)
    assert kept.max() == 2 and kept[20, 29] > 0 and kept[20, 8] == 0 and kept[20, 50] > 0
    kept = star_polygons(rays, score, rays[0] > 0, nms=0.4)
    assert kept.max() == 3 and kept[20, 8] > 0 and kept[20, 18] == kept[20, 23]  # the better disc wins the overlap


def test_star_nms_zero_post_processes_like_the_flow_design():
    _, lab = nuclei_image((128, 128), n=20, seed=4, touching=0.5)
    maps = perfect_maps(lab, "star")
    t = {"min_size": 5, "peak_h": 0.2}
    assert np.array_equal(instances(maps, "star", t), instances(maps[:5], "flow", t))
    star = instances(maps, "star", {**t, "star_nms": 0.4})
    assert not np.array_equal(star, instances(maps[:5], "flow", t)) and dsb_score(lab, star) > 0.8


def test_ray_loss_scores_ray_lengths_on_nuclei_only():
    lab = two_touching_discs()
    target = torch.from_numpy(encode(lab, "star"))[None]
    assert target.shape[1] == 6 + N_RAYS and n_channels("star") == 5 + N_RAYS
    good = torch.zeros(1, n_channels("star"), *lab.shape)
    good[:, 3:5] = torch.atanh(target[:, 4:6].clamp(-0.999, 0.999))
    good[:, 5:] = torch.log(torch.expm1(target[:, 6:].clamp(min=1e-3)))  # inverse softplus
    long_ = good.clone()
    long_[:, 5:] += 1.0
    background_only = good.clone()
    background_only[:, 5:][:, :, lab == 0] = 5.0
    assert loss(good, target, "star") < loss(long_, target, "star")
    assert torch.isclose(loss(background_only, target, "star"), loss(good, target, "star"))
    assert torch.isclose(loss(long_, target, "star", ray_weight=0), loss(good, target, "star", ray_weight=0))
    rays = probabilities(good, "star")[0, 5:]
    assert torch.allclose(rays[:, lab > 0], target[0, 6:][:, lab > 0] * RAY_SCALE, atol=0.05)
