"""Pre-processing shared by training and prediction: intensity normalisation, padding, and the image type
(fluorescence / brightfield / histology) judged from a normalised image's colour statistics."""
from __future__ import annotations

import numpy as np

# low/high percentiles map to 0/1; the range is at least ``min_range`` x (robust max - low), so that an
# image with few nuclei (where the high percentile is background) does not stretch noise to full scale.
DEFAULT_NORMALIZATION = {"method": "percentile", "low": 1.0, "high": 99.8, "robust_max": 99.99, "min_range": 0.25}
# ``"invert": "auto"`` (optional key) turns images with a bright background (median above half the range:
# brightfield, stained tissue) into dark-background ones, so every modality shows bright nuclei on dark
INVERT_MODES = (False, "auto")
IMAGE_TYPES = ("fluorescence", "brightfield", "histology")  # judged by image_type
_MAX_SAMPLES = 1 << 20  # percentiles from at most ~1M pixels: exact enough, fast on huge images


def percentile_range(image: np.ndarray, *percentiles: float) -> tuple[float, ...]:
    """Intensity percentiles of an image over all channels, from a regular pixel subsample."""
    flat = image.reshape(-1)
    step = max(1, flat.size // _MAX_SAMPLES)
    return tuple(float(v) for v in np.percentile(flat[::step], percentiles))


def intensity_scale(image: np.ndarray, normalization: dict | None = None) -> tuple[float, float]:
    """(offset, scale) that :func:`normalize` applies: ``(image - offset) / scale``.

    With ``"invert": "auto"`` in the settings, an image whose median lies above the middle of its range gets
    a negative scale (offset at the top of the range): it is inverted, 0 and 1 swapped. The choice is made
    once per image, so the blocks of a large image are all inverted or none."""
    norm = {**DEFAULT_NORMALIZATION, **(normalization or {})}
    if norm["method"] != "percentile":
        raise ValueError(f"unknown normalization method {norm['method']!r}")
    invert = norm.get("invert", False)
    if invert not in INVERT_MODES:
        raise ValueError(f"unknown invert setting {invert!r}; use one of {INVERT_MODES}")
    lo, hi, top, median = percentile_range(np.asarray(image), norm["low"], norm["high"],
                                           norm.get("robust_max", norm["high"]), 50.0)
    span = max(hi - lo, norm.get("min_range", 0.0) * (top - lo), 1e-6)
    if invert == "auto" and median - lo > span / 2:
        return lo + span, -span
    return lo, span


def is_inverted(scale: tuple[float, float]) -> bool:
    """Whether an (offset, scale) from :func:`intensity_scale` inverts the image."""
    return scale[1] < 0


def is_grey(image: np.ndarray) -> bool:
    """True for (H, W) images and for (H, W, 3) ones whose channels are equal (grey saved as RGB(A))."""
    if image.ndim == 2:
        return True
    few = image[::7, ::7]  # a cheap first look before comparing every pixel
    if not (np.array_equal(few[..., 0], few[..., 1]) and np.array_equal(few[..., 0], few[..., 2])):
        return False
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))


def normalize(image: np.ndarray, normalization: dict | None = None,
              scale: tuple[float, float] | None = None) -> np.ndarray:
    """Map an (H, W) or (H, W, 3) image of any dtype to float32 (H, W, 3), percentiles -> [0, 1].

    The same function (with the settings stored in the model config) runs at training and prediction,
    so 8-bit, 16-bit and float images all reach the network on one scale. Grey is repeated to 3 channels,
    or, with ``grey_gammas`` (g1, g2, g3) in the settings, given as x^g1, x^g2, x^g3 (x clipped at 0 for g != 1),
    so that dim nuclei also reach the network brightened. ``scale`` fixes (offset, scale) instead, e.g. from a
    whole image when normalising one of its blocks; the array's shape then says whether it is grey (2-D), so
    a block of a colour image whose channels happen to be equal (plain background) stays colour.
    """
    image = np.asarray(image)
    offset, factor = scale if scale is not None else intensity_scale(image, normalization)
    gammas = (normalization or {}).get("grey_gammas")
    if gammas and (image.ndim == 2 if scale is not None else is_grey(image)):
        grey = (np.asarray(image if image.ndim == 2 else image[..., 0]).astype(np.float32) - offset) / factor
        positive = np.clip(grey, 0, None)
        out = np.stack([grey if g == 1 else positive ** np.float32(g) for g in gammas], axis=2)
        return np.ascontiguousarray(out, dtype=np.float32)
    out = (image.astype(np.float32) - offset) / factor
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.float32)


def gamma_grey(image: np.ndarray, normalization: dict | None) -> np.ndarray | None:
    """The grey values (clipped at 0) of an image that :func:`normalize` gave as ``grey_gammas`` channels
    (x^g1, x^g2, x^g3), recognised by that relation between its channels; None for any other image.

    Lets colour statistics (e.g. the image type) see such an image as the grey image it is."""
    gammas = (normalization or {}).get("grey_gammas")
    image = np.asarray(image)
    if not gammas or image.ndim != 3 or image.shape[2] != len(gammas):
        return None
    few = image[::7, ::7].astype(np.float32)  # the relation is exact per pixel: a subsample tells
    grey = np.clip(few[..., 0], 0, None) ** np.float32(1 / gammas[0])
    if not all(np.allclose(few[..., k], grey ** np.float32(g), atol=1e-3) for k, g in enumerate(gammas) if k):
        return None
    return np.clip(image[..., 0].astype(np.float32), 0, None) ** np.float32(1 / gammas[0])


def image_type(image: np.ndarray, normalization: dict | None = None, inverted: bool = False) -> str:
    """Group a normalised image by colour statistics: grey on dark = fluorescence, grey on bright =
    brightfield, coloured = histology (stained tissue). ``normalization``: the settings it was normalised
    with, so that a grey image given as ``grey_gammas`` channels still counts as grey; ``inverted``: whether
    normalisation inverted it (``"invert": "auto"``), which turns grey on bright into grey on dark."""
    grey = gamma_grey(image, normalization)
    img = np.asarray(image if grey is None else grey, np.float32)
    if img.ndim == 3 and img.shape[2] == 3:
        spread = float(np.mean(np.abs(img[..., 0] - img[..., 1]) + np.abs(img[..., 1] - img[..., 2])))
        if spread > 0.04:
            return "histology"
        img = img.mean(axis=2)
    return "brightfield" if inverted or float(np.median(img)) > 0.5 else "fluorescence"


def pad_to_multiple(array: np.ndarray, multiple: int, mode: str = "reflect") -> tuple[np.ndarray, tuple[int, int]]:
    """Pad the first two axes up to a multiple of ``multiple``; return the array and the original (H, W)."""
    h, w = array.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        pad = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
        if mode == "reflect" and (ph >= h or pw >= w):
            mode = "symmetric"
        array = np.pad(array, pad, mode=mode)
    return array, (h, w)


def to_display_rgb(image: np.ndarray, strip: int = 1024) -> np.ndarray:
    """An 8-bit RGB view of any image (for overlays and figures), converted in strips of rows so a
    huge image never needs a float copy of itself."""
    offset, scale = intensity_scale(image, {"low": 0.5, "high": 99.8})
    out = np.empty(image.shape[:2] + (3,), np.uint8)
    for y in range(0, image.shape[0], strip):
        part = (image[y:y + strip].astype(np.float32) - offset) * (255.0 / scale)
        part = np.clip(part, 0, 255).astype(np.uint8)
        out[y:y + strip] = part[..., None] if part.ndim == 2 else part
    return out
