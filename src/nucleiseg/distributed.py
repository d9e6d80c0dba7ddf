"""Scaling out on Dask: files spread over workers, and images larger than memory segmented block by block.

- :func:`predict_files_dask` sends one task per file to a Dask cluster (an existing scheduler, or a
  ``LocalCluster``); each worker process loads the model once and reuses it. Results and failures are
  reported exactly as in the single-process run (:mod:`nucleiseg.batch`).
- :func:`segment_large` segments an image opened lazily (tiled TIFF or Zarr) block by block
  (:mod:`nucleiseg.blocks`) and writes a Zarr label array, optionally running blocks on Dask workers.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

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


def lazy_pixels(array, samples: int = 64, size: int = 256) -> np.ndarray:
    """Pixels of a lazy image from a fixed set of blocks spread over it, as an (N, 1) or (N, 1, C) array:
    enough to normalise the whole image and to tell whether it is grey without reading all of it."""
    h, w = array.shape[:2]
    rng = np.random.default_rng(0)
    ys = rng.integers(0, max(1, h - size), samples)
    xs = rng.integers(0, max(1, w - size), samples)
    pieces = [np.asarray(array[y:y + size, x:x + size]).reshape(-1, 1, *array.shape[2:]) for y, x in zip(ys, xs)]
    return np.concatenate(pieces)


def lazy_windows(array, size: int = 1024) -> list[np.ndarray]:
    """Five windows of a lazy image (its centre and the centres of its quarters), read to measure the
    nucleus size without reading the whole image."""
    h, w = array.shape[:2]
    centres = [(h // 2, w // 2)] + [(h * fy // 4, w * fx // 4) for fy in (1, 3) for fx in (1, 3)]
    windows = []
    for cy, cx in centres:
        y0, x0 = max(0, min(cy - size // 2, h - size)), max(0, min(cx - size // 2, w - size))
        windows.append(np.asarray(array[y0:y0 + size, x0:x0 + size]))
    return windows


def segment_large(model, source, out: str | os.PathLike, block: int = 2048, halo: int = 128,
                  tile_size: int | None = None, progress: bool = True, client=None,
                  diameter: float | str | None = "auto") -> Path:
    """Segment a large lazily-read image block by block into a Zarr uint32 label array at ``out``.

    Memory is bounded by the block (+ halo) size. With a Dask ``client`` the blocks run on its workers
    (the model is sent once per worker); the driver writes the objects in block order. ``diameter`` as
    in ``Model.predict``; 'auto' measures the nuclei in five windows (:func:`lazy_windows`), which also choose
    the model's specialist for the image's type, if it has one.
    """
    import zarr

    from .blocks import segment_blocks
    from .transforms import intensity_scale, is_grey

    array = open_lazy(source) if isinstance(source, (str, os.PathLike)) else source
    h, w = array.shape[:2]
    pixels = lazy_pixels(array)
    scale, grey = intensity_scale(pixels, model.config["normalization"]), is_grey(pixels)
    if isinstance(diameter, str) or model.specialists:
        windows = [win[..., 0] if grey and win.ndim == 3 else win for win in lazy_windows(array)]
        model = model.specialist_for(windows, scale)  # one model for all blocks, chosen by the image's type
        if isinstance(diameter, str):  # 'auto' (or a wrong word: one error message, Model.resolve_diameter's)
            diameter = model.resolve_diameter(diameter, windows, tile_size=tile_size, scale=scale)
    out_arr = zarr.open(str(out), mode="w", shape=(h, w), chunks=(min(1024, h), min(1024, w)), dtype="uint32")
    segment_blocks(model, array, out_arr, block=block, halo=halo, scale=scale, tile_size=tile_size,
                   progress=progress, client=client, diameter=diameter, grey=grey)
    return Path(out)
