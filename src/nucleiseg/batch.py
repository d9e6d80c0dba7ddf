"""Predicting many files: collecting inputs, one bad file never stops the run, resume, run summary.

:func:`predict_files` is what ``nucleiseg predict`` runs; :func:`predict_one` is the unit of work
(also used by the Dask workers in :mod:`nucleiseg.distributed`).
"""
from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .io import DEFAULT_MAX_PIXELS, ImageError, is_image_file, read_image
from .outputs import DEFAULT_OUTPUTS, output_paths, rle_rows, write_outputs


class InputError(ValueError):
    """The inputs given on the command line cannot be used (nothing found, not writable ...)."""


def collect_inputs(inputs: list[str], recursive: bool = False) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of image paths (no duplicates).

    Files named explicitly are kept whatever their extension (so a bad one is reported); folders and
    patterns contribute files with an image extension only.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and is_image_file(p) and not p.name.startswith("."))
            if not files:
                raise InputError(f"{path}: no image files (.png, .tif, .tiff, .jpg, .jpeg) in this folder")
            found += files
        elif any(ch in item for ch in "*?["):
            files = sorted(Path(p) for p in glob.glob(item, recursive=True) if is_image_file(p) and Path(p).is_file())
            if not files:
                raise InputError(f"{item}: the pattern matches no image files")
            found += files
        elif path.exists() or path.suffix:
            found.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise InputError("no input images given")
    return unique


def unique_stems(paths: list[Path]) -> dict[Path, str]:
    """Output name stem per input; files with equal stems in different folders get a parent prefix."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    return {p: (p.stem if counts[p.stem] == 1 else f"{p.parent.name}_{p.stem}") for p in paths}


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and make sure files can be written there (before any work is done)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".nucleiseg-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{out_dir}: output folder is not writable ({exc.strerror or exc})") from None


def remove_stale_partials(out_dir: Path) -> int:
    """Delete temporary files a killed run left behind (``.<name>.<random>.part<ext>``); returns the count."""
    stale = [p for p in out_dir.glob(".*.part*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


@dataclass
class Result:
    """Outcome for one input file."""

    path: Path
    stem: str
    status: str  # 'done', 'skipped' (already complete, --resume) or 'failed'
    n_nuclei: int = 0
    mean_area: float = 0.0
    seconds: float = 0.0
    error: str = ""
    rle: list = field(default_factory=list)


@dataclass
class Options:
    """Per-file prediction settings (the same for every file of a run)."""

    out_dir: Path
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    channel: int | None = None
    tta: bool = False
    tile_size: int | None = None
    overwrite: bool = False
    resume: bool = False
    rle: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    diameter: float | str | None = "auto"  # typical nucleus diameter (pixels); 'auto': measured; None: as it is
    thresholds: dict = field(default_factory=dict)  # overrides of the model's tuned thresholds


def predict_one(model, path: Path, stem: str, opts: Options) -> Result:
    """Read, segment and write one file; any problem with the file becomes a failed Result."""
    started = time.perf_counter()
    paths = output_paths(opts.out_dir, stem, opts.outputs)
    existing = [p for p in paths.values() if p.exists()]
    if existing and not opts.overwrite:
        if opts.resume and len(existing) == len(paths) and not opts.rle:
            return Result(path, stem, "skipped")
        if not opts.resume:
            return Result(path, stem, "failed", error=f"{path}: output {existing[0].name} exists (use --overwrite or --resume)")
    try:
        image = read_image(path, channel=opts.channel, max_pixels=opts.max_pixels)
        labels = model.predict(image, tta=opts.tta, tile_size=opts.tile_size, thresholds=opts.thresholds,
                               diameter=opts.diameter)
        write_outputs(opts.out_dir, stem, image, labels, opts.outputs)
    except ImageError as exc:
        return Result(path, stem, "failed", error=str(exc), seconds=time.perf_counter() - started)
    except MemoryError:
        return Result(path, stem, "failed", error=f"{path}: out of memory (try a smaller --tile-size)")
    n = int(labels.max())
    area = float((labels > 0).sum() / n) if n else 0.0
    return Result(path, stem, "done", n, area, time.perf_counter() - started,
                  rle=rle_rows(stem, labels) if opts.rle else [])


def write_run_files(results: list[Result], opts: Options) -> list[Path]:
    """The run summary CSV (image, status, nuclei, mean area, seconds, error) and optional RLE CSV."""
    from .io import atomic_path
    from .outputs import csv_text

    written = []
    header = ["image", "status", "n_nuclei", "mean_area", "seconds", "error"]
    rows = [[str(r.path), r.status, r.n_nuclei, f"{r.mean_area:.2f}", f"{r.seconds:.3f}", r.error] for r in results]
    summary = opts.out_dir / "summary.csv"
    with atomic_path(summary) as tmp:
        tmp.write_text(csv_text(header, rows))
    written.append(summary)
    if opts.rle:
        rle = opts.out_dir / "submission_rle.csv"
        with atomic_path(rle) as tmp:
            tmp.write_text(csv_text(["ImageId", "EncodedPixels"], [row for r in results for row in r.rle]))
        written.append(rle)
    return written


def predict_files(model, paths: list[Path], opts: Options, progress: bool = True, report=print) -> list[Result]:
    """Predict every file, reporting failures in one line each as they happen; write run files."""
    from tqdm.auto import tqdm

    check_writable(opts.out_dir)
    remove_stale_partials(opts.out_dir)
    stems = unique_stems(paths)
    results = []
    for path in tqdm(paths, desc="predicting", unit="image", disable=not progress):
        result = predict_one(model, path, stems[path], opts)
        if result.status == "failed":
            report(f"error: {result.error}")
        results.append(result)
    write_run_files(results, opts)
    return results
