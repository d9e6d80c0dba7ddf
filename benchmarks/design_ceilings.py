"""Ceiling of each target design on the validation split: perfect network outputs (targets made from the
true labels) through that design's post-processing, scored with the DSB metric; plus a classic
non-learned baseline (Otsu threshold + distance-transform watershed).

    .venv/bin/python benchmarks/design_ceilings.py --data ../shared/data/dsb2018-stage1-train
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from nucleiseg.data import find_samples, load_items, split
from nucleiseg.evaluate import image_type
from nucleiseg.metrics import instance_metrics
from nucleiseg.postprocess import instances
from nucleiseg.targets import encode, n_channels


def perfect_maps(labels: np.ndarray, design: str) -> np.ndarray:
    t = encode(labels, design)
    if design == "distance":
        return np.stack([1 - t[0], t[0], t[1]])
    if design == "flow":
        return np.stack([1 - t[0], t[0], t[1], t[4], t[5]])
    return np.eye(n_channels(design), dtype=np.float32)[t[0].astype(int)].transpose(2, 0, 1)


def otsu_watershed(image: np.ndarray) -> np.ndarray:
    grey = image.mean(axis=2)
    if np.median(grey) > 0.5:  # bright background (brightfield / histology): nuclei are dark
        grey = grey.max() - grey
    mask = grey > threshold_otsu(grey)
    mask = ndi.binary_opening(mask, iterations=1)
    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=4, labels=ndi.label(mask)[0], exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, samples = find_samples(args.data)
    _, val = split([s.name for s in samples], 0.2, args.seed)
    items = load_items([s for s in samples if s.name in set(val)], progress=False)
    rows = {}
    for name, image, labels in items:
        kind = image_type(image)
        preds = {f"perfect {d}": instances(perfect_maps(labels, d), d, {"min_size": 0, "flow_seed": 10})
                 for d in ("semantic", "contour", "distance", "flow")}  # flow: seeds where 10 flow paths end
        preds["otsu + distance watershed"] = otsu_watershed(image)
        for method, pred in preds.items():
            m = instance_metrics(labels, pred)
            rows.setdefault(method, []).append((kind, m["dsb_score"], m["ap50"]))
    print(f"{len(items)} validation images (seed {args.seed})")
    print(f"{'method':<28} {'DSB':>6} {'AP@0.5':>7}   per type DSB")
    for method, r in rows.items():
        by_type = {t: np.mean([x[1] for x in r if x[0] == t]) for t in sorted({x[0] for x in r})}
        print(f"{method:<28} {np.mean([x[1] for x in r]):6.3f} {np.mean([x[2] for x in r]):7.3f}   "
              + ", ".join(f"{t} {v:.3f}" for t, v in by_type.items()))


if __name__ == "__main__":
    main()
