"""Shared fixtures: synthetic datasets in each layout, small data the tests make themselves."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from nucleiseg.synthetic import nuclei_image  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data" / "dsb2018-stage1-train"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.safetensors"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"DSB2018 data not found at {SHARED_DATA} (../shared is absent)")
needs_shared_weights = pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason=f"ImageNet weights not found at {SHARED_WEIGHTS} (../shared is absent)")


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) / max(float(image.max()), 1) * 255).astype(np.uint8)


def make_labels_layout(root: Path, n: int = 6, shape=(128, 160), seed: int = 0) -> Path:
    """images/ (8-bit RGBA PNG, like DSB) + labels/ (uint16 PNG)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        img, lab = nuclei_image(shape, n=12, seed=seed + i)
        grey = to_uint8(img)
        rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
        Image.fromarray(rgba).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(lab.astype(np.uint16)).save(root / "labels" / f"img{i:02d}.png")
    return root


@pytest.fixture
def labels_dataset(tmp_path) -> Path:
    return make_labels_layout(tmp_path / "ds")


@pytest.fixture
def kaggle_dataset(tmp_path) -> Path:
    root = tmp_path / "kaggle"
    for i in range(3):
        img, lab = nuclei_image((96, 128), n=8, seed=10 + i)
        d = root / f"id{i}"
        (d / "images").mkdir(parents=True)
        (d / "masks").mkdir()
        Image.fromarray(to_uint8(img)).save(d / "images" / f"id{i}.png")
        for k in range(1, lab.max() + 1):
            Image.fromarray(((lab == k) * 255).astype(np.uint8)).save(d / "masks" / f"m{k:03d}.png")
    return root


@pytest.fixture
def semantic_dataset(tmp_path) -> Path:
    root = tmp_path / "semantic"
    (root / "inputs").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        img, lab = nuclei_image((96, 96), n=6, seed=20 + i, touching=0.0)
        tifffile.imwrite(root / "inputs" / f"s{i}.tif", img)  # 16-bit TIFF input
        Image.fromarray(((lab > 0) * 255).astype(np.uint8)).save(root / "masks" / f"s{i}.png")
    return root
