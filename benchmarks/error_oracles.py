"""Where a distance model's instance errors come from: its validation maps with one part replaced by
the truth, each through the same post-processing and thresholds. The gain of an oracle bounds what
improving that part alone could bring.

- true contact map (where touching nuclei meet) as a contact channel: the contact design's ceiling;
- one true marker per nucleus (its centre, distance > 0.7): seeds perfect, mask and flooding learnt;
- true nucleus mask: pixels perfect, seeds from the learnt distance map.

Then the misses and false detections at IoU 0.5 of the model as it predicts, by object size.

    .venv/bin/python benchmarks/error_oracles.py --model runs/ft-split-cosine/model --data ../shared/data/dsb2018-stage1-train
"""
from __future__ import annotations

import argparse

import numpy as np
from skimage.measure import label as connected_components
from skimage.segmentation import watershed

from nucleiseg.evaluate import annotated_items
from nucleiseg.metrics import instance_metrics, iou_matrix
from nucleiseg.model import load
from nucleiseg.postprocess import instances, remove_small
from nucleiseg.targets import contact_map, normalised_distance


def true_markers(maps: np.ndarray, labels: np.ndarray, t: dict) -> np.ndarray:
    """Instances seeded by one marker per true nucleus (where its normalised distance exceeds 0.7),
    flooded over the learnt mask and distance map; mask parts no marker reaches stay objects."""
    mask = (1 - maps[0]) > t["mask"]
    markers = np.where(mask & (normalised_distance(labels) > 0.7), labels, 0)
    seeded = watershed(-maps[2], markers, mask=mask).astype(np.int32)
    orphans = connected_components(mask & (seeded == 0), connectivity=1)
    seeded[orphans > 0] = orphans[orphans > 0] + seeded.max()
    return remove_small(seeded, int(t["min_size"]))


SIZE_BINS = (0, 25, 40, 80, 160, np.inf)  # object area in pixels


def errors_by_size(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per size bin: true objects, of them missed (no prediction with IoU > 0.5), predicted objects,
    of them false (no true object with IoU > 0.5); and the missed true objects of exactly 21 pixels."""
    iou = iou_matrix(true, pred)
    area_true = np.bincount(true.ravel())[1:]
    area_true = area_true[area_true > 0]
    area_pred = np.bincount(pred.ravel())[1:]
    area_pred = area_pred[area_pred > 0]
    missed = iou.max(axis=1) <= 0.5 if iou.shape[1] else np.ones(len(area_true), bool)
    false = iou.max(axis=0) <= 0.5 if iou.shape[0] else np.ones(len(area_pred), bool)
    hist = lambda a: np.histogram(a, SIZE_BINS)[0]  # noqa: E731
    return (hist(area_true), hist(area_true[missed]), hist(area_pred), hist(area_pred[false]),
            int((area_true[missed] == 21).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a distance-design model folder with a validation split")
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    model = load(args.model, backend="onnx")
    if model.design != "distance":
        raise SystemExit(f"{args.model}: a distance-design model is needed, not {model.design!r}")
    items = annotated_items(model, args.data, None, "val", False, [])
    t = model.thresholds
    variants = {
        "learnt (as predicted)": lambda m, lab: instances(m, "distance", t),
        "+ true contact map as contact channel": lambda m, lab: instances(
            np.concatenate([m, contact_map(lab)[None]]), "contact", {**t, "contact": 0.5}),
        "+ one true marker per nucleus": lambda m, lab: true_markers(m, lab, t),
        "+ true nucleus mask": lambda m, lab: instances(np.stack([(lab == 0).astype(np.float32), (lab > 0).astype(np.float32), m[2]]),
                                                       "distance", t),
    }
    scores = {name: [] for name in variants}
    sizes = []
    for _, image, labels in items:
        maps = model.maps_from_normalized(image)
        for name, fn in variants.items():
            pred = fn(maps, labels)
            r = instance_metrics(labels, pred)
            scores[name].append((r["dsb_score"], r["ap50"]))
            if name.startswith("learnt"):
                sizes.append(errors_by_size(labels, pred))
    print(f"{len(items)} validation images, model {args.model}, thresholds {t}")
    print(f"{'variant':42s} {'DSB':>6s} {'AP@0.5':>7s}")
    for name, s in scores.items():
        dsb, ap50 = np.mean(s, axis=0)
        print(f"{name:42s} {dsb:6.3f} {ap50:7.3f}")
    n_true, missed, n_pred, false = (np.sum([s[i] for s in sizes], axis=0) for i in range(4))
    print(f"\nas predicted, at IoU 0.5, by object area (pixels); missed true objects of exactly 21 px: "
          f"{sum(s[4] for s in sizes)}")
    print(f"{'area':>10s} {'true':>6s} {'missed':>7s} {'predicted':>10s} {'false':>6s}")
    for i, (lo, hi) in enumerate(zip(SIZE_BINS[:-1], SIZE_BINS[1:])):
        print(f"{f'{lo}-{hi}' if np.isfinite(hi) else f'>= {lo}':>10s} {n_true[i]:6d} {missed[i]:7d} {n_pred[i]:10d} {false[i]:6d}")


if __name__ == "__main__":
    main()
