"""What prediction writes: label TIFF, binary mask PNG, overlay PNG, per-nucleus CSV, outlines for other
tools (GeoJSON for QuPath / napari / GIS, ImageJ ROI sets for Fiji), run-length encoding.

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a
half-written output behind.
"""
from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path

import numpy as np
from skimage.measure import regionprops_table
from skimage.segmentation import find_boundaries

from .io import atomic_path, write_png, write_tiff
from .transforms import to_display_rgb

OUTPUT_KINDS = ("labels", "mask", "overlay", "csv", "outlines", "rois")  # every per-image output
DEFAULT_OUTPUTS = ("labels", "mask", "overlay", "csv")  # what `nucleiseg predict` writes unless told
RUN_OUTPUTS = ("summary", "rle")
PROPERTIES = ("label", "centroid", "area", "perimeter", "eccentricity", "bbox", "intensity_mean", "intensity_max")


def convex_solidity(regionmask: np.ndarray) -> float:
    """Area / area of the convex hull of the nucleus's pixel squares (Qhull; much faster than
    scikit-image's pixel-grid convex image, and <= 1 by construction)."""
    from scipy import ndimage as ndi
    from scipy.spatial import ConvexHull, QhullError

    edge = regionmask & ~ndi.binary_erosion(regionmask)  # the hull only depends on outline pixels
    ys, xs = np.nonzero(edge)
    corners = np.concatenate([np.stack([ys + dy, xs + dx], axis=1) for dy in (0, 1) for dx in (0, 1)])
    try:
        return float(regionmask.sum() / ConvexHull(corners).volume)
    except QhullError:  # degenerate (a line of pixels): it is its own hull
        return 1.0


def output_paths(out_dir: Path, stem: str, kinds: tuple[str, ...]) -> dict[str, Path]:
    """Where each per-image output of ``stem`` goes."""
    names = {"labels": f"{stem}_labels.tif", "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png",
             "csv": f"{stem}_nuclei.csv", "outlines": f"{stem}_outlines.geojson", "rois": f"{stem}_rois.zip"}
    return {k: out_dir / names[k] for k in kinds}


def label_dtype(labels: np.ndarray):
    """uint16 when the count fits (Fiji/napari read it natively), else uint32."""
    return np.uint16 if labels.max() < 65536 else np.uint32


def overlay(image: np.ndarray, labels: np.ndarray, color=(255, 40, 40), strip: int = 1024) -> np.ndarray:
    """8-bit RGB image with each nucleus outlined (computed in strips: bounded extra memory)."""
    rgb = to_display_rgb(image)
    h = labels.shape[0]
    for y in range(0, h, strip):
        lo, hi = max(0, y - 1), min(h, y + strip + 1)  # one row of context: outlines are local
        edges = find_boundaries(labels[lo:hi], mode="inner")[y - lo:y - lo + min(strip, h - y)]
        rgb[y:y + strip][edges] = color
    return rgb


