"""Datasets: finding image/label pairs in three layouts, the train/validation split, augmentation.

Layouts, detected automatically:

- ``kaggle``:   ``<root>/<id>/images/<id>.png`` + ``<root>/<id>/masks/*.png`` (one binary mask per nucleus)
- ``labels``:   ``<root>/images/<name>.*`` + ``<root>/<labels>/<name>.*`` instance-label images; the label
  folder is ``labels_lopuhin_fixed`` (DSB2018 community fixes) when present, else ``labels``
- ``semantic``: ``<root>/inputs/<name>.*`` + ``<root>/masks/<name>.*`` binary masks (no instances)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import FIXED_LABELS
from .io import ImageError, is_image_file, read_image, read_labels
from .targets import encode
from .transforms import image_type, intensity_scale, is_inverted, normalize

log = logging.getLogger(__name__)
LABEL_DIR_PREFERENCE = (FIXED_LABELS, "labels")  # the DSB2018 community fixes first


@dataclass(frozen=True)
class Sample:
    """One training/evaluation example: an image and its annotation (label image or per-nucleus masks)."""

    name: str
    image: Path
    labels: Path | None = None
    masks: tuple[Path, ...] = ()
    instances: bool = True  # False: the annotation is a binary mask (semantic layout)


def _images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and is_image_file(p)}


def detect_layout(root: str | os.PathLike) -> str:
    """Name of the dataset layout under ``root`` ('kaggle', 'labels' or 'semantic')."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    if (root / "images").is_dir() and any((root / d).is_dir() for d in LABEL_DIR_PREFERENCE):
        return "labels"
    if (root / "inputs").is_dir() and (root / "masks").is_dir():
        return "semantic"
    if any((d / "images").is_dir() and (d / "masks").is_dir() for d in root.iterdir() if d.is_dir()):
        return "kaggle"
    raise ValueError(f"{root}: unknown dataset layout; expected images/ + labels/, inputs/ + masks/, "
                     "or Kaggle-style <id>/images + <id>/masks")


def find_samples(root: str | os.PathLike, label_dir: str | None = None,
                 problems: list[str] | None = None) -> tuple[str, list[Sample]]:
    """Detect the layout and list its samples (sorted by name). Returns (layout, samples).

    Images without annotation are skipped with a warning (e.g. images the fixed labels dropped).
    An annotation without its image is an error naming the file; with a ``problems`` list given, it is
    appended there (one line per file) and the other samples are still returned.
    """
    root = Path(root)
    layout = detect_layout(root)
    if layout == "kaggle":
        samples = []
        for d in sorted(p for p in root.iterdir() if (p / "images").is_dir()):
            images = list(_images_in(d / "images").values())
            if len(images) != 1:
                raise ImageError(d / "images", f"expected one image, found {len(images)}")
            masks = tuple(_images_in(d / "masks").values()) if (d / "masks").is_dir() else ()
            samples.append(Sample(d.name, images[0], masks=masks))
        return layout, samples
    if layout == "labels":
        label_dir = label_dir or next(d for d in LABEL_DIR_PREFERENCE if (root / d).is_dir())
        images, annotations, instances = _images_in(root / "images"), _images_in(root / label_dir), True
    else:
        images, annotations, instances = _images_in(root / "inputs"), _images_in(root / "masks"), False
    orphans = sorted(set(annotations) - set(images))
    if orphans and problems is None:
        raise ImageError(annotations[orphans[0]], f"label without its image ({len(orphans)} such files)")
    for name in orphans:
        problems.append(str(ImageError(annotations[name], "label without its image")))
        del annotations[name]
    missing = sorted(set(images) - set(annotations))
    if missing:
        log.warning("%s: %d image(s) without labels skipped (e.g. %s)", root, len(missing), missing[0])
    samples = [Sample(n, images[n], labels=annotations[n], instances=instances) for n in sorted(annotations)]
    if not samples:
        raise ValueError(f"{root}: no annotated images found")
    return layout, samples


def read_sample_labels(sample: Sample) -> np.ndarray:
    """Instance labels (H, W) int32 of a sample; binary masks are split into connected components."""
    if sample.masks:
        labels = None
        for i, path in enumerate(sample.masks, start=1):
            m = read_labels(path) > 0
            if labels is None:
                labels = np.zeros(m.shape, np.int32)
            elif m.shape != labels.shape:
                raise ImageError(path, f"mask size {m.shape} differs from the other masks {labels.shape}")
            labels[m & (labels == 0)] = i
        return labels
    labels = read_labels(sample.labels)
    if not sample.instances:
        from skimage.measure import label
        labels = label(labels > 0, connectivity=1).astype(np.int32)
    return labels


