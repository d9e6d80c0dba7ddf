"""Same nuclei, other bit depth: DSB2018 fluorescence validation images re-encoded as a 12-bit camera
would store them (uint16 TIFF, offset 100, about 14 grey levels per 8-bit step) must segment like the
8-bit originals. Prints AP@0.5 of both and the fraction of pixels whose mask agrees.

    .venv/bin/python benchmarks/bench_bitdepth.py --data ../shared/data/dsb2018-stage1-train
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from nucleiseg.data import find_samples, read_sample_labels
from nucleiseg.evaluate import image_type
from nucleiseg.io import read_image
from nucleiseg.metrics import instance_metrics
from nucleiseg.model import Model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=30, help="fluorescence validation images to use")
    args = parser.parse_args()
    model = Model.load(backend="onnx")
    val = set(model.config["data"]["threshold_run_val"])  # never trained on by the split run
    _, samples = find_samples(args.data)
    ap8, ap16, agree = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for sample in samples:
            if sample.name not in val:
                continue
            image = read_image(sample.image)
            grey = (image if image.ndim == 2 else image[..., :3].mean(axis=2)).astype(np.float32)
            if image_type(grey / 255.0) != "fluorescence":
                continue
            path = Path(tmp) / f"{sample.name}.tif"
            tifffile.imwrite(path, (100 + grey * 14).astype(np.uint16))
            true = read_sample_labels(sample)
            pred8, pred16 = model.predict(grey.astype(np.uint8)), model.predict(read_image(path))
            ap8.append(instance_metrics(true, pred8)["ap50"])
            ap16.append(instance_metrics(true, pred16)["ap50"])
            agree.append(float(np.mean((pred8 > 0) == (pred16 > 0))))
            if len(ap8) == args.n:
                break
    print(f"{len(ap8)} fluorescence validation images: AP@0.5 8-bit PNG {np.mean(ap8):.4f}, "
          f"12-bit-in-uint16 TIFF {np.mean(ap16):.4f}; mask agreement min {min(agree):.4f}, mean {np.mean(agree):.4f}")


if __name__ == "__main__":
    main()
