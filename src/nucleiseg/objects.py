"""Second-level post-processing: score candidate nuclei, and choose per region how to split it.

The DSB2018 winners' last step. A single set of seed thresholds splits some touching nuclei too little and
others too much; which is right shows in the maps around each object (a merged object's own distance map and
centre flows disagree with the predicted ones; an over-split half is small, faint at its cut). An
:class:`ObjectScorer` (a small MLP on per-object features of the network's maps) learns from training images
the probability that a predicted object matches a true nucleus (IoU > 0.5). At prediction, every connected
region of the mask is segmented with the tuned thresholds and with other seed settings (``peak_h`` x
``flow_convergence``); a region keeps the setting whose objects promise the most matches net of false ones
(sum of 2p - 1 over objects scoring at least ``cut``), unless it beats the tuned setting by less than
``margin``; objects scoring below ``cut`` are dropped (in place of ``object_prob``). Flow and star designs only
(features use the flows). RESULTS.md, stage 20.
"""
from __future__ import annotations

import json
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from skimage.measure import label as connected_components
from skimage.segmentation import relabel_sequential
from safetensors.torch import load_file, save_file

from .postprocess import DEFAULT_THRESHOLDS, WITH_FLOWS, first_pixels, flow_convergence, instances
from .targets import distance_and_flows

FEATURES = ("log_area", "fg_mean", "fg_min", "fg_edge", "distance_mean", "distance_max", "convergence_max",
            "flow_error", "distance_error", "solidity", "eccentricity", "log_relative_area", "contact_fraction",
            "log_n_objects")
# (peak_h, flow_convergence) tried besides the tuned ones: a lower peak height and stronger convergence split more.
# Of 12 settings (peak_h 0.2-0.6 x convergence 0-1) these two kept nearly all the gain at 2/12 of the cost (RESULTS stage 20)
VARIANTS = ((0.2, 0.5), (0.2, 1.0))
SCORER_FILE = "object_scorer.safetensors"
TTA_SCORER_FILE = "object_scorer_tta.safetensors"  # learnt on test-time augmented maps, used with --tta


def scorer_file(tta: bool = False) -> str:
    """The model folder's file name of the object scorer for plain or for test-time augmented maps."""
    return TTA_SCORER_FILE if tta else SCORER_FILE


def object_features(maps: np.ndarray, labels: np.ndarray, context: tuple[float, int] | None = None,
                    convergence: np.ndarray | None = None) -> np.ndarray:
    """(N, len(FEATURES)) features of objects 1..N of ``labels`` (sequential) from flow-design ``maps``.

    ``context``: (median object area, number of objects) of the image's segmentation, so that objects of a
    partial labelling are described relative to the whole image; default: from ``labels`` itself.
    ``convergence``: :func:`postprocess.flow_convergence` of the maps' flows, when already computed."""
    n = int(labels.max())
    if n == 0:
        return np.zeros((0, len(FEATURES)))
    fg = 1.0 - maps[0]
    if convergence is None:
        convergence = flow_convergence(maps[3:5])
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    mean = lambda values, where=None: (np.bincount(lab if where is None else lab[where], values if where is None else values[where],  # noqa: E731
                                                   minlength=n + 1)[1:] / np.maximum(area if where is None else np.bincount(lab[where], minlength=n + 1)[1:], 1))
    median_area, n_objects = context or (float(np.median(area)), n)
    edge, contact = _edges(labels)
    on_edge, fg_obj, dist_obj = edge[ys, xs], fg[ys, xs].astype(np.float64), maps[2][ys, xs].astype(np.float64)
    # disagreement with the maps an object would have had as a training target (targets.py): its own distance map and flows
    own_distance, own_flows = distance_and_flows(labels)
    flow_err = mean(((maps[3:5, ys, xs] - own_flows[:, ys, xs]) ** 2).sum(axis=0).astype(np.float64))
    dist_err = mean(np.abs(maps[2, ys, xs] - own_distance[ys, xs]).astype(np.float64))
    columns = [np.log(area), mean(fg_obj), _per_label(np.minimum, lab, fg_obj, n, np.inf), mean(fg_obj, on_edge),
               mean(dist_obj), _per_label(np.maximum, lab, dist_obj, n, -np.inf),
               _per_label(np.maximum, lab, convergence[ys, xs].astype(np.float64), n, -np.inf), flow_err, dist_err,
               area / _convex_areas(ys, xs, lab, n), _eccentricity(ys, xs, lab, area), np.log(area / max(median_area, 1.0)),
               np.bincount(labels[contact], minlength=n + 1)[1:] / np.maximum(np.bincount(labels[edge], minlength=n + 1)[1:], 1),
               np.full(n, np.log(max(n_objects, 1)))]
    return np.stack([np.asarray(c, np.float64) for c in columns], axis=1)