def load_sample(sample: Sample, normalization: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image (H, W, 3) float32 and instance labels (H, W) int32, checked for equal size."""
    image, labels, _ = _load_sample(sample, normalization)
    return image, labels


def _load_sample(sample: Sample, normalization: dict | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`load_sample` and whether normalisation inverted the image."""
    raw = read_image(sample.image)
    image = normalize(raw, normalization)
    inverted = bool((normalization or {}).get("invert")) and is_inverted(intensity_scale(raw, normalization))
    labels = read_sample_labels(sample)
    if labels.shape != image.shape[:2]:
        where = sample.labels or sample.masks[0]
        raise ImageError(where, f"label size {labels.shape} differs from image size {image.shape[:2]} ({sample.image.name})")
    return image, labels, inverted


def median_diameter(label_images: list[np.ndarray]) -> float:
    """Median equivalent diameter (pixels) of all nuclei in instance label images: the nucleus size a
    model trained on them expects, used to rescale images whose nuclei are much larger or smaller."""
    areas = [np.bincount(lab.ravel())[1:] for lab in label_images if lab.max() > 0]
    areas = np.concatenate(areas) if areas else np.zeros(0)
    areas = areas[areas > 0]
    return float(np.sqrt(4 * np.median(areas) / np.pi)) if areas.size else 0.0


def split(names: list[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded, reproducible split of sample names into (train, validation)."""
    names = sorted(names)
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = int(round(len(names) * val_fraction))
    val = sorted(names[i] for i in order[:n_val])
    train = sorted(names[i] for i in order[n_val:])
    return train, val


AUGMENTATIONS = ("basic", "strong")


def augmentation(crop: int, strength: str = "basic", scale: float = 0.25, intensity: float = 0.2,
                 scale_range: tuple[float, float] | None = None, channel_shuffle: bool = True):
    """Albumentations pipeline: random scale, crop at native resolution, flips/rot90, brightness/contrast.

    ``strong`` adds what differs between microscopes and stains beyond that: a wider scale range (0.5-1.5x),
    rotation by any angle, blur, camera noise and a per-channel gain (stain colour balance).
    ``scale_range`` (low, high) replaces either strength's scale range, e.g. (0.75, 2) for nuclei seen at up
    to twice the training images' magnification; half the crops are scaled, as with the defaults.
    """
    import albumentations as A
    import cv2

    if strength not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {strength!r}; choose from {', '.join(AUGMENTATIONS)}")
    strong = strength == "strong"
    limit = (scale_range[0] - 1, scale_range[1] - 1) if scale_range else 0.5 if strong else scale
    geometry = [A.RandomScale(scale_limit=limit, interpolation=cv2.INTER_LINEAR,
                              mask_interpolation=cv2.INTER_NEAREST, p=0.5)]
    if strong:
        geometry.append(A.Affine(rotate=(-180, 180), interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                                 border_mode=cv2.BORDER_REFLECT_101, p=0.3))
    pixels = [A.RandomBrightnessContrast(brightness_limit=intensity, contrast_limit=intensity, p=0.5)]
    if channel_shuffle:
        pixels.append(A.ChannelShuffle(p=0.2))
    if strong:
        pixels += [A.MultiplicativeNoise(multiplier=(0.8, 1.2), per_channel=True, p=0.3),
                   A.GaussianBlur(sigma_limit=(0.3, 1.2), p=0.2),
                   A.GaussNoise(std_range=(0.01, 0.05), p=0.2)]
    return A.Compose([
        *geometry,
        A.PadIfNeeded(crop, crop, border_mode=cv2.BORDER_REFLECT_101),
        A.RandomCrop(crop, crop),
        A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90(),
        *pixels,
    ])


class SegmentationDataset(torch.utils.data.Dataset):
    """Images and labels decoded once and cached in RAM; targets built after augmentation.

    With ``crop`` set, each item is a random crop (training), augmented as ``augment`` names (None: not
    augmented); otherwise the whole image (validation), padded later by the collate function.
    """

    def __init__(self, items: list[tuple[str, np.ndarray, np.ndarray]], design: str, crop: int | None = None,
                 augment: str | None = "basic", scale_range: tuple[float, float] | None = None,
                 channel_shuffle: bool = True):
        self.items, self.design, self.crop = items, design, crop
        self.transform = (augmentation(crop, augment, scale_range=scale_range, channel_shuffle=channel_shuffle)
                          if crop and augment else None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, image, labels = self.items[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=labels)
            image, labels = out["image"], out["mask"]
        target = encode(np.ascontiguousarray(labels), self.design)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(target)


def load_items(samples: list[Sample], normalization: dict | None = None, progress: bool = True,
               problems: list[str] | None = None,
               types: dict[str, str] | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Decode and normalise samples once: [(name, image, labels)].

    With a ``problems`` list, unreadable samples are skipped and described there (one line each);
    without it the first problem raises. A ``types`` dict receives each image's type
    (``transforms.image_type``), judged before normalisation could invert it.
    """
    from tqdm.auto import tqdm

    items = []
    for s in tqdm(samples, desc="loading", disable=not progress):
        try:
            image, labels, inverted = _load_sample(s, normalization)
            items.append((s.name, image, labels))
            if types is not None:
                types[s.name] = image_type(image, normalization, inverted)
        except ImageError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            log.error("%s (sample skipped)", exc)
    return items
