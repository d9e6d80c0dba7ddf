"""Segmenting an image block by block, so memory is bounded by the block size, not the image size.

Every nucleus is *owned* by the block that holds its centroid: that block writes it whole (it may
reach into a neighbour's block, thanks to the halo), the others drop it. Blocks see ``halo`` pixels of
context on each side, so a nucleus near a block border is segmented as in the whole image (block and
halo are rounded up to multiples of the network's stride, so blocks see the whole image's grid); labels
are numbered 1..N in block order. The output can be a NumPy array or a Zarr array on disk.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def block_grid(h: int, w: int, block: int) -> list[tuple[int, int, int, int]]:
    """Core regions (y0, y1, x0, x1) tiling an image without overlap."""
    return [(y, min(y + block, h), x, min(x + block, w)) for y in range(0, h, block) for x in range(0, w, block)]


def _owned_objects(model, array, core, halo: int, scale, tile_size, tta=False, thresholds=None, diameter=None,
                   grey=False):
    """Segment a block with its halo; return the objects whose centroid lies in the core, as
    (slices in image coordinates, boolean mask) pairs. ``grey``: the whole image is grey (its blocks go in 2-D)."""
    y0, y1, x0, x1 = core
    h, w = array.shape[:2]
    wy0, wy1, wx0, wx1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
    window = np.asarray(array[wy0:wy1, wx0:wx1])
    if grey and window.ndim == 3:
        window = window[..., 0]
    labels = model.predict(window, scale=scale, tile_size=tile_size, tta=tta, thresholds=thresholds, diameter=diameter,
                           route=False)
    if labels.max() == 0:
        return []
    index = np.arange(1, labels.max() + 1)
    centroids = np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, index)).reshape(-1, 2)
    objects = []
    for k, sl, (cy, cx) in zip(index, ndi.find_objects(labels), centroids):
        if sl is None:
            continue
        gy, gx = cy + wy0, cx + wx0
        if not (y0 <= gy < y1 and x0 <= gx < x1):
            continue
        mask = labels[sl] == k
        objects.append(((slice(sl[0].start + wy0, sl[0].stop + wy0), slice(sl[1].start + wx0, sl[1].stop + wx0)), mask))
    return objects


def segment_blocks(model, array, out, block: int = 2048, halo: int = 128, scale: tuple[float, float] | None = None,
                   tile_size: int | None = None, progress: bool = False, client=None, tta: bool = False,
                   thresholds: dict | None = None, diameter: float | None = None, grey: bool | None = None) -> int:
    """Write instance labels of ``array`` into ``out`` (same height/width, zeros) block by block.

    ``scale`` is the whole image's intensity normalisation and ``grey`` whether it is grey (2-D or RGB with
    equal channels), both computed here if None: every block is normalised as the whole image would be,
    even a block whose channels happen to be equal in a colour image. ``diameter``: each
    block is zoomed to the model's trained nucleus size (see ``Model.predict``); the halo, given in
    network pixels, grows with the zoom so blocks keep the same context. With a Dask ``client`` the
    blocks run on its workers. Returns the number of nuclei. Every block is segmented by ``model`` itself: give
    the specialist for the whole image's type (``Model.specialist_for``) where the model has specialists.
    """
    from tqdm.auto import tqdm

    from .network import STRIDE
    from .transforms import intensity_scale, is_grey

    h, w = array.shape[:2]
    if scale is None:
        scale = intensity_scale(array, model.config["normalization"])
    if grey is None:
        grey = is_grey(np.asarray(array))
    factor = model.rescale_factor(diameter)
    if factor < 1:
        halo = int(np.ceil(halo / factor))
    # windows start at multiples of the network's stride: the whole image's downsampling grid
    block, halo = (-(-v // STRIDE) * STRIDE for v in (block, halo))
    cores = block_grid(h, w, block)
    if client is not None:
        model_future = client.scatter(model, broadcast=True)
        futures = [client.submit(_owned_objects, model_future, array, core, halo, scale, tile_size, tta, thresholds,
                                 diameter, grey, pure=False)
                   for core in cores]
        results = (f.result() for f in futures)
    else:
        results = (_owned_objects(model, array, core, halo, scale, tile_size, tta, thresholds, diameter, grey)
                   for core in cores)
    next_label = 1
    for objects in tqdm(results, total=len(cores), desc="blocks", disable=not progress):
        if not objects:
            continue
        # write this block's objects through one region read/write; pixels already owned stay
        y_start = min(sl[0].start for sl, _ in objects)
        y_stop = max(sl[0].stop for sl, _ in objects)
        x_start = min(sl[1].start for sl, _ in objects)
        x_stop = max(sl[1].stop for sl, _ in objects)
        region = np.asarray(out[y_start:y_stop, x_start:x_stop])
        for sl, mask in objects:
            local = (slice(sl[0].start - y_start, sl[0].stop - y_start), slice(sl[1].start - x_start, sl[1].stop - x_start))
            target = region[local]
            target[mask & (target == 0)] = next_label
            next_label += 1
        out[y_start:y_stop, x_start:x_stop] = region
    return next_label - 1