def _per_label(ufunc: np.ufunc, lab: np.ndarray, values: np.ndarray, n: int, start: float) -> np.ndarray:
    """``ufunc`` (np.minimum / np.maximum) of ``values`` over each label 1..n (``lab``: each value's label)."""
    out = np.full(n + 1, start)
    ufunc.at(out, lab, values)
    return out[1:]


def _convex_areas(ys: np.ndarray, xs: np.ndarray, lab: np.ndarray, n: int) -> np.ndarray:
    """Pixel count of each object's convex hull image, as scikit-image's regionprops ``area_convex`` (the pixels
    whose centres lie in the convex hull of the pixels' edge midpoints), several times faster: the hull's left
    and right sides are the convex envelopes of the rows' first and last pixels' midpoints, and each row counts
    the pixel centres between them."""
    order = np.lexsort((xs, ys, lab))  # by object, row, column
    key_lab, key_y, sorted_x = lab[order], ys[order], xs[order]
    starts = np.flatnonzero(np.r_[True, (np.diff(key_lab) != 0) | (np.diff(key_y) != 0)])
    row_lab, row_y = key_lab[starts], key_y[starts].astype(np.float64)
    first, last = sorted_x[starts].astype(np.float64), sorted_x[np.r_[starts[1:], order.size] - 1].astype(np.float64)
    # each pixel (y, x) stands for its edge midpoints (y, x -+ 0.5) and (y -+ 0.5, x)
    point_lab, u = np.tile(row_lab, 3), np.concatenate([row_y - 0.5, row_y, row_y + 0.5])
    sides = [_envelopes(point_lab, u, np.concatenate([first, first - 0.5, first]), n, lower=True),
             _envelopes(point_lab, u, np.concatenate([last, last + 0.5, last]), n, lower=False)]
    # every row from each object's first to its last (an object in parts may skip rows its hull covers)
    bounds = np.searchsorted(row_lab, np.arange(1, n + 2))
    present = bounds[1:] > bounds[:-1]
    top, bottom = row_y[bounds[:-1][present]], row_y[bounds[1:][present] - 1]
    counts = (bottom - top + 1).astype(np.int64)
    query_lab = np.repeat(np.flatnonzero(present) + 1, counts)
    query_y = np.repeat(top, counts) + np.arange(query_lab.size) - np.repeat(np.cumsum(counts) - counts, counts)
    x0, x1 = (_interpolate(*side, query_lab, query_y) for side in sides)
    return np.bincount(query_lab, np.floor(x1 + 1e-9) - np.ceil(x0 - 1e-9) + 1, minlength=n + 1)[1:]


def _envelopes(lab: np.ndarray, u: np.ndarray, v: np.ndarray, n: int, lower: bool) -> tuple[np.ndarray, ...]:
    """Per object, the vertices (u increasing) of the lower (``lower``) or upper convex envelope of its points
    (u, v): Andrew's monotone chain over the extreme v of each u. Returns (label, u, v) of all vertices."""
    order = np.lexsort((v if lower else -v, u, lab))
    lab, u, v = lab[order], u[order], v[order]
    keep = np.r_[True, (np.diff(lab) != 0) | (np.diff(u) != 0)]  # the extreme v of each u comes first
    lab, u, v = lab[keep], u[keep].tolist(), v[keep].tolist()
    bounds = np.searchsorted(lab, np.arange(1, n + 2)).tolist()
    sign = 1.0 if lower else -1.0
    out_lab, out_u, out_v = [], [], []
    for k in range(n):
        hu, hv = [], []
        for pu, pv in zip(u[bounds[k]:bounds[k + 1]], v[bounds[k]:bounds[k + 1]]):
            while len(hu) >= 2 and sign * ((hu[-1] - hu[-2]) * (pv - hv[-2]) - (hv[-1] - hv[-2]) * (pu - hu[-2])) <= 0:
                hu.pop()
                hv.pop()
            hu.append(pu)
            hv.append(pv)
        out_lab += [k + 1] * len(hu)
        out_u += hu
        out_v += hv
    return np.array(out_lab, np.int64), np.array(out_u), np.array(out_v)


