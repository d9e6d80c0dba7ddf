"""Automatic nucleus size on magnified images: the validation split of a model, every image and its
labels enlarged by a factor (as a higher-magnification microscope would show them), segmented three
ways: as it is (``diameter=None``), with the measured size (``diameter='auto'``, the default) and with
the true median diameter given. Factor 1 checks that 'auto' leaves DSB2018's own images alone.

    .venv/bin/python benchmarks/bench_magnified.py --model runs/ft-split-fullres/model \
        --data ../shared/data/dsb2018-stage1-train --factors 1 2 3 4 --every 1 3 3 3
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage as ndi
from skimage.transform import rescale

from nucleiseg.data import find_samples, median_diameter, read_sample_labels
from nucleiseg.io import read_image
from nucleiseg.metrics import instance_metrics
from nucleiseg.model import Model


def magnified(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Image (linear interpolation) and labels (nearest) enlarged by ``factor``."""
    if factor == 1:
        return image, labels
    big = rescale(image.astype(np.float32), factor, order=1, channel_axis=-1 if image.ndim == 3 else None,
                  preserve_range=True)
    return big.astype(np.float32), ndi.zoom(labels, factor, order=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder with a validation split")
    parser.add_argument("--data", required=True)
    parser.add_argument("--factors", type=float, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--every", type=int, nargs="+", default=[1, 3, 3, 3],
                        help="use every n-th validation image, per factor (large factors are slow)")
    args = parser.parse_args()
    model = Model.load(args.model, backend="onnx")
    wanted = set(model.config["data"]["val"])
    _, samples = find_samples(args.data)
    samples = [s for s in samples if s.name in wanted]
    print(f"model {args.model}, trained nucleus diameter {model.config['nucleus_diameter']} px")
    print(f"{'factor':>6s} {'images':>6s} {'AP@0.5 as is':>13s} {'auto':>6s} {'given':>6s} {'zoomed by auto':>15s} "
          f"{'DSB as is':>10s} {'auto':>6s} {'s as is':>8s} {'s auto':>7s}")
    for factor, every in zip(args.factors, args.every):
        scores = {"as is": [], "auto": [], "given": []}
        seconds = {"as is": 0.0, "auto": 0.0}
        zoomed = 0
        for s in samples[::every]:
            image, labels = magnified(read_image(s.image), read_sample_labels(s), factor)
            started = time.perf_counter()
            scores["as is"].append(instance_metrics(labels, model.predict(image, diameter=None)))
            seconds["as is"] += time.perf_counter() - started
            started = time.perf_counter()  # what diameter='auto' does, with the decision kept for counting
            measured = model.auto_diameter(image)
            scores["auto"].append(instance_metrics(labels, model.predict(image, diameter=measured)))
            seconds["auto"] += time.perf_counter() - started
            zoomed += measured is not None
            given = scores["as is"][-1] if factor == 1 else instance_metrics(
                labels, model.predict(image, diameter=median_diameter([labels])))
            scores["given"].append(given)
        mean = {k: (np.mean([r["ap50"] for r in v]), np.mean([r["dsb_score"] for r in v])) for k, v in scores.items()}
        print(f"{factor:6.2f} {len(scores['auto']):6d} {mean['as is'][0]:13.3f} {mean['auto'][0]:6.3f} {mean['given'][0]:6.3f} "
              f"{zoomed:15d} {mean['as is'][1]:10.3f} {mean['auto'][1]:6.3f} {seconds['as is']:8.1f} {seconds['auto']:7.1f}",
              flush=True)


if __name__ == "__main__":
    main()
