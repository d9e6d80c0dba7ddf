"""Probability maps -> instance labels: thresholding, marker-controlled watershed, cleaning.

Thresholds are a plain dict (saved per model as ``thresholds.json``, tuned on validation data):
``mask`` (nucleus probability), ``marker`` (interior probability or normalised distance that seeds
one nucleus), ``min_size`` (smallest nucleus kept, pixels), ``peak_h`` (0: every connected region above
``marker`` seeds one nucleus; > 0: every peak of the lightly smoothed seed map that rises at least
``peak_h`` above the saddle to a higher peak does, so two nuclei joined by a high saddle are still split),
``contact`` (contact design: pixels whose contact probability exceeds it seed no nucleus, which cuts
the seed regions where touching nuclei meet; the watershed then floods the seed map times
(1 - contact probability), so borders between nuclei follow the predicted contacts), ``object_prob``
(objects whose mean nucleus probability is below it are dropped, like StarDist's object probability
threshold: faint specks and spurious blobs score lower than real nuclei; 0 keeps every object),
``flow_seed`` (flow design: a centre needs at least this many pixels' flow paths ending within its
3x3 neighbourhood to seed a nucleus; 0: seeds from the distance map as in the distance design, the flows
having served only as a training target, which tuning chooses when it separates nuclei better),
``flow_convergence`` (flow and star designs: > 0 adds this many times the predicted flows'
convergence (minus their divergence, lightly smoothed) to the distance map before seeds are found and the watershed
floods it: flows point into each nucleus's centre and away from the line where two nuclei touch, so the sum rises
at centres and dips between touching nuclei even where the distance map alone has one merged peak; used with a
larger ``peak_h``), ``star_nms`` (star design: > 0 keeps StarDist's star-convex polygons instead of the watershed: every pixel
of the mask whose distance map exceeds ``marker`` proposes the polygon of its predicted ray lengths, scored
by that distance; polygons overlapping a better one with an IoU above ``star_nms`` are suppressed; 0: the
flow design's post-processing).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as connected_components
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed

WITH_DISTANCE = ("distance", "contact", "flow", "star")  # designs whose third map is the normalised distance to the border
WITH_FLOWS = ("flow", "star")  # designs whose fourth and fifth maps are the centre flows
# flow_seed 0: an untuned flow model seeds from its distance map, which tuning chose on DSB2018 (RESULTS, stage 10)
DEFAULT_THRESHOLDS = {"mask": 0.5, "marker": 0.5, "min_size": 15, "peak_h": 0.0, "contact": 0.5, "object_prob": 0.0,
                      "flow_seed": 0, "flow_convergence": 0.0, "star_nms": 0.0}
SEED_SMOOTHING = 1.0  # sigma (pixels) of the Gaussian applied to the seed map before finding peaks
FLOW_STEPS = 100  # most steps (one pixel each) followed along the flows: nuclei up to ~200 pixels across
SETTLE_STEPS = 10  # a flow path that moved less than a pixel in this many steps has arrived


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects smaller than ``min_size`` pixels and renumber 1..N."""
    if min_size > 0 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        if small.any():
            labels = labels.copy()
            labels[small[labels]] = 0
    return relabel_sequential(labels)[0]


def remove_unsure(labels: np.ndarray, probability: np.ndarray, threshold: float) -> np.ndarray:
    """Drop objects whose mean ``probability`` (nucleus probability map) is below ``threshold``."""
    if threshold <= 0 or labels.max() == 0:
        return labels
    counts = np.bincount(labels.ravel())
    sums = np.bincount(labels.ravel(), weights=probability.ravel(), minlength=counts.size)
    # labels with no pixels (numbers left unused by the watershed) are not unsure, and divide by nothing
    unsure = (counts > 0) & (sums < threshold * counts)
    unsure[0] = False
    return np.where(unsure[labels], 0, labels) if unsure.any() else labels