def _interpolate(lab: np.ndarray, u: np.ndarray, v: np.ndarray, query_lab: np.ndarray, query_u: np.ndarray) -> np.ndarray:
    """Piecewise-linear value at ``query_u`` of each query's object's vertices (lab, u, v), sorted by label and u."""
    key = lab * 1e7 + u
    j = np.clip(np.searchsorted(key, query_lab * 1e7 + query_u, side="right"), 1, key.size - 1)
    i = j - 1
    same = lab[j] == query_lab
    span = np.where(same, u[j] - u[i], 1.0)
    t = np.where(same & (span > 0), (query_u - u[i]) / np.where(span > 0, span, 1.0), 0.0)
    return v[i] + t * np.where(same, v[j] - v[i], 0.0)


def _eccentricity(ys: np.ndarray, xs: np.ndarray, lab: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Eccentricity of each object's ellipse of equal second moments (as scikit-image's regionprops, vectorised)
    from its pixels' coordinates ``ys``, ``xs`` and labels ``lab``."""
    n = area.size + 1
    sums = {name: np.bincount(lab, weights=v, minlength=n)[1:] for name, v in
            (("y", ys), ("x", xs), ("yy", ys * ys.astype(np.float64)), ("xx", xs * xs.astype(np.float64)), ("xy", ys * xs.astype(np.float64)))}
    cy, cx = sums["y"] / area, sums["x"] / area
    a = sums["xx"] / area - cx * cx  # the inertia tensor [[mu02, -mu11], [-mu11, mu20]] / mu00
    c = sums["yy"] / area - cy * cy
    b = sums["xy"] / area - cx * cy
    root = np.sqrt(np.maximum(((a - c) / 2) ** 2 + b * b, 0.0))
    large, small = (a + c) / 2 + root, np.maximum((a + c) / 2 - root, 0.0)
    return np.where(large > 0, np.sqrt(1 - small / np.where(large > 0, large, 1.0)), 0.0)


