"""Public datasets: download (resumable, checksum-verified) and conversion to the images/ + labels/ layout.

``dsb2018``: BBBC038 (Kaggle 2018 Data Science Bowl, CC0) from the Broad Bioimage Benchmark Collection —
stage1_train (images + one mask PNG per nucleus), stage1_test (images) and stage1_solution.csv (the
test set's run-length-encoded nuclei). Result::

    DEST/dsb2018/stage1_train/{images,labels}/<id>.png
    DEST/dsb2018/stage1_test/{images,labels}/<id>.png

Checksums: files listed with a SHA-256 in :data:`DSB2018_FILES` are verified against it. The BBBC
server publishes none, so for files without a pinned hash the first complete download records its
SHA-256 in ``DEST/dsb2018/SHA256SUMS`` and every later run verifies against that record.
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np

from .download import DownloadError, fetch, safe_extract_zip, sha256sum
from .io import read_image, read_labels, write_png

BBBC038_URL = "https://data.broadinstitute.org/bbbc/BBBC038"
# file name -> pinned SHA-256 (None: not published; recorded on first download, see module docstring)
DSB2018_FILES: dict[str, str | None] = {"stage1_train.zip": None, "stage1_test.zip": None, "stage1_solution.csv": None}


def _read_sums(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())}


def _write_sums(path: Path, sums: dict[str, str]) -> None:
    path.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))


def fetch_verified(base_url: str, name: str, folder: Path, pinned: str | None, quiet: bool) -> Path:
    """Download ``base_url/name`` into ``folder``, checked against the pinned or recorded SHA-256."""
    sums_file = folder.parent / "SHA256SUMS"
    recorded = _read_sums(sums_file)
    expected = pinned or recorded.get(name)
    path = fetch(f"{base_url.rstrip('/')}/{name}", folder / name, sha256=expected, quiet=quiet)
    if expected is None:
        recorded[name] = sha256sum(path)
        _write_sums(sums_file, recorded)
    return path


def labels_from_kaggle_folder(sample_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image, uint16 instance labels) from ``<id>/images/<id>.png`` + ``<id>/masks/*.png``."""
    images = sorted((sample_dir / "images").glob("*.png"))
    if len(images) != 1:
        raise DownloadError(f"{sample_dir}: expected one image in images/, found {len(images)}")
    image = read_image(images[0])
    labels = np.zeros(image.shape[:2], np.uint16)
    for i, mask_path in enumerate(sorted((sample_dir / "masks").glob("*.png")), start=1):
        mask = read_labels(mask_path) > 0
        if mask.shape != labels.shape:
            raise DownloadError(f"{mask_path}: mask size {mask.shape} differs from its image {labels.shape}")
        labels[mask & (labels == 0)] = i
    return images[0], labels


def convert_train(extracted: Path, out: Path) -> int:
    """Kaggle stage1_train folders -> ``out/images`` (original files) + ``out/labels`` (uint16 PNG)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    n = 0
    for sample_dir in sorted(p for p in extracted.iterdir() if (p / "images").is_dir()):
        image_path, labels = labels_from_kaggle_folder(sample_dir)
        shutil.copyfile(image_path, out / "images" / f"{sample_dir.name}.png")
        write_png(out / "labels" / f"{sample_dir.name}.png", labels)
        n += 1
    return n


def convert_test(extracted: Path, solution_csv: Path, out: Path) -> int:
    """stage1_test images + run-length-encoded solution -> ``out/images`` + ``out/labels``."""
    from .outputs import rle_decode

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    nuclei: dict[str, list[tuple[str, int, int]]] = {}
    with open(solution_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            nuclei.setdefault(row["ImageId"], []).append((row["EncodedPixels"], int(row["Height"]), int(row["Width"])))
    n = 0
    for sample_dir in sorted(p for p in extracted.iterdir() if (p / "images").is_dir()):
        images = sorted((sample_dir / "images").glob("*.png"))
        if len(images) != 1 or sample_dir.name not in nuclei:
            continue
        height, width = nuclei[sample_dir.name][0][1:]
        labels = np.zeros((height, width), np.uint16)
        for i, (rle, h, w) in enumerate(nuclei[sample_dir.name], start=1):
            labels[rle_decode(rle, (h, w)) & (labels == 0)] = i
        shutil.copyfile(images[0], out / "images" / f"{sample_dir.name}.png")
        write_png(out / "labels" / f"{sample_dir.name}.png", labels)
        n += 1
    return n


def download_dsb2018(dest: str | os.PathLike, base_url: str | None = None, quiet: bool = False) -> Path:
    """Fetch and convert BBBC038 into ``dest/dsb2018``; converted folders appear only when complete."""
    root = Path(dest) / "dsb2018"
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    base_url = base_url or os.environ.get("NUCLEISEG_DSB2018_URL", BBBC038_URL)
    files = {name: fetch_verified(base_url, name, downloads, sha, quiet) for name, sha in DSB2018_FILES.items()}
    for split, convert in (("stage1_train", lambda ex, out: convert_train(ex, out)),
                           ("stage1_test", lambda ex, out: convert_test(ex, files["stage1_solution.csv"], out))):
        final = root / split
        if (final / "labels").is_dir():
            continue
        work = root / f".{split}.partial"
        shutil.rmtree(work, ignore_errors=True)
        try:
            safe_extract_zip(files[f"{split}.zip"], work / "extracted")
            extracted = work / "extracted"
            # archives may or may not wrap the sample folders in a top-level folder
            inner = [p for p in extracted.iterdir() if p.is_dir()]
            if len(inner) == 1 and not (inner[0] / "images").is_dir():
                extracted = inner[0]
            n = convert(extracted, work / "converted")
            if n == 0:
                raise DownloadError(f"{files[f'{split}.zip']}: no samples found in the archive")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work / "converted", final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return root
