"""Would thresholds tuned per image type (fluorescence / brightfield / histology) beat one set for all?

On a model's validation split: (1) in-sample, each type's thresholds tuned on its own validation images,
starting from the model's; (2) held out, 2-fold cross-validation over the images (halves stratified by type,
repeated): one set tuned on a half (starting from the model's), then per type on that half for the types with
at least ``--min-images`` images there (starting from the half's set), both scored on the other half, with
the watershed alone and with the model's object scorer. Same coordinate search as ``nucleiseg tune``.

    .venv/bin/python benchmarks/bench_thresholds_by_type.py --model runs/split-scorer/model \
        --data ../shared/data/dsb2018-stage1-train [--tta] --reps 2 --min-images 8
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from nucleiseg.evaluate import IMAGE_TYPES, annotated_items, tune_thresholds
from nucleiseg.metrics import instance_metrics
from nucleiseg.model import Model

RECORD_KEYS = ("tuned_dsb_score", "tuned_on")


def scores(model: Model, maps: list, truths: list, idx, thresholds_of, scorer: bool) -> np.ndarray:
    """(n, 2) DSB score and AP@0.5 of images ``idx``, each segmented with ``thresholds_of(index)``."""
    out = []
    for i in idx:
        t = {**thresholds_of(i), "object_scorer": 1 if scorer else 0}
        m = instance_metrics(truths[i], model.segment(maps[i], t))
        out.append((m["dsb_score"], m["ap50"]))
    return np.array(out).reshape(-1, 2)


def tuned(model: Model, maps: list, truths: list, idx, start: dict, workers: int) -> dict:
    t = tune_thresholds([maps[i] for i in idx], [truths[i] for i in idx], model.design, start=start, workers=workers)
    return {k: v for k, v in t.items() if k not in RECORD_KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder with the validation split in its config")
    ap.add_argument("--data", required=True)
    ap.add_argument("--tta", action="store_true", help="maps averaged over the 8 flips (the model's TTA thresholds)")
    ap.add_argument("--reps", type=int, default=2, help="random 2-fold splits")
    ap.add_argument("--min-images", type=int, default=8, help="tune a type on its own only with this many images in the half")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    model = Model.load(args.model)
    types_by_name: dict[str, str] = {}
    items = annotated_items(model, args.data, None, "val", False, [], types_by_name)
    started = time.perf_counter()
    maps = [model.maps_from_normalized(image, tta=args.tta) for _, image, _ in items]
    truths = [true for _, _, true in items]
    types = np.array([types_by_name[name] for name, _, _ in items])
    base = {k: v for k, v in model.thresholds_for(args.tta).items() if k not in RECORD_KEYS}
    print(f"{len(items)} validation images ({', '.join(f'{t} {(types == t).sum()}' for t in IMAGE_TYPES)}); "
          f"maps in {time.perf_counter() - started:.0f} s; tta={args.tta}", flush=True)

    every = np.arange(len(items))
    own = {t: tuned(model, maps, truths, np.flatnonzero(types == t), base, args.workers) for t in IMAGE_TYPES if (types == t).any()}
    for t, th in own.items():
        changed = {k: v for k, v in th.items() if base.get(k) != v}
        print(f"in-sample, {t}: changed {changed}")
    for scorer in (False, True):
        one = scores(model, maps, truths, every, lambda i: base, scorer)
        per = scores(model, maps, truths, every, lambda i: own[types[i]], scorer)
        print(f"in-sample, {'object scorer' if scorer else 'watershed'}: one set DSB {one[:, 0].mean():.4f} AP@0.5 "
              f"{one[:, 1].mean():.4f}; per type DSB {per[:, 0].mean():.4f} AP@0.5 {per[:, 1].mean():.4f}", flush=True)

    gains = {False: [], True: []}
    for rep in range(args.reps):
        rng = np.random.default_rng(rep)
        half = np.zeros(len(items), bool)
        for t in IMAGE_TYPES:
            idx = rng.permutation(np.flatnonzero(types == t))
            half[idx[: (len(idx) + int(rng.integers(2))) // 2]] = True
        for fit, test in ((half, ~half), (~half, half)):
            fit_idx, test_idx = np.flatnonzero(fit), np.flatnonzero(test)
            one_set = tuned(model, maps, truths, fit_idx, base, args.workers)
            per_type = {t: tuned(model, maps, truths, [i for i in fit_idx if types[i] == t], one_set, args.workers)
                        for t in IMAGE_TYPES if sum(types[i] == t for i in fit_idx) >= args.min_images}
            line = [f"split {rep}, {len(fit_idx)} -> {len(test_idx)} images, own sets for {sorted(per_type)}:"]
            for scorer in (False, True):
                one = scores(model, maps, truths, test_idx, lambda i: one_set, scorer)
                per = scores(model, maps, truths, test_idx, lambda i: per_type.get(types[i], one_set), scorer)
                gains[scorer].append(per - one)
                line.append(f"{'scorer' if scorer else 'watershed'} DSB {one[:, 0].mean():.4f} -> {per[:, 0].mean():.4f}, "
                            f"AP@0.5 {one[:, 1].mean():.4f} -> {per[:, 1].mean():.4f}")
            print(" ".join(line), flush=True)
    for scorer, g in gains.items():
        if not g:  # --reps 0: in-sample only
            continue
        g = np.concatenate(g)
        print(f"held out, {'object scorer' if scorer else 'watershed'}: per-type minus one set, mean per image "
              f"DSB {g[:, 0].mean():+.4f}, AP@0.5 {g[:, 1].mean():+.4f} ({len(g)} image scorings)")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
