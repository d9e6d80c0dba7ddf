"""Scaling out on Dask: files spread over workers, and images larger than memory segmented block by block.

- :func:`predict_files_dask` sends one task per file to a Dask cluster (an existing scheduler, or a
  ``LocalCluster``); each worker process loads the model once and reuses it. Results and failures are
  reported exactly as in the single-process run (:mod:`nucleiseg.batch`).
- :func:`segment_large` segments an image opened lazily (tiled TIFF or Zarr) in overlapping blocks and
  writes a Zarr label array. Every nucleus is *owned* by the block that holds its centroid: that block
  writes it whole (it may reach into a neighbour's block, thanks to the halo), the others drop it. Blocks
  see ``halo`` pixels of context on each side, so a nucleus near a block border is segmented as it is
  in the whole image; labels are numbered 1..N in block order.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .batch import Options, Result, predict_one, remove_stale_partials, unique_stems, write_run_files

_WORKER_MODELS: dict = {}  # per worker process: (model path, backend) -> loaded Model


def _worker_model(model_path: str | None, backend: str, threads: int | None):
    key = (model_path, backend)
    if key not in _WORKER_MODELS:
        import torch

        from .model import Model

        if threads:
            torch.set_num_threads(threads)
        model = Model.load(model_path)
        if backend != "torch":
            model.use_backend(backend, threads=threads)
        _WORKER_MODELS[key] = model
    return _WORKER_MODELS[key]


def _predict_task(model_path, backend, threads, path, stem, opts) -> Result:
    return predict_one(_worker_model(model_path, backend, threads), path, stem, opts)


def predict_files_dask(model_path: str | None, paths: list[Path], opts: Options, address: str | None = None,
                       n_workers: int | None = None, backend: str = "torch", progress: bool = True,
                       report=print) -> list[Result]:
    """Predict files on a Dask cluster; same outputs, failure reports and run files as :func:`predict_files`."""
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    from .batch import check_writable

    check_writable(opts.out_dir)
    remove_stale_partials(opts.out_dir)
    cluster = None
    if address is None:
        n_workers = n_workers or 2
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(address or cluster)
    threads = max(1, (os.cpu_count() or 1) // len(client.scheduler_info()["workers"] or [1])) if cluster else None
    try:
        stems = unique_stems(paths)
        futures = {client.submit(_predict_task, model_path, backend, threads, p, stems[p], opts, pure=False): p
                   for p in paths}
        results: dict[Path, Result] = {}
        for future in tqdm(as_completed(futures), total=len(futures), desc="predicting", unit="image", disable=not progress):
            path = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker crash on one file is that file's failure
                result = Result(path, stems[path], "failed", error=f"{path}: worker error ({type(exc).__name__}: {exc})")
            if result.status == "failed":
                report(f"error: {result.error}")
            results[path] = result
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    ordered = [results[p] for p in paths]
    write_run_files(ordered, opts)
    return ordered


# ---- images larger than memory ------------------------------------------------------------------

def open_lazy(path: str | os.PathLike):
    """A lazily read 2-D (or 2-D + colour) array from a tiled TIFF or a Zarr array."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile
        import zarr

        return zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    import zarr

    return zarr.open(str(path), mode="r")


def lazy_intensity_scale(array, normalization: dict, samples: int = 64, size: int = 256) -> tuple[float, float]:
    """Normalisation (offset, scale) of a whole lazy image, from a fixed set of blocks spread over it."""
    from .transforms import intensity_scale

    h, w = array.shape[:2]
    rng = np.random.default_rng(0)
    ys = rng.integers(0, max(1, h - size), samples)
    xs = rng.integers(0, max(1, w - size), samples)
    pieces = [np.asarray(array[y:y + size, x:x + size]).reshape(-1) for y, x in zip(ys, xs)]
    return intensity_scale(np.concatenate(pieces), normalization)


def block_grid(h: int, w: int, block: int) -> list[tuple[int, int, int, int]]:
    """Core regions (y0, y1, x0, x1) tiling an image without overlap."""
    return [(y, min(y + block, h), x, min(x + block, w)) for y in range(0, h, block) for x in range(0, w, block)]


def _owned_objects(model, array, core, halo: int, scale, tile_size):
    """Segment a block with its halo; return the objects whose centroid lies in the core, as
    (slices in image coordinates, boolean mask) pairs."""
    y0, y1, x0, x1 = core
    h, w = array.shape[:2]
    wy0, wy1, wx0, wx1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
    window = np.asarray(array[wy0:wy1, wx0:wx1])
    labels = model.predict(window, scale=scale, tile_size=tile_size)
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


def segment_large(model, source, out: str | os.PathLike, block: int = 2048, halo: int = 128,
                  tile_size: int | None = None, progress: bool = True, client=None) -> Path:
    """Segment a large lazily-read image block by block into a Zarr uint32 label array at ``out``.

    Memory is bounded by the block (+ halo) size. With a Dask ``client`` the blocks run on its workers
    (the model is sent once per worker); the driver writes the objects in block order.
    """
    import zarr
    from tqdm.auto import tqdm

    array = open_lazy(source) if isinstance(source, (str, os.PathLike)) else source
    h, w = array.shape[:2]
    scale = lazy_intensity_scale(array, model.config["normalization"])
    out_arr = zarr.open(str(out), mode="w", shape=(h, w), chunks=(min(1024, h), min(1024, w)), dtype="uint32")
    cores = block_grid(h, w, block)
    if client is not None:
        model_future = client.scatter(model, broadcast=True)
        futures = [client.submit(_owned_objects, model_future, array, core, halo, scale, tile_size, pure=False)
                   for core in cores]
        results = (f.result() for f in futures)
    else:
        results = (_owned_objects(model, array, core, halo, scale, tile_size) for core in cores)
    next_label = 1
    for objects in tqdm(results, total=len(cores), desc="blocks", disable=not progress):
        if not objects:
            continue
        # write this block's objects region by region (bounded memory); pixels already owned stay
        y_start = min(sl[0].start for sl, _ in objects)
        y_stop = max(sl[0].stop for sl, _ in objects)
        x_start = min(sl[1].start for sl, _ in objects)
        x_stop = max(sl[1].stop for sl, _ in objects)
        region = np.asarray(out_arr[y_start:y_stop, x_start:x_stop])
        for sl, mask in objects:
            local = (slice(sl[0].start - y_start, sl[0].stop - y_start), slice(sl[1].start - x_start, sl[1].stop - x_start))
            target = region[local]
            target[mask & (target == 0)] = next_label
            next_label += 1
        out_arr[y_start:y_stop, x_start:x_stop] = region
    return Path(out)
