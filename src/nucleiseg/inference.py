"""Running the network on whole images: padding, overlapping tiles with blending, flip/transpose TTA, backends.

A *runner* maps a float32 batch (N, 3, H, W) with H, W multiples of 32 to probability maps
(N, C, H, W). Two runners exist: PyTorch (:class:`TorchRunner`) and ONNX Runtime (:class:`OnnxRunner`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .network import STRIDE
from .targets import flip_rays, transpose_rays
from .transforms import pad_to_multiple

Runner = Callable[[np.ndarray], np.ndarray]
TILE_SIZE = 1152  # largest tile side: 2048x2048 images run as 2x2 tiles, peak memory about 1 GB
TILE_OVERLAP = 256  # shared pixels between tiles (measured: tiled vs whole-image F1 > 0.99)


class MapsNet(torch.nn.Module):
    """The network followed by its target design's activation: image -> probability maps (for export too)."""

    def __init__(self, net: torch.nn.Module, design: str):
        super().__init__()
        self.net, self.design = net, design

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .targets import probabilities

        return probabilities(self.net(x), self.design)


class TorchRunner:
    """Evaluate a :class:`MapsNet` with PyTorch (no autograd, float32)."""

    def __init__(self, maps_net: MapsNet):
        self.maps_net = maps_net.eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.maps_net(torch.from_numpy(batch)).numpy()


class OnnxRunner:
    """Evaluate an exported ONNX model with onnxruntime."""

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


# test-time augmentation: the 8 symmetries of the square, as (transpose, flipped axes of an NCHW batch)
SYMMETRIES = [(t, axes) for t in (False, True) for axes in ((), (3,), (2,), (2, 3))]


def _undo_symmetry(out: np.ndarray, transpose: bool, axes: tuple[int, ...], vectors: tuple[int, int] | None,
                   rays: int | None) -> np.ndarray:
    """Maps (N, C, H, W) predicted for a transformed image, mapped back to the original image's frame:
    flips undone (a flip negates that axis's vector component and reorders the rays), then the transpose
    (which swaps the vector components and mirrors the rays about the diagonal)."""
    out = np.array(np.flip(out, axes) if axes else out)
    for axis in axes:  # axis 2 flips y, axis 3 flips x (of the transformed frame)
        if vectors is not None:
            out[:, vectors[axis - 2]] *= -1
        if rays is not None:
            out[0, rays:] = flip_rays(out[0, rays:], "y" if axis == 2 else "x")
    if transpose:
        out = np.ascontiguousarray(out.transpose(0, 1, 3, 2))
        if vectors is not None:
            out[:, list(vectors)] = out[:, list(vectors[::-1])]
        if rays is not None:
            out[0, rays:] = transpose_rays(out[0, rays:])
    return out


def _run_padded(runner: Runner, image: np.ndarray, tta: bool, vectors: tuple[int, int] | None = None,
                rays: int | None = None) -> np.ndarray:
    """Maps (C, H, W) for one normalised (H, W, 3) image that fits in one pass; TTA averages the maps of
    the 8 flips and transposes of the image (``vectors``: the (y, x) channels of a vector field, ``rays``:
    the first of the ray-length channels, both of which these transforms change)."""
    padded, (h, w) = pad_to_multiple(image, STRIDE)
    x = np.ascontiguousarray(padded.transpose(2, 0, 1)[None], np.float32)
    if not tta:
        return runner(x)[0, :, :h, :w]
    total = None
    for transpose, axes in SYMMETRIES:
        xt = x.transpose(0, 1, 3, 2) if transpose else x
        out = runner(np.ascontiguousarray(np.flip(xt, axes) if axes else xt))
        out = _undo_symmetry(out, transpose, axes, vectors, rays)
        total = out if total is None else total + out
    return (total / len(SYMMETRIES))[0, :, :h, :w]


def _ramp(n: int, overlap: int) -> np.ndarray:
    """1-D blending weights: linear ramps of length ``overlap`` at both ends."""
    w = np.ones(n, np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        w[:overlap] = np.minimum(w[:overlap], ramp)
        w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
    return w


def tile_starts(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """The fewest tiles of at most ``tile`` pixels (a multiple of the stride) covering ``size`` with
    about ``overlap`` shared between neighbours: (start offsets, tile length; the last tile may be cut
    short by the image's end). Starts are multiples of the network's stride, so every tile sees the
    image on the same downsampling grid as one whole-image pass (and as a block starting at a multiple
    of the stride): shifting the grid by a few pixels changes the network's output."""
    if size <= tile:
        return [0], size
    n = int(np.ceil((size - overlap) / (tile - overlap)))
    length = int(np.ceil((size + (n - 1) * overlap) / n))
    length = min(tile, length + (-length) % STRIDE)
    step = (length - overlap) // STRIDE * STRIDE
    if int(np.ceil((size - length) / step)) + 1 > n:  # the aligned step needs one more tile: use full tiles
        length, step = tile, (tile - overlap) // STRIDE * STRIDE
    n = int(np.ceil((size - length) / step)) + 1
    return [k * step for k in range(n)], length


def predict_maps(runner: Runner, image: np.ndarray, tile_size: int = TILE_SIZE, overlap: int = TILE_OVERLAP,
                 tta: bool = False, vectors: tuple[int, int] | None = None, rays: int | None = None) -> np.ndarray:
    """Probability maps (C, H, W) float32 for a normalised (H, W, 3) image of any size
    (``vectors``: see :func:`_run_padded`).

    Images larger than ``tile_size`` are cut into the fewest overlapping tiles of at most that size,
    whose maps are blended with linear ramps before post-processing, so nuclei on tile borders are
    neither cut nor doubled; memory for the network is bounded by the tile size.
    """
    h, w = image.shape[:2]
    if h <= tile_size and w <= tile_size:
        return _run_padded(runner, image, tta, vectors, rays)
    tile_size = max(STRIDE, tile_size - tile_size % STRIDE)
    overlap = min(overlap, tile_size // 2)
    acc, weight = None, np.zeros((h, w), np.float32)
    ys, th_tile = tile_starts(h, tile_size, overlap)
    xs, tw_tile = tile_starts(w, tile_size, overlap)
    for y in ys:
        for x in xs:
            tile = image[y:y + th_tile, x:x + tw_tile]
            maps = _run_padded(runner, tile, tta, vectors, rays)
            th, tw = tile.shape[:2]
            # no ramp on the image's own edges: only where a neighbouring tile exists
            wy = _ramp(th, overlap if h > tile_size else 0)
            wx = _ramp(tw, overlap if w > tile_size else 0)
            if y == 0:
                wy[:overlap] = 1
            if y + th >= h:
                wy[-overlap:] = 1
            if x == 0:
                wx[:overlap] = 1
            if x + tw >= w:
                wx[-overlap:] = 1
            wt = np.outer(wy, wx)
            if acc is None:
                acc = np.zeros((maps.shape[0], h, w), np.float32)
            acc[:, y:y + th, x:x + tw] += maps * wt
            weight[y:y + th, x:x + tw] += wt
    return acc / weight