def measurements(labels: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """Per-nucleus table via regionprops_table; intensities from the raw image (mean over colour channels)."""
    intensity = image.mean(axis=2, dtype=np.float32) if image.ndim == 3 else image
    table = regionprops_table(labels, intensity_image=intensity, properties=PROPERTIES,
                              extra_properties=(convex_solidity,))
    rename = {"convex_solidity": "solidity", "centroid-0": "centroid_y", "centroid-1": "centroid_x", "bbox-0": "bbox_min_y", "bbox-1": "bbox_min_x",
              "bbox-2": "bbox_max_y", "bbox-3": "bbox_max_x"}
    columns = {rename.get(k, k): v for k, v in table.items()}
    order = ["label", "centroid_y", "centroid_x", "area", "perimeter", "eccentricity", "solidity"]
    return {k: columns[k] for k in order + [k for k in columns if k not in order]}


def write_table(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Write a column dict as CSV, atomically."""
    keys = list(columns)
    n = len(columns[keys[0]]) if keys else 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for i in range(n):
            writer.writerow([_fmt(columns[k][i]) for k in keys])


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return int(v) if isinstance(v, (np.integer,)) else v


def outlines(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(label, closed polygon (N, 2) of x, y) per nucleus, in pixel-corner coordinates (pixel (0, 0) spans
    0..1, as in Fiji and QuPath): the half-level contour of its mask, along its pixels' outer edges with the
    corners cut. A nucleus in several pieces is outlined by its largest."""
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    polygons = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = np.pad(labels[sl] == i, 1).astype(np.uint8)  # padded: the contour closes around the object
        contour = max(find_contours(mask, 0.5, fully_connected="high"), key=len)
        # back to image indices (-1 for the padding), then from pixel centres to pixel corners (+0.5)
        polygons.append((i, np.stack([contour[:, 1] + sl[1].start - 0.5, contour[:, 0] + sl[0].start - 0.5], axis=1)))
    return polygons


def write_geojson(path: Path, polygons: list[tuple[int, np.ndarray]]) -> None:
    """A GeoJSON FeatureCollection of the nuclei's outlines (QuPath imports them as detections)."""
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [np.round(xy, 2).tolist()]},
                 "properties": {"objectType": "detection", "name": f"nucleus {i}", "label": i}} for i, xy in polygons]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def write_imagej_rois(path: Path, polygons: list[tuple[int, np.ndarray]]) -> None:
    """An ImageJ ROI set (.zip, opened by Fiji's ROI Manager), one polygon per nucleus named by its label."""
    from roifile import ImagejRoi, roiwrite

    with atomic_path(path) as tmp:
        roiwrite(tmp, [ImagejRoi.frompoints(xy, name=f"{i:06d}") for i, xy in polygons], mode="w")


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, labels: np.ndarray,
                  kinds: tuple[str, ...] = DEFAULT_OUTPUTS) -> dict[str, Path]:
    """Write the requested per-image outputs; returns their paths."""
    paths = output_paths(out_dir, stem, kinds)
    if "labels" in paths:
        write_tiff(paths["labels"], labels.astype(label_dtype(labels)), compression="zlib",
                   metadata={"axes": "YX"})
    if "mask" in paths:
        write_png(paths["mask"], np.where(labels > 0, 255, 0).astype(np.uint8))
    if "overlay" in paths:
        write_png(paths["overlay"], overlay(image, labels))
    if "csv" in paths:
        write_table(paths["csv"], measurements(labels, image))
    if "outlines" in paths or "rois" in paths:
        polygons = outlines(labels)
        if "outlines" in paths:
            write_geojson(paths["outlines"], polygons)
        if "rois" in paths:
            write_imagej_rois(paths["rois"], polygons)
    return paths


def rle_encode(mask: np.ndarray) -> str:
    """Kaggle DSB run-length encoding of a binary mask: 1-based 'start length' pairs, column-major order."""
    pixels = np.concatenate([[0], np.asarray(mask, bool).T.ravel().astype(np.int8), [0]])
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    runs[1::2] -= runs[::2]
    return " ".join(map(str, runs))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: a boolean (H, W) mask."""
    values = np.asarray(rle.split(), dtype=np.int64)
    flat = np.zeros(shape[0] * shape[1], bool)
    for start, length in zip(values[::2] - 1, values[1::2]):
        flat[start:start + length] = True
    return flat.reshape(shape[1], shape[0]).T


def rle_rows(image_id: str, labels: np.ndarray) -> list[tuple[str, str]]:
    """(ImageId, EncodedPixels) rows, one per nucleus, as the DSB2018 submission format."""
    from scipy import ndimage as ndi

    rows = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is not None:
            full = np.zeros(labels.shape, bool)
            full[sl] = labels[sl] == i
            rows.append((image_id, rle_encode(full)))
    return rows


def csv_text(header: list[str], rows: list) -> str:
    """Rows as CSV text (for run-level files assembled in memory)."""
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
