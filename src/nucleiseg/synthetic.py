"""Synthetic fluorescence-like nuclei with exact instance labels, for tests and benchmarks.

Elliptical blobs of varying size and brightness, some touching, on a noisy uneven background,
blurred like an optical system. Real enough that a model must learn shape, not a threshold alone.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def nuclei_image(shape: tuple[int, int] = (256, 256), n: int = 30, radius: tuple[float, float] = (6, 14),
                 seed: int = 0, touching: float = 0.3, dtype=np.uint16) -> tuple[np.ndarray, np.ndarray]:
    """(image, labels): an (H, W) image of ``dtype`` and its (H, W) int32 instance labels."""
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[0:h, 0:w]
    centres: list[tuple[float, float, float]] = []
    k = 0
    for _ in range(n * 4):
        if k == n:
            break
        r = rng.uniform(*radius)
        if centres and rng.random() < touching:  # place next to an existing nucleus so they touch
            cy, cx, cr = centres[rng.integers(len(centres))]
            angle = rng.uniform(0, 2 * np.pi)
            cy, cx = cy + (cr + r) * 0.95 * np.sin(angle), cx + (cr + r) * 0.95 * np.cos(angle)
        else:
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        a, b = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)
        theta = rng.uniform(0, np.pi)
        y0, y1 = int(max(cy - 1.3 * r, 0)), int(min(cy + 1.3 * r + 1, h))
        x0, x1 = int(max(cx - 1.3 * r, 0)), int(min(cx + 1.3 * r + 1, w))
        if y1 <= y0 or x1 <= x0:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        free = inside & (labels[y0:y1, x0:x1] == 0)
        if free.sum() < 0.6 * inside.sum() or free.sum() < 10:
            continue
        k += 1
        labels[y0:y1, x0:x1][free] = k
        centres.append((cy, cx, r))
    brightness = np.concatenate([[0.0], rng.uniform(0.45, 1.0, k)])
    signal = brightness[labels]
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape), 2) * 0.08
    signal = ndi.gaussian_filter(signal * (1 + texture), 1.0)
    background = 0.08 + 0.05 * (xx / w) + ndi.gaussian_filter(rng.normal(0, 1, shape), 20) * 0.2
    image = signal + background + rng.normal(0, 0.03, shape)
    image = np.clip(image, 0, None)
    if np.issubdtype(dtype, np.integer):
        image = image / image.max() * (np.iinfo(dtype).max * 0.8)
    return image.astype(dtype), labels


def mosaic(shape: tuple[int, int], seed: int = 0, density: float = 1 / 1500) -> tuple[np.ndarray, np.ndarray]:
    """A large image of nuclei, built block by block (for tiling tests and benchmarks)."""
    h, w = shape
    block = 512
    image = np.zeros(shape, np.uint16)
    labels = np.zeros(shape, np.int32)
    offset = 0
    for i, y in enumerate(range(0, h, block)):
        for j, x in enumerate(range(0, w, block)):
            bh, bw = min(block, h - y), min(block, w - x)
            if bh < 32 or bw < 32:
                continue
            img, lab = nuclei_image((bh, bw), n=max(1, int(bh * bw * density)), seed=seed * 10007 + i * 101 + j)
            image[y:y + bh, x:x + bw] = img
            labels[y:y + bh, x:x + bw] = np.where(lab > 0, lab + offset, 0)
            offset += int(lab.max())
    return image, labels
