"""Flow seeds against distance seeds on one flow-design network: its validation maps through the flow
design's post-processing (instances from where the centre flows end) and through the distance design's
(watershed seeded by distance peaks, from the same network's first three maps), each with thresholds
tuned on these maps for the DSB score. Same network, same mask: only the way nuclei are separated differs.

    .venv/bin/python benchmarks/flow_vs_distance.py --model runs/flow-split-36/model --data ../shared/data/dsb2018-stage1-train
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from nucleiseg.evaluate import annotated_items, image_type, tune_thresholds
from nucleiseg.metrics import instance_metrics
from nucleiseg.model import load
from nucleiseg.postprocess import instances


def score(maps: list[np.ndarray], truth: list[np.ndarray], kinds: list[str], design: str, thresholds: dict) -> dict:
    """Mean DSB / AP@0.5 / F1@0.5 over images, per image type, and post-processing seconds per image."""
    started = time.perf_counter()
    rows = [instance_metrics(t, instances(m, design, thresholds)) for m, t in zip(maps, truth)]
    seconds = (time.perf_counter() - started) / len(maps)
    out = {"all": {k: np.mean([r[k] for r in rows]) for k in ("dsb_score", "ap50", "f1_50")}, "seconds": seconds}
    for kind in sorted(set(kinds)):
        pick = [r for r, k in zip(rows, kinds) if k == kind]
        out[kind] = {k: np.mean([r[k] for r in pick]) for k in ("dsb_score", "ap50")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a flow-design model folder with a validation split")
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    model = load(args.model)
    if model.design != "flow":
        raise SystemExit(f"{args.model}: design {model.design!r}, expected 'flow'")
    items = annotated_items(model, args.data, None, "val", False, [])
    maps = [model.maps_from_normalized(image) for _, image, _ in items]
    truth = [it[2] for it in items]
    kinds = [image_type(it[1]) for it in items]
    print(f"{len(items)} validation images of {args.model}")
    for design, channels in (("flow", slice(None)), ("distance", slice(0, 3))):
        m = [x[channels] for x in maps]
        tuned = tune_thresholds(m, truth, design, start=model.thresholds)
        s = score(m, truth, kinds, design, tuned)
        used = {k: v for k, v in tuned.items() if not k.startswith("tuned")}
        print(f"{design:>8} seeds: DSB {s['all']['dsb_score']:.3f}  AP@0.5 {s['all']['ap50']:.3f}  F1@0.5 {s['all']['f1_50']:.3f}  "
              f"({s['seconds']:.2f} s/image)  " + ", ".join(f"{k} {v['dsb_score']:.3f} / {v['ap50']:.3f}"
                                                       for k, v in s.items() if k not in ("all", "seconds")))
        print(f"          thresholds {used}")


if __name__ == "__main__":
    main()
