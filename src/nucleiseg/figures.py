"""Figures: prediction previews, training curves, best/worst outlines (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.color import label2rgb  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402


def _display(image: np.ndarray) -> np.ndarray:
    """Normalised float image -> [0, 1] RGB for display."""
    img = np.asarray(image, np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.clip(img, 0, 1)


def _figure_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def prediction_grid(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path, title: str = "") -> np.ndarray:
    """Rows of input | true labels | predicted labels; saved as PNG, returned as an RGB array."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for ax_row, (name, image, true, pred) in zip(axes, rows):
        ax_row[0].imshow(_display(image))
        ax_row[0].set_title(name[:16], fontsize=8)
        ax_row[1].imshow(label2rgb(true, bg_label=0))
        ax_row[1].set_title(f"true ({int(len(np.unique(true)) - 1)})", fontsize=8)
        ax_row[2].imshow(label2rgb(pred, bg_label=0))
        ax_row[2].set_title(f"predicted ({int(len(np.unique(pred)) - 1)})", fontsize=8)
        for ax in ax_row:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    array = _figure_to_array(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return array


def training_curves(rows: list[dict], path: Path) -> None:
    """Loss, pixel accuracy, foreground IoU and DSB score per epoch, train and validation."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    epochs = [r["epoch"] for r in rows]
    for ax, key in zip(axes, ("loss", "acc", "iou", "dsb")):
        for split in ("train", "val"):
            values = [r.get(f"{split}_{key}", np.nan) for r in rows]
            if not np.all(np.isnan(values)):
                ax.plot(epochs, values, marker=".", label=split)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def outline_overlay(image: np.ndarray, true: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """RGB image with true outlines in green and predicted outlines in magenta."""
    rgb = _display(image).copy()
    if true is not None:
        rgb[find_boundaries(true, mode="inner")] = (0.0, 1.0, 0.0)
    rgb[find_boundaries(pred, mode="inner")] = (1.0, 0.0, 1.0)
    return rgb


def outlines_figure(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]], path: Path, title: str) -> None:
    """Grid of images with true (green) vs predicted (magenta) outlines, captioned with their score."""
    n = len(rows)
    cols = min(4, max(n, 1))
    nrows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 4 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, image, true, pred, score) in zip(axes.ravel(), rows):
        ax.imshow(outline_overlay(image, true, pred))
        ax.set_title(f"{name[:12]}  score {score:.2f}", fontsize=9)
    fig.suptitle(f"{title} (green: true, magenta: predicted)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
