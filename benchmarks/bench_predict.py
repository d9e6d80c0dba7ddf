"""Prediction speed and memory, end to end (read -> predict -> post-process -> write all outputs).

Cases: a folder of 256x256 images, the mixed-size DSB validation images, one 2048x2048 and one
8000x8000 image (time and peak memory, each in a fresh process), torch eager vs onnxruntime.

    .venv/bin/python benchmarks/bench_predict.py --data ../shared/data/dsb2018-stage1-train

Without --data (or when it is missing) synthetic nuclei images stand in for the DSB ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from PIL import Image  # noqa: E402

import nucleiseg  # noqa: E402
from nucleiseg.batch import Options, predict_files  # noqa: E402
from nucleiseg.synthetic import mosaic, nuclei_image  # noqa: E402

BIG_IMAGE_CHILD = r"""
import json, resource, sys, time, os
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
t0 = time.perf_counter()
import nucleiseg
from pathlib import Path
from nucleiseg.batch import Options, predict_one
model = nucleiseg.load(sys.argv[3] or None)
if sys.argv[2] != "torch":
    model.use_backend(sys.argv[2])
t1 = time.perf_counter()
r = predict_one(model, Path(sys.argv[1]), "big", Options(Path(sys.argv[4]), overwrite=True))
t2 = time.perf_counter()
print(json.dumps({"status": r.status, "error": r.error, "nuclei": r.n_nuclei, "predict_write_s": t2 - t1,
                  "startup_and_load_s": t1 - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def folder_of(images: list[tuple[str, np.ndarray]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, img in images:
        p = folder / f"{name}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def dsb_validation(data: Path | None, model) -> list[Path]:
    """The model's validation images if the DSB folder is there (mixed sizes)."""
    names = model.config.get("data", {}).get("val") or []
    if data is None or not (data / "images").is_dir():
        return []
    if not names:  # a model trained on all data: use the recorded split of the benchmark run
        names = sorted(p.stem for p in (data / "images").glob("*.png"))[::5]
    return [data / "images" / f"{n}.png" for n in names if (data / "images" / f"{n}.png").exists()]


def throughput(model, paths: list[Path], out: Path, repeat_warmup: bool = True) -> dict:
    if repeat_warmup:  # first call pays one-off costs (ONNX session, allocations)
        predict_files(model, paths[:2], Options(out / "warmup", overwrite=True), progress=False, report=lambda m: None)
    started = time.perf_counter()
    results = predict_files(model, paths, Options(out, overwrite=True), progress=False, report=print)
    elapsed = time.perf_counter() - started
    failed = [r for r in results if r.status != "done"]
    return {"images": len(paths), "seconds": round(elapsed, 2), "images_per_s": round(len(paths) / elapsed, 2),
            "failed": len(failed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n256", type=int, default=100)
    parser.add_argument("--skip-8000", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results_predict.json"))
    args = parser.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="nucleiseg-bench-"))
    model = nucleiseg.load(args.model)
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                               f"torch threads {torch.get_num_threads()}", "python": platform.python_version()}
    try:
        val = dsb_validation(args.data, model)
        small = [p for p in val if Image.open(p).size == (256, 256)][: args.n256]
        if len(small) < args.n256:
            synth = [(f"syn{i:03d}", (nuclei_image((256, 256), n=30, seed=i)[0] // 257).astype(np.uint8))
                     for i in range(args.n256 - len(small))]
            small += folder_of(synth, work / "synthetic256")
        report["source_256"] = f"{sum('synthetic' not in str(p) for p in small)} DSB + " \
                               f"{sum('synthetic' in str(p) for p in small)} synthetic 256x256 images"
        for backend in ("torch", "onnx"):
            model.use_backend(backend)
            report[f"256x256_{backend}"] = throughput(model, small, work / f"out256_{backend}")
            if val:
                report[f"dsb_val_mixed_{backend}"] = throughput(model, val, work / f"outval_{backend}")
            print(json.dumps({k: v for k, v in report.items() if backend in k}, indent=1), flush=True)
        for side in ([2048] if args.skip_8000 else [2048, 8000]):
            image, _ = mosaic((side, side), seed=side)
            path = work / f"mosaic{side}.tif"
            tifffile.imwrite(path, image)
            del image
            for backend in ("onnx",) if side > 2048 else ("torch", "onnx"):
                cmd = [sys.executable, "-c", BIG_IMAGE_CHILD, str(path), backend, args.model or "", str(work / f"big{side}")]
                # model loading (and a first ONNX export) is timed apart from predict + write
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                report[f"{side}x{side}_{backend}"] = json.loads(out.stdout.strip().splitlines()[-1])
                print(side, backend, report[f"{side}x{side}_{backend}"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