def instances(maps: np.ndarray, design: str, thresholds: dict | None = None,
              convergence: np.ndarray | None = None) -> np.ndarray:
    """Instance labels (H, W) int32 from probability maps (C, H, W) of a target design (``convergence``: the
    flows' :func:`flow_convergence`, when already computed)."""
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    fg = 1.0 - maps[0]
    mask = fg > t["mask"]
    if design == "semantic":
        labels = _fill_holes_per_object(connected_components(mask, connectivity=1).astype(np.int32))
        labels = remove_unsure(labels, fg, t["object_prob"])
        return remove_small(labels, int(t["min_size"])).astype(np.int32)
    if design == "contour":
        seed_map = maps[1]  # interior probability: high in nucleus centres, low on shared borders
    elif design in WITH_DISTANCE:
        seed_map = maps[2]
    else:
        raise ValueError(f"unknown target design {design!r}")
    seed_region = mask & (maps[3] <= t["contact"]) if design == "contact" else mask
    if design == "star" and t["star_nms"] > 0:
        labels = star_polygons(maps[5:], seed_map, seed_region & (seed_map > t["marker"]), t["star_nms"])
        labels = remove_unsure(_fill_holes_per_object(labels), fg, t["object_prob"])
        return remove_small(labels, int(t["min_size"])).astype(np.int32)
    if design in WITH_FLOWS and t["flow_convergence"] > 0:
        convergence = flow_convergence(maps[3:5]) if convergence is None else convergence
        seed_map = np.clip(seed_map + t["flow_convergence"] * convergence, 0.0, 1.0)
    if design in WITH_FLOWS and t["flow_seed"] > 0:
        markers = flow_markers(maps[3:5], mask, int(t["flow_seed"]))
    elif t["peak_h"] > 0:
        seed_map = ndi.gaussian_filter(seed_map.astype(np.float32), SEED_SMOOTHING)
        markers = peak_markers(seed_map, seed_region, t["peak_h"], t["marker"])
    else:
        markers = connected_components((seed_map > t["marker"]) & seed_region, connectivity=1)
        # seeds below a quarter of the minimum size are noise: they would only split a nucleus
        markers = remove_small(markers, max(1, int(t["min_size"]) // 4))
    # contact design: flood a surface that dips where nuclei meet, so the split follows the contact
    surface = seed_map * (1.0 - maps[3]) if design == "contact" else seed_map
    labels = flood(surface, markers, mask)
    # nuclei with no seed of their own (faint or tiny ones) are kept as their connected component
    orphans = connected_components(mask & (labels == 0), connectivity=1)
    if orphans.max() > 0:
        labels[orphans > 0] = orphans[orphans > 0] + labels.max()
    labels = remove_unsure(_fill_holes_per_object(labels), fg, t["object_prob"])
    return remove_small(labels, int(t["min_size"])).astype(np.int32)


def flood(surface: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Labels (H, W) int32 of ``watershed(-surface, markers, mask=mask)``, flooding only the connected parts of
    ``mask`` that hold several markers: a part with a single marker is all that marker's, one without stays 0."""
    parts = connected_components(mask, connectivity=1)
    on = markers > 0
    base = int(markers.max()) + 1
    pairs = np.unique(parts[on].astype(np.int64) * base + markers[on])  # each (part, marker) present once
    part_of, marker_of = pairs // base, pairs % base
    count = np.bincount(part_of, minlength=int(parts.max()) + 1)
    single = np.zeros(count.size, np.int32)
    single[part_of[count[part_of] == 1]] = marker_of[count[part_of] == 1]
    labels = single[parts]  # 0 on background and in parts without a marker
    several = (count > 1)[parts]
    if several.any():
        flooded = watershed(-surface, np.where(several, markers, 0), mask=several)
        labels[several] = flooded[several]
    return labels


def star_polygons(rays: np.ndarray, score: np.ndarray, candidates: np.ndarray, nms: float) -> np.ndarray:
    """Labels (H, W) from StarDist's non-maximum suppression: in order of ``score``, each pixel of
    ``candidates`` proposes the polygon of its ray lengths ``rays`` (K, H, W; angles 2 pi k / K), kept unless
    its IoU with a kept polygon exceeds ``nms``; kept polygons are painted best last, so they win overlaps.
    Unlike StarDist, a pixel already inside a kept polygon proposes nothing, which makes this linear in the
    number of nuclei rather than of pixels."""
    from skimage.draw import polygon

    h, w = score.shape
    ys, xs = np.nonzero(candidates)
    order = np.argsort(-score[ys, xs], kind="stable")
    ys, xs = ys[order], xs[order]
    angles = 2 * np.pi * np.arange(rays.shape[0]) / rays.shape[0]
    sin, cos = np.sin(angles), np.cos(angles)
    owner = np.zeros((h, w), np.int32)  # which kept polygon covers each pixel (the first kept, for the IoU)
    areas = [0]
    kept = []
    for y, x in zip(ys, xs):
        if owner[y, x] > 0:  # inside a better polygon: its own would mostly repeat that one (and it saves time)
            continue
        r = rays[:, y, x]
        rr, cc = polygon(y + r * sin, x + r * cos, (h, w))
        if rr.size == 0:
            continue
        hit = owner[rr, cc]
        hit = hit[hit > 0]
        if hit.size:
            labels_hit, inter = np.unique(hit, return_counts=True)
            iou = inter / (rr.size + np.asarray(areas)[labels_hit] - inter)
            if iou.max() > nms:
                continue
        kept.append((rr, cc))
        areas.append(rr.size)
        free = owner[rr, cc] == 0
        owner[rr[free], cc[free]] = len(kept)
    labels = np.zeros((h, w), np.int32)
    for i in range(len(kept) - 1, -1, -1):  # worst first: the best polygons are painted last
        rr, cc = kept[i]
        labels[rr, cc] = i + 1
    return labels


def follow_flows(flows: np.ndarray, mask: np.ndarray, steps: int = FLOW_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel of ``mask`` ends after following the flow field (2, H, W) up to one pixel per
    step: (pixel indices (2, N), end points (2, N) rounded to pixels). A path that moved less than one
    pixel over the last ``SETTLE_STEPS`` steps has arrived (it circles its centre) and is not followed further."""
    h, w = mask.shape
    start = np.stack(np.nonzero(mask))
    pos = start.astype(np.float32)
    end = start.copy()
    active = np.arange(start.shape[1])
    before = pos.copy()
    for step in range(1, steps + 1):
        at = end[:, active]
        p = pos[:, active] + flows[:, at[0], at[1]]
        p[0] = np.clip(p[0], 0, h - 1)
        p[1] = np.clip(p[1], 0, w - 1)
        pos[:, active] = p
        end[:, active] = np.rint(p).astype(np.int64)
        if step % SETTLE_STEPS == 0:
            moving = np.hypot(*(p - before)) >= 1.0
            active, before = active[moving], p[:, moving]
            if active.size == 0:
                break
    return start, end


def flow_convergence(flows: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Minus the divergence of a flow field (2, H, W), Gaussian-smoothed by ``sigma`` pixels: positive where
    flows meet (nucleus centres), negative where they part (the line between two touching nuclei)."""
    divergence = np.gradient(flows[0], axis=0) + np.gradient(flows[1], axis=1)
    return ndi.gaussian_filter(-divergence.astype(np.float32), sigma)


def flow_markers(flows: np.ndarray, mask: np.ndarray, min_count: int) -> np.ndarray:
    """Labels (H, W) for the pixels of ``mask`` whose flow paths end at a common centre: centres are the
    connected places where at least ``min_count`` paths end within a 3x3 window (Cellpose's flow
    dynamics); pixels whose paths end elsewhere stay 0, for the watershed to assign."""
    labels = np.zeros(mask.shape, np.int32)
    if not mask.any():
        return labels
    start, end = follow_flows(flows, mask)
    counts = np.bincount(np.ravel_multi_index(end, mask.shape), minlength=mask.size).reshape(mask.shape)
    near = ndi.uniform_filter(counts.astype(np.float32), size=3) * 9
    centres = connected_components(near >= max(min_count, 1) - 0.5, connectivity=2)
    labels[start[0], start[1]] = centres[end[0], end[1]]
    return labels


def peak_markers(seed_map: np.ndarray, region: np.ndarray, h: float, floor: float = 0.0) -> np.ndarray:
    """One marker per peak of ``seed_map`` above ``floor`` inside ``region`` that rises at least ``h``
    above the saddle joining it to a higher peak (h-maxima), computed per connected region on its
    bounding box (the rest of the box at 0). Markers are numbered by region, then in raster order."""
    regions = connected_components(region, connectivity=1)
    if regions.max() == 0:
        return np.zeros(region.shape, np.int32)
    values = np.where(regions > 0, seed_map, 0).astype(np.float32)
    # local maxima (3x3, the region's own pixels only) of every region at once, and how many each region has
    peaks = (values >= _region_neighbour_max(values, regions)) & (values > floor)
    found = connected_components(np.where(peaks, regions, 0), connectivity=2)  # joins equal labels: per region
    region_of = regions.ravel()[first_pixels(found)]
    several = np.bincount(region_of, minlength=int(regions.max()) + 1) > 1
    markers = np.where(several[regions], 0, found)
    n = int(found.max())
    boxes = ndi.find_objects(regions)
    for i in np.flatnonzero(several):  # several local maxima: keep those at least h high
        sl = boxes[i - 1]
        inside = regions[sl] == i
        crop = np.where(inside, values[sl], 0)
        kept, k = ndi.label(h_maxima(crop, h) & inside & (crop > floor), structure=np.ones((3, 3)))
        markers[sl][kept > 0] = kept[kept > 0] + n
        n += k
    # number by region, then by first pixel (raster order), as a loop over regions would
    first = first_pixels(markers)
    order = np.lexsort((first, regions.ravel()[first]))
    lut = np.zeros(n + 1, np.int32)
    present = np.flatnonzero(np.bincount(markers.ravel(), minlength=n + 1)[1:]) + 1
    lut[present[order]] = np.arange(1, present.size + 1)
    return lut[markers]


def _region_neighbour_max(values: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Per pixel, the maximum of ``values`` over its 3x3 neighbourhood, counting neighbours of another region as 0."""
    h, w = values.shape
    v, r = np.pad(values, 1), np.pad(regions, 1)
    out = values.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == dx == 1:
                continue
            same = r[dy:dy + h, dx:dx + w] == regions
            np.maximum(out, np.where(same, v[dy:dy + h, dx:dx + w], 0), out=out)
    return out


def first_pixels(labels: np.ndarray) -> np.ndarray:
    """Flat index of the first pixel (raster order) of each label present in ``labels``, by label."""
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    first = np.full(int(flat.max(initial=0)) + 1, -1, np.int64)
    first[flat[where[::-1]]] = where[::-1]
    return first[1:][first[1:] >= 0]


def _fill_holes_per_object(labels: np.ndarray) -> np.ndarray:
    """Fill holes enclosed by a single object (background enclosed by several objects is kept)."""
    background = labels == 0
    holes = ndi.binary_fill_holes(~background) & background
    if not holes.any():
        return labels
    hole_labels, n = ndi.label(holes)
    ring = np.where(background, 0, ndi.grey_dilation(hole_labels, size=3))
    on_ring = ring > 0  # the object pixels bordering each hole: statistics on these only (fast)
    index = np.arange(1, n + 1)
    low = np.asarray(ndi.minimum(labels[on_ring], ring[on_ring], index))
    high = np.asarray(ndi.maximum(labels[on_ring], ring[on_ring], index))
    fill = np.where(low == high, high, 0).astype(labels.dtype)
    out = labels.copy()
    out[holes] = fill[hole_labels[holes] - 1]
    return out