def _edges(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Object pixels with a 4-neighbour of another label (edge), and those whose neighbour is another object (contact)."""
    edge = np.zeros(labels.shape, bool)
    contact = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        a = labels[1:] if axis == 0 else labels[:, 1:]
        b = labels[:-1] if axis == 0 else labels[:, :-1]
        differ = a != b
        touch = differ & (a > 0) & (b > 0)
        for sl in ((slice(1, None),), (slice(None, -1),)) if axis == 0 else ((slice(None), slice(1, None)), (slice(None), slice(None, -1))):
            edge[sl] |= differ
            contact[sl] |= touch
    return edge & (labels > 0), contact


@dataclass
class Candidates:
    """One image's candidate objects: ``sets[0]`` from the tuned thresholds, ``sets[i]`` from variant i, holding
    only its objects in regions (connected parts of the mask) that it splits differently; per set, each object's
    region and features."""
    sets: list[np.ndarray]
    regions: list[np.ndarray]
    features: list[np.ndarray] = field(default_factory=list)


def _differing_regions(base: np.ndarray, other: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Boolean per region id: True where ``other`` does not label the region's pixels as ``base`` does."""
    inside = (region > 0) | (base > 0) | (other > 0)
    nb, nr = int(other.max()) + 1, int(region.max()) + 1
    keys = np.unique((base[inside].astype(np.int64) * nb + other[inside]) * nr + region[inside])
    a, b, r = keys // (nb * nr), (keys // nr) % nb, keys % nr
    differ = np.zeros(int(region.max()) + 1, bool)
    for values in (a, b):  # a label of one segmentation paired with two labels of the other: split differently
        counts = np.bincount(values, minlength=int(values.max()) + 1 if values.size else 1)
        differ[r[(values > 0) & (counts[values] > 1)]] = True
    differ[r[(a > 0) != (b > 0)]] = True  # an object kept by one and dropped (min_size) by the other
    differ[0] = False
    return differ


def candidates(maps: np.ndarray, design: str, thresholds: dict, variants=VARIANTS) -> Candidates:
    """The tuned segmentation (without ``object_prob``, the scorer's job) and the differing parts of each variant."""
    if design not in WITH_FLOWS:
        raise ValueError(f"the object scorer needs a design with flows {WITH_FLOWS}, not {design!r}")
    t = {**DEFAULT_THRESHOLDS, **thresholds, "object_prob": 0.0, "star_nms": 0.0}
    region = connected_components(1.0 - maps[0] > t["mask"], connectivity=1)
    convergence = flow_convergence(maps[3:5])  # computed once for the tuned setting, the variants and the features
    base = instances(maps, design, t, convergence)
    sets, regions = [base], [region.ravel()[first_pixels(base)]]
    for peak_h, weight in variants:
        other = instances(maps, design, {**t, "peak_h": peak_h, "flow_convergence": weight}, convergence)
        differ = _differing_regions(base, other, region)
        other = relabel_sequential(np.where(differ[region], other, 0))[0]
        sets.append(other)
        regions.append(region.ravel()[first_pixels(other)])
    n = int(base.max())
    context = (float(np.median(np.bincount(base.ravel())[1:])) if n else 1.0, n)
    return Candidates(sets, regions, [object_features(maps, s, context, convergence) for s in sets])


def choose(c: Candidates, probs: list[np.ndarray], cut: float, margin: float) -> list[np.ndarray]:
    """Per set, which of its objects the output keeps: per region the set with the largest sum of 2p - 1 over
    objects scoring >= ``cut`` (the tuned set unless another beats it by more than ``margin``), those objects only."""
    n_regions = max([int(r.max()) for r in c.regions if r.size] + [0]) + 1
    gains = np.full((len(c.sets), n_regions), -np.inf)
    gains[0] = 0.0
    for s, (r, p) in enumerate(zip(c.regions, probs)):
        if s > 0:
            gains[s, r] = 0.0
        np.add.at(gains[s], r, np.where(p >= cut, 2 * p - 1, 0.0))
    best = np.argmax(gains, axis=0)
    best = np.where(gains[best, np.arange(n_regions)] > gains[0] + margin, best, 0)
    return [(best[r] == s) & (p >= cut) for s, (r, p) in enumerate(zip(c.regions, probs))]


def assemble(c: Candidates, keep: list[np.ndarray]) -> np.ndarray:
    """Labels (H, W) int32 of the kept objects of every set, numbered 1..N."""
    out = np.zeros(c.sets[0].shape, np.int32)
    n = 0
    for labels, k in zip(c.sets, keep):
        if not k.any():
            continue
        lut = np.zeros(k.size + 1, np.int32)
        lut[1:][k] = np.arange(n + 1, n + 1 + int(k.sum()))
        sel = lut[labels]
        out[sel > 0] = sel[sel > 0]
        n += int(k.sum())
    return out


class ObjectScorer:
    """P(object matches a true nucleus at IoU > 0.5) from :func:`object_features`: standardised features, an MLP."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, net: torch.nn.Sequential | None = None,
                 cut: float = 0.3, margin: float = 0.5, variants=VARIANTS, info: dict | None = None):
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.net = net or _mlp(len(FEATURES))
        self.cut, self.margin, self.variants = float(cut), float(margin), tuple(tuple(v) for v in variants)
        self.info = info or {}
        # inference in NumPy: a few small matrix products, which torch's per-call overhead would dominate
        self._layers = [(m.weight.detach().double().numpy().T, m.bias.detach().double().numpy())
                        for m in self.net if isinstance(m, torch.nn.Linear)]

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        x = (np.asarray(features, np.float64).reshape(-1, len(FEATURES)) - self.mean) / self.std
        for i, (w, b) in enumerate(self._layers):
            x = x @ w + b
            if i < len(self._layers) - 1:
                x = np.maximum(x, 0.0)
        return 1.0 / (1.0 + np.exp(-x[:, 0]))

    def segment(self, maps: np.ndarray, design: str, thresholds: dict) -> np.ndarray:
        """Instance labels from maps: candidates, a choice per region, unlikely objects dropped."""
        c = candidates(maps, design, thresholds, self.variants)
        p = self.probabilities(np.concatenate(c.features))
        keep = choose(c, np.split(p, np.cumsum([len(f) for f in c.features])[:-1]), self.cut, self.margin)
        return assemble(c, keep)

    def save(self, path: str | Path) -> Path:
        state = {"mean": torch.from_numpy(self.mean), "std": torch.from_numpy(self.std),
                 **{f"net.{k}": v.contiguous() for k, v in self.net.state_dict().items()}}
        meta = {"features": list(FEATURES), "cut": self.cut, "margin": self.margin, "variants": [list(v) for v in self.variants],
                **self.info}
        from .io import atomic_path

        with atomic_path(path) as tmp:  # no half-written scorer in a model folder, usual permissions
            save_file(state, str(tmp), metadata={"object_scorer": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "ObjectScorer":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()["object_scorer"])
        if tuple(meta["features"]) != FEATURES:
            raise ValueError(f"{path}: object scorer made for features {meta['features']}, this version computes {list(FEATURES)}")
        state = load_file(str(path))
        net = _mlp(len(FEATURES))
        net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        info = {k: v for k, v in meta.items() if k not in ("features", "cut", "margin", "variants")}
        return cls(state["mean"].numpy(), state["std"].numpy(), net.eval(), meta["cut"], meta["margin"], meta["variants"], info)


def _mlp(n_in: int, hidden: int = 64) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 1))


def labelled_candidates(maps: np.ndarray, design: str, thresholds: dict, true: np.ndarray) -> tuple[list, list]:
    """Features of one image's candidate objects, per set, and whether each matches a true nucleus (IoU > 0.5)."""
    from .metrics import iou_matrix

    c = candidates(maps, design, thresholds)
    features, matched = [], []
    for labels, f in zip(c.sets, c.features):
        if len(f):
            iou = iou_matrix(true, labels)
            features.append(f)
            matched.append(iou.max(axis=0) > 0.5 if iou.shape[0] else np.zeros(len(f), bool))
    return features, matched


def fit_scorer(model, items: list, epochs: int = 10, seed: int = 0, progress: bool = True, workers: int = 1,
               tta: bool = False) -> ObjectScorer:
    """Train an :class:`ObjectScorer` for ``model`` on annotated (name, normalised image, labels) items: the
    candidates of every variant on the model's plain maps (``tta``: its test-time augmented maps, with its TTA
    thresholds, for a scorer used with TTA: those maps are smoother), labelled by whether they match a true nucleus.
    ``workers`` > 1: the candidates of several images at once in as many processes, while the network goes on
    (spawned processes: a script calling this needs the usual ``if __name__ == "__main__":`` guard)."""
    features, matched = [], []
    thresholds = model.thresholds_for(tta)
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
    pending: deque = deque()
    done = 0

    def collect(result: tuple[list, list]) -> None:
        nonlocal done
        features.extend(result[0])
        matched.extend(result[1])
        done += 1
        if progress:
            print(f"\robject scorer: candidates of image {done}/{len(items)}", end="", flush=True)

    try:
        for _, image, true in items:
            job = (model.maps_from_normalized(image, tta), model.design, thresholds, true)
            if pool is None:
                collect(labelled_candidates(*job))
                continue
            pending.append(pool.submit(labelled_candidates, *job))
            while len(pending) > 2 * workers:  # a few images ahead, not all of their maps in memory
                collect(pending.popleft().result())
        while pending:
            collect(pending.popleft().result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if progress:
        print()
    if not features:
        raise ValueError("no candidate objects in these images: nothing to learn an object scorer from")
    x, y = np.concatenate(features), np.concatenate(matched).astype(np.float32)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    torch.manual_seed(seed)
    net = _mlp(len(FEATURES))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xt, yt = torch.from_numpy(((x - mean) / std).astype(np.float32)), torch.from_numpy(y)
    for _ in range(epochs):
        for batch in torch.randperm(len(xt)).split(1024):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[batch])[:, 0], yt[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    info = {"trained_on": f"{len(items)} images", "maps": "tta" if tta else "plain", "objects": int(len(y)),
            "matched_fraction": round(float(y.mean()), 4)}
    return ObjectScorer(mean, std, net.eval(), info=info)
