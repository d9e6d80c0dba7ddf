"""Does zooming images help on DSB2018? Scores a model on its validation split with every image zoomed
by a fixed factor through ``Model.predict(diameter=...)`` (diameter = trained diameter / factor), per
image type. Factor 1 is the plain prediction.

    .venv/bin/python benchmarks/bench_zoom.py --model runs/split-distance-24/model \
        --data ../shared/data/dsb2018-stage1-train --factors 1 1.5 2 0.75
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from nucleiseg.data import find_samples, read_sample_labels
from nucleiseg.evaluate import IMAGE_TYPES, image_type
from nucleiseg.io import read_image
from nucleiseg.metrics import instance_metrics
from nucleiseg.model import Model
from nucleiseg.transforms import normalize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    args = parser.parse_args()
    model = Model.load(args.model, backend="onnx")
    model.config.setdefault("nucleus_diameter", 19.61)  # runs made before the diameter was recorded
    wanted = set(model.config["data"]["val"])
    _, samples = find_samples(args.data)
    data = [(read_image(s.image), read_sample_labels(s)) for s in samples if s.name in wanted]
    types = [image_type(normalize(image, model.config["normalization"])) for image, _ in data]
    print(f"{len(data)} validation images; trained nucleus diameter {model.config['nucleus_diameter']} px")
    print("factor  seconds     DSB   AP@0.5  " + "  ".join(f"DSB {t[:5]}" for t in IMAGE_TYPES))
    for factor in args.factors:
        started = time.perf_counter()
        diameter = None if factor == 1 else model.config["nucleus_diameter"] / factor
        scores = [instance_metrics(labels, model.predict(image, diameter=diameter)) for image, labels in data]
        by_type = [np.mean([s["dsb_score"] for s, t in zip(scores, types) if t == name]) for name in IMAGE_TYPES]
        print(f"{factor:6.2f} {time.perf_counter() - started:8.1f} {np.mean([s['dsb_score'] for s in scores]):7.3f} "
              f"{np.mean([s['ap50'] for s in scores]):8.3f}  " + "  ".join(f"{v:9.3f}" for v in by_type), flush=True)


if __name__ == "__main__":
    main()
