"""Throughput with 1 vs 2 local Dask workers on the same folder, beside the single-process run.

    .venv/bin/python benchmarks/bench_workers.py [--n 120]

Each worker is a process with its own model; on this machine each gets cpu_count / workers threads.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import nucleiseg  # noqa: E402
from nucleiseg.batch import Options, predict_files  # noqa: E402
from nucleiseg.distributed import predict_files_dask  # noqa: E402
from nucleiseg.synthetic import nuclei_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--backend", default="onnx")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nucleiseg-workers-"))
    paths = []
    for i in range(args.n):
        p = work / "in" / f"im{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray((nuclei_image((256, 256), n=30, seed=i)[0] // 257).astype(np.uint8)).save(p)
        paths.append(p)
    report = {"images": args.n, "size": "256x256 synthetic", "cpus": os.cpu_count(), "backend": args.backend}
    try:
        model = nucleiseg.load()
        model.use_backend(args.backend)
        predict_files(model, paths[:2], Options(work / "warm", overwrite=True), progress=False)
        t = time.perf_counter()
        predict_files(model, paths, Options(work / "single", overwrite=True), progress=False)
        report["single_process_images_per_s"] = round(args.n / (time.perf_counter() - t), 2)
        for workers in (1, 2):
            t = time.perf_counter()
            predict_files_dask(None, paths, Options(work / f"dask{workers}", overwrite=True), n_workers=workers,
                               backend=args.backend, progress=False)
            report[f"dask_{workers}_workers_images_per_s_incl_startup"] = round(args.n / (time.perf_counter() - t), 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
