"""Reading and writing image files: PNG / TIFF / JPEG, 8/16/32-bit or float, grey / RGB / RGBA / multi-channel.

Every reading problem becomes an :class:`ImageError` whose message names the file and says what to do,
so callers can report it in one line and go on with the next file.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
# integer images of any width (32-bit ones from summed projections, 64-bit from NumPy) and float images; float64
# is read as float32, which holds any microscope's range (normalisation maps percentiles to [0, 1] anyway)
SUPPORTED_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64,
                    np.float16, np.float32, np.float64)
DEFAULT_MAX_PIXELS = 20_000 * 20_000  # refuse larger images unless the caller raises the limit

Image.MAX_IMAGE_PIXELS = None  # we apply our own, configurable limit (checked before decoding)


class ImageError(ValueError):
    """An input file cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def is_image_file(path: str | os.PathLike) -> bool:
    """True if the file name has an extension nucleiseg reads."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def header_shape(path: Path) -> tuple[int, ...]:
    """A file's array shape from its header, without decoding pixels (size limits, label shapes)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tif:
            return tuple(tif.series[0].shape)
    with Image.open(path) as im:
        return (im.height, im.width)


def _decode(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        return tifffile.imread(path, series=0)
    with Image.open(path) as im:
        im.load()
        if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "1"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        return np.asarray(im)


def read_raw(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a file into its native array (any shape and dtype), with clear errors for bad files."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found")
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    if not is_image_file(path):
        raise ImageError(path, f"unsupported extension {path.suffix!r}; use one of {', '.join(IMAGE_EXTENSIONS)}")
    try:
        shape = header_shape(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a readable image"
        raise ImageError(path, f"not a readable {path.suffix.lstrip('.').upper()} image ({type(exc).__name__}: {exc})") from None
    spatial = sorted(shape, reverse=True)[:2]
    n_pixels = int(np.prod(spatial)) if len(spatial) == 2 else 0
    if n_pixels > max_pixels:
        raise ImageError(path, f"image of {n_pixels:,} pixels exceeds the limit of {max_pixels:,} (raise it with --max-pixels)")
    try:
        array = _decode(path)
    except Exception as exc:  # noqa: BLE001
        raise ImageError(path, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    return array


def read_image(path: str | os.PathLike, channel: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as an (H, W) grey or (H, W, 3) RGB array in its native dtype.

    RGBA drops alpha; a channel-first or channel-last multi-channel image needs ``channel`` to pick the
    nuclear stain; 3-D stacks and time series are refused with the axis to choose.
    """
    array = read_raw(path, max_pixels=max_pixels)
    return as_2d_image(array, path, channel=channel)


def as_2d_image(array: np.ndarray, path: str | os.PathLike = "<array>", channel: int | None = None) -> np.ndarray:
    """Check dtype and values and bring an array to (H, W) or (H, W, 3)."""
    array = np.asarray(array)
    if array.dtype == bool or not any(array.dtype == d for d in SUPPORTED_DTYPES):
        raise ImageError(path, f"unsupported pixel type {array.dtype}; expected integer or floating-point intensities")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ImageError(path, "contains NaN or infinite values")
    if array.dtype == np.float64:
        if array.size and np.abs(array).max() > np.finfo(np.float32).max:
            raise ImageError(path, "float64 values beyond the float32 range; rescale the image")
        array = array.astype(np.float32)
    if array.ndim > 2:
        squeezed = np.squeeze(array)
        if squeezed.ndim >= 2:
            array = squeezed
    if array.ndim == 2:
        if channel not in (None, 0):
            raise ImageError(path, f"--channel {channel} given but the image has a single channel")
        return _check_2d(array, path)
    if array.ndim != 3:
        raise ImageError(path, f"{array.ndim}-D array of shape {array.shape}; nucleiseg segments 2-D images: "
                               "save one plane (and one channel) per file")
    if array.shape[-1] <= 4 and array.shape[0] > 4:  # channel-last (H, W, C)
        axis = 2
    elif array.shape[0] <= 8 and array.shape[-1] > 8:  # channel-first (C, H, W), as ImageJ writes
        axis = 0
    else:
        raise ImageError(path, f"3-D stack of shape {array.shape} (a z-stack or time series?); nucleiseg segments 2-D "
                               "images: pick one plane along axis 0 and save it as its own file")
    n = array.shape[axis]
    if channel is not None:
        if not 0 <= channel < n:
            raise ImageError(path, f"--channel {channel} out of range: the image has {n} channels (axis {axis})")
        return _check_2d(np.take(array, channel, axis=axis), path)
    if axis == 0:
        if n != 3:
            raise ImageError(path, f"multi-channel image with {n} channels on axis 0 (shape {array.shape}); "
                                   "pick the nuclear stain with --channel INDEX")
        array = np.moveaxis(array, 0, -1)
    elif n == 4:
        array = array[..., :3]  # RGBA: alpha is not image content
    elif n == 2:
        raise ImageError(path, f"two-channel image (shape {array.shape}); pick the nuclear stain with --channel INDEX")
    return _check_2d(np.ascontiguousarray(array), path)


def _check_2d(array: np.ndarray, path) -> np.ndarray:
    if min(array.shape[:2]) < 8:
        raise ImageError(path, f"image too small ({array.shape[0]}x{array.shape[1]}); at least 8x8 pixels needed")
    return array


def read_labels(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an instance-label or binary-mask image as a 2-D integer array (0 = background)."""
    array = read_raw(path, max_pixels=max_pixels)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., 0]  # masks saved as RGB(A): all channels equal
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ImageError(path, f"label image must be 2-D, got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.int32)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or np.any(array != np.round(array)) or array.min() < 0:
            raise ImageError(path, "label image must hold non-negative integers")
        return array.astype(np.int32)
    if array.dtype.kind not in "ui" or array.min() < 0:
        raise ImageError(path, f"label image must hold non-negative integers, got {array.dtype}")
    return array.astype(np.int32)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place only if the block succeeds.

    The name is chosen before anything is created, so an interrupt (Ctrl-C, SIGTERM) at any moment
    leaves no temporary file behind: the block creates it and ``finally`` removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part{path.suffix}")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers (safetensors) create 0600; give outputs the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_tiff(path: str | os.PathLike, array: np.ndarray, **kwargs) -> None:
    """Write a TIFF atomically (label images: uint16/uint32, readable by Fiji and napari)."""
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, **kwargs)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an 8-bit PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)  # fast; outputs compress well anyway
