"""Post-processing speed alone (maps -> labels) of the bundled model: the tuned watershed, and with the object scorer.

The network's maps are computed first (not timed); then each case is timed best of ``--repeat``:
one 2048x2048 synthetic mosaic, and the first 100 DSB images (or 40 synthetic 256x256 images without --data).

    .venv/bin/python benchmarks/bench_postprocess.py --data ../shared/data/dsb2018-stage1-train
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python benchmarks/bench_postprocess.py ...   # another version
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

import nucleiseg  # noqa: E402
from nucleiseg.evaluate import annotated_items  # noqa: E402
from nucleiseg.model import load  # noqa: E402
from nucleiseg.postprocess import instances  # noqa: E402
from nucleiseg.synthetic import mosaic, nuclei_image  # noqa: E402


def best_time(fn, maps: list[np.ndarray], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for m in maps:
            fn(m)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="DSB2018 stage-1 train folder (its first 100 images, in name order)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    model = load(None, backend="onnx")
    th = model.thresholds_for()
    if args.data and Path(args.data).is_dir():
        items = annotated_items(model, args.data, None, "all", False, [])[:100]
        name = f"{len(items)} DSB images"
        small = [model.maps_from_normalized(image) for _, image, _ in items]
    else:
        name = "40 synthetic 256x256 images"
        small = [model.predict_maps(nuclei_image(seed=s)[0]) for s in range(40)]
    big = [model.predict_maps(mosaic((2048, 2048), seed=2048)[0])]
    print(f"nucleiseg {nucleiseg.__file__} on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"object scorer: {'yes' if model.scorer else 'no'}")
    for label, maps in (("2048x2048 mosaic", big), (name, small)):
        alone = best_time(lambda m: instances(m, model.design, th), maps, args.repeat)
        scored = best_time(lambda m: model.segment(m, th), maps, args.repeat)
        print(f"{label}: watershed alone {alone:.2f} s, with the object scorer {scored:.2f} s")


if __name__ == "__main__":
    main()
