"""Training targets: what the network learns to predict from instance labels, and its loss.

A *target design* is one swappable part: it fixes the number of output channels, turns an instance
label image into per-pixel targets, scores logits against them, and turns logits into probability maps
that :mod:`nucleiseg.postprocess` converts back into instances.

- ``semantic``: background / nucleus (the original recipe; touching nuclei merge).
- ``contour``: background / interior / boundary, boundary weighted; watershed from interiors.
- ``distance``: background / nucleus + each nucleus's normalised distance to its border; watershed
  from distance peaks. Its targets also carry a *contact* map (pixels near two different nuclei) that
  the loss can up-weight, so the network learns to mark where touching nuclei meet.
- ``contact``: the distance design plus a fourth channel predicting that contact map; post-processing
  cuts the seed regions along predicted contacts, so touching nuclei with one merged distance peak
  still get one seed each (the DSB2018 winners' mask + separation-border idea).
- ``flow``: the distance design plus two channels predicting, at each nucleus pixel, the unit vector
  pointing to its nucleus's centre (Cellpose's idea, with straight lines to the centre in place of a
  diffusion: nuclei are nearly convex). Post-processing follows the vectors from every pixel; pixels that
  end at the same centre form one nucleus, so touching nuclei split even where their distance maps merge.
  Measured on DSB2018 (benchmarks/RESULTS.md, stage 10), learning the flows improved the distance map, and
  seeding from that map (``flow_seed`` 0) separated nuclei better than the flows themselves.
- ``star``: the flow design plus ``N_RAYS`` channels predicting, at each nucleus pixel, the distance to
  its nucleus's border along rays at equal angles (StarDist's star-convex polygons). Post-processing can
  keep the best-scoring polygons by non-maximum suppression (``star_nms``) instead of the watershed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, find_boundaries

from .postprocess import WITH_DISTANCE, WITH_FLOWS  # defined there: post-processing stays free of torch

DESIGNS = ("semantic", "contour", "distance", "contact", "flow", "star")
N_RAYS = 16  # star design: rays per pixel (angles 2 pi k / N_RAYS, k = 0 ... counter-clockwise from +x)
RAY_SCALE = 16.0  # star design: ray lengths are learnt in units of this many pixels (targets ~0-3)
MAX_RAY = 256  # star design: longest ray measured, pixels


def n_channels(design: str) -> int:
    """Network output channels needed by a target design."""
    return {"semantic": 2, "contour": 3, "distance": 3, "contact": 4, "flow": 5, "star": 5 + N_RAYS}[_check(design)]


def _check(design: str) -> str:
    if design not in DESIGNS:
        raise ValueError(f"unknown target design {design!r}; choose from {', '.join(DESIGNS)}")
    return design


def contour_classes(labels: np.ndarray) -> np.ndarray:
    """0 background, 1 interior, 2 boundary (each nucleus's inner outline, so touching nuclei are split)."""
    classes = (labels > 0).astype(np.int64)
    classes[find_boundaries(labels, mode="inner") & (labels > 0)] = 2
    return classes


def _objects(labels: np.ndarray):
    """Per nucleus: (its bounding box with a 1-pixel margin, its mask there, its distance to its border there)."""
    for sl_index, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        obj = labels[sl] == sl_index
        yield sl, obj, ndi.distance_transform_edt(obj)


def normalised_distance(labels: np.ndarray) -> np.ndarray:
    """Distance of each nucleus pixel to its own border, divided by the nucleus's maximum (0..1)."""
    dist = np.zeros(labels.shape, np.float32)
    for sl, obj, d in _objects(labels):
        peak = d.max()
        if peak > 0:
            dist[sl][obj] = d[obj] / peak
    return dist


def centre_flows(labels: np.ndarray) -> np.ndarray:
    """(2, H, W) unit vectors (y, x) from each nucleus pixel to its nucleus's centre, the pixel farthest
    from its border (always inside the nucleus, unlike the centroid); 0 at centres and on background."""
    return distance_and_flows(labels)[1]


def distance_and_flows(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`normalised_distance` and :func:`centre_flows` of ``labels`` from one distance transform per nucleus."""
    dist = np.zeros(labels.shape, np.float32)
    flows = np.zeros((2, *labels.shape), np.float32)
    for sl, obj, d in _objects(labels):
        peak = d.max()
        if peak > 0:
            dist[sl][obj] = d[obj] / peak
        cy, cx = np.unravel_index(np.argmax(d), d.shape)
        ys, xs = np.nonzero(obj)
        vy, vx = cy - ys, cx - xs
        norm = np.maximum(np.hypot(vy, vx), 1e-6)
        flows[0][sl][ys, xs] = vy / norm
        flows[1][sl][ys, xs] = vx / norm
    return dist, flows


def ray_distances(labels: np.ndarray, n_rays: int = N_RAYS, max_steps: int = MAX_RAY) -> np.ndarray:
    """(n_rays, H, W) distances in pixels from each nucleus pixel to its nucleus's border along rays at
    angles 2 pi k / n_rays (y = sin, x = cos): the first pixel-centred step that leaves the nucleus (or the
    image) minus half a pixel, so a polygon through the ray ends covers exactly the pixels passed. 0 on background."""
    h, w = labels.shape
    padded = np.pad(labels, 1).ravel()  # outside the image counts as background
    ys, xs = np.nonzero(labels)
    start = (ys + 1) * (w + 2) + xs + 1  # each nucleus pixel's index in the padded image
    own = padded[start]
    out = np.zeros((n_rays, h, w), np.float32)
    steps = np.arange(1, max_steps + 1)
    for k in range(n_rays):
        # the steps' offsets are the same from every pixel, and one step moves at most one pixel along
        # each axis, so a ray leaving the image lands on the padding first
        offsets = (np.rint(steps * np.sin(2 * np.pi * k / n_rays)).astype(np.int64) * (w + 2)
                   + np.rint(steps * np.cos(2 * np.pi * k / n_rays)).astype(np.int64))
        alive = np.arange(ys.size)
        dist = np.full(ys.size, max_steps, np.float32)
        for s, offset in zip(steps, offsets):
            left = padded[start[alive] + offset] != own[alive]
            if left.any():
                dist[alive[left]] = s - 0.5
                alive = alive[~left]
                if alive.size == 0:
                    break
        out[k, ys, xs] = dist
    return out


def contact_map(labels: np.ndarray, radius: int = 2) -> np.ndarray:
    """1 where a (2 radius + 1)-square window holds two different nuclei (where touching or nearly
    touching nuclei meet, background gaps included), else 0."""
    size = 2 * radius + 1
    high = ndi.maximum_filter(labels, size=size)
    big = int(labels.max()) + 1  # stands for background in the minimum
    low = ndi.minimum_filter(np.where(labels > 0, labels, big), size=size)
    return ((low < big) & (high != low)).astype(np.float32)


def small_nucleus_map(labels: np.ndarray, full: float = 40.0, none: float = 160.0, ring: int = 2) -> np.ndarray:
    """How small each nucleus is, on its pixels and a ``ring``-pixel band around it: 1 for nuclei of
    ``full`` pixels or fewer, falling linearly to 0 at ``none`` pixels. Small nuclei are few pixels of
    the loss, so a plain per-pixel loss lets the network skip them; this map lets the loss count them more."""
    areas = np.bincount(labels.ravel())
    smallness = np.clip((none - areas) / (none - full), 0.0, 1.0).astype(np.float32)
    smallness[0] = 0.0
    return smallness[expand_labels(labels, ring)]


def encode(labels: np.ndarray, design: str) -> np.ndarray:
    """Per-pixel targets (T, H, W) float32 for an instance label image (0 = background).

    Distance designs: nucleus mask, normalised distance, contact map, small-nucleus map (+ the flow
    design's two centre-flow channels)."""
    design = _check(design)
    if design == "semantic":
        return (labels > 0).astype(np.float32)[None]
    if design == "contour":
        return contour_classes(labels).astype(np.float32)[None]
    distance, flows = distance_and_flows(labels) if design in WITH_FLOWS else (normalised_distance(labels), None)
    maps = [(labels > 0).astype(np.float32), distance, contact_map(labels), small_nucleus_map(labels)]
    if design in WITH_FLOWS:
        maps += list(flows)
    if design == "star":
        maps += list(ray_distances(labels) / RAY_SCALE)
    return np.stack(maps)


def loss(logits: torch.Tensor, target: torch.Tensor, design: str, boundary_weight: float = 3.0,
         dice_weight: float = 0.0, contact_weight: float = 0.0, contact_pos_weight: float = 1.0,
         small_weight: float = 0.0, distance_weight: float = 1.0, flow_weight: float = 1.0,
         ray_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy (class-weighted for boundaries) + optional Dice on foreground, + distance BCE.

    ``contact_weight`` (distance designs): pixels of the contact map count ``1 + contact_weight`` times
    in the cross-entropy and the distance loss (like U-Net's border weights for touching cells).
    ``small_weight`` (distance designs): small nuclei and a ring around them count up to
    ``1 + small_weight`` times (the small-nucleus map), so missing them costs as much as missing big ones.
    ``distance_weight`` (distance designs): weight of the distance map's loss against the class loss; the
    distance map seeds the watershed, so its peaks and saddles decide which touching nuclei are split.
    The contact design adds a binary cross-entropy of its contact channel against the contact map, its
    positive (contact) pixels counting ``contact_pos_weight`` times: they are only ~0.4% of all pixels.
    The flow design adds ``flow_weight`` times the squared error of its (tanh) flow channels against the
    centre flows, averaged over nucleus pixels (background has no centre), weighted like the rest.
    The star design adds ``ray_weight`` times the mean absolute error of its (softplus) ray lengths, in
    units of ``RAY_SCALE`` pixels, over nucleus pixels and rays, weighted like the rest (StarDist's loss).
    """
    design = _check(design)
    logits = logits.float()
    n_cls = 3 if design == "contour" else 2
    classes = target[:, 0].long()
    weight = None
    if design == "contour":
        weight = torch.tensor([1.0, 1.0, boundary_weight], device=logits.device)
    with_distance = design in WITH_DISTANCE
    pixel_weight = None
    if with_distance and (contact_weight > 0 or small_weight > 0):
        pixel_weight = (1.0 + contact_weight * target[:, 2]) * (1.0 + small_weight * target[:, 3])
    if pixel_weight is None:
        total = F.cross_entropy(logits[:, :n_cls], classes, weight=weight)
    else:
        total = (F.cross_entropy(logits[:, :n_cls], classes, reduction="none") * pixel_weight).mean()
    if dice_weight > 0:
        fg = 1 - torch.softmax(logits[:, :n_cls], dim=1)[:, 0]
        true_fg = (classes > 0).float()
        inter = (fg * true_fg).sum()
        dice = (2 * inter + 1) / (fg.sum() + true_fg.sum() + 1)
        total = total + dice_weight * (1 - dice)
    if with_distance:
        total = total + distance_weight * F.binary_cross_entropy_with_logits(logits[:, 2], target[:, 1],
                                                                             weight=pixel_weight)
    if design == "contact":
        pos_weight = torch.tensor(contact_pos_weight, device=logits.device)
        total = total + F.binary_cross_entropy_with_logits(logits[:, 3], target[:, 2], pos_weight=pos_weight)

    def nucleus_mean(error: torch.Tensor) -> torch.Tensor:
        """Mean of a per-pixel error (N, H, W) over nucleus pixels (background has no centre or rays),
        weighted like the rest."""
        error = error * target[:, 0] * (1.0 if pixel_weight is None else pixel_weight)
        return error.sum() / target[:, 0].sum().clamp(min=1.0)

    if design in WITH_FLOWS:
        total = total + flow_weight * nucleus_mean(((torch.tanh(logits[:, 3:5]) - target[:, 4:6]) ** 2).sum(1))
    if design == "star":
        total = total + ray_weight * nucleus_mean((F.softplus(logits[:, 5:]) - target[:, 6:]).abs().mean(1))
    return total


def probabilities(logits: torch.Tensor, design: str) -> torch.Tensor:
    """Logits (N, C, H, W) -> probability maps (N, C, H, W) that post-processing reads."""
    design = _check(design)
    if design in WITH_FLOWS:
        maps = [torch.softmax(logits[:, :2], dim=1), torch.sigmoid(logits[:, 2:3]), torch.tanh(logits[:, 3:5])]
        if design == "star":
            maps.append(F.softplus(logits[:, 5:]) * RAY_SCALE)  # ray lengths in pixels
        return torch.cat(maps, dim=1)
    if design in WITH_DISTANCE:
        return torch.cat([torch.softmax(logits[:, :2], dim=1), torch.sigmoid(logits[:, 2:])], dim=1)
    return torch.softmax(logits, dim=1)


def vector_channels(design: str) -> tuple[int, int] | None:
    """Indices (y, x) of the maps that are vectors, whose sign a flip reverses (flip TTA), or None."""
    return (3, 4) if _check(design) in WITH_FLOWS else None


def ray_channels(design: str) -> int | None:
    """Index of the first ray-length map (star design), or None: a flip reorders the rays (flip TTA)."""
    return 5 if _check(design) == "star" else None


def flip_rays(rays: np.ndarray, axis: str) -> np.ndarray:
    """Ray-length maps (N_RAYS, ...) of a flipped image reordered to the original's rays: flipping y turns
    angle a into -a, flipping x turns it into pi - a (maps themselves are flipped back separately)."""
    n = rays.shape[0]
    k = np.arange(n)
    return rays[(-k) % n] if axis == "y" else rays[(n // 2 - k) % n]


def transpose_rays(rays: np.ndarray) -> np.ndarray:
    """Ray-length maps (N_RAYS, ...) of a transposed image (y and x swapped) reordered to the original's
    rays: the transpose turns angle a into pi/2 - a."""
    n = rays.shape[0]
    return rays[(n // 4 - np.arange(n)) % n]


def foreground(maps: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Nucleus probability from probability maps (channel 0 is background in every design)."""
    return 1 - maps[:, 0] if maps.ndim == 4 else 1 - maps[0]
