"""Real processes: a killed training run resumed to the same end state, DDP with 2 CPU processes
(gloo) matching a single process, Dask workers matching the single-process prediction, and
block-wise segmentation of a lazily read large image."""
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from PIL import Image

import nucleiseg
from conftest import make_labels_layout, to_uint8
from nucleiseg.metrics import matching
from nucleiseg.model import Model
from nucleiseg.synthetic import mosaic, nuclei_image

CLI = [sys.executable, "-m", "nucleiseg.cli"]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore"}


def train_cmd(data, out, *extra):
    return CLI + ["train", "--data", str(data), "--out", str(out), "--epochs", "4", "--crop", "64",
                  "--encoder-weights", "none", "--val-fraction", "0.25", "--precision", "32", "--quiet",
                  "--lr", "2e-3", *extra]


def history_rows(run):
    path = run / "history.csv"
    if not path.exists():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_labels_layout(tmp_path_factory.mktemp("d") / "data", n=12, shape=(96, 96))


def test_killed_training_resumes_to_same_end_state(small_data, tmp_path):
    ref = tmp_path / "ref"
    args = ("--batch-size", "4", "--crops-per-image", "8")  # enough steps per epoch to kill mid-run
    subprocess.run(train_cmd(small_data, ref, *args), env=ENV, check=True, timeout=600, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(small_data, run, *args), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "last.ckpt").exists():
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import torch

    saved_epoch = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["epoch"]
    assert saved_epoch < 3 and not (run / "model").exists(), "the kill should land mid-run (before the last epoch)"
    before = history_rows(run)[: saved_epoch + 1]
    subprocess.run(CLI + ["train", "--resume", str(run), "--quiet"], env=ENV, check=True, timeout=600,
                   capture_output=True)
    rows, ref_rows = history_rows(run), history_rows(ref)
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]  # every planned epoch, none twice
    assert rows[: saved_epoch + 1] == before  # epochs finished before the kill are kept, not redone
    # the uninterrupted run is bit-reproducible; the resumed one continues from the checkpoint at the
    # epoch boundary and ends in an equivalent (not bit-identical) state
    assert rows[0]["train_loss"] == ref_rows[0]["train_loss"] and rows[0]["val_loss"] == ref_rows[0]["val_loss"]
    # (train loss averages 72 crops per epoch; val loss only 3 small images, too noisy to compare runs)
    assert float(rows[-1]["train_loss"]) == pytest.approx(float(ref_rows[-1]["train_loss"]), rel=0.1)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])  # the resumed run kept learning
    b = Model.load(run / "model")
    # the recorded training time adds the killed run's epochs to the resumed run's, and grows per epoch
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and b.config["training"]["wall_time_s"] >= elapsed[-1] - 0.1
    assert b.config["training"]["wall_time_s"] > float(before[-1]["elapsed_s"])
    image, labels = nuclei_image((96, 96), n=8, seed=50)
    assert b.predict(image).shape == labels.shape
    # a finished run is extended with --epochs: only the new epoch is trained
    subprocess.run(CLI + ["train", "--resume", str(run), "--epochs", "5", "--quiet"], env=ENV, check=True,
                   timeout=600, capture_output=True)
    extended = history_rows(run)
    assert [r["epoch"] for r in extended] == ["0", "1", "2", "3", "4"] and extended[:4] == rows
    assert Model.load(run / "model").config["training"]["epochs"] == 5


def test_ddp_two_cpu_processes_match_single_process(small_data, tmp_path):
    single = tmp_path / "single"
    ddp = tmp_path / "ddp"
    subprocess.run(train_cmd(small_data, single, "--batch-size", "4"), env=ENV, check=True, timeout=600,
                   capture_output=True)
    result = subprocess.run(train_cmd(small_data, ddp, "--batch-size", "2", "--devices", "2", "--strategy", "ddp"),
                            env=ENV, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    hs, hd = history_rows(single), history_rows(ddp)
    assert len(hs) == len(hd) == 4
    # same global batches each step; only BatchNorm statistics (per rank) differ
    for rs, rd in zip(hs, hd):
        assert float(rs["train_loss"]) == pytest.approx(float(rd["train_loss"]), rel=0.15, abs=0.02)
    model = Model.load(ddp / "model")
    image, _ = nuclei_image((96, 96), n=8, seed=51)
    assert model.predict(image).shape == (96, 96)
    assert len(list((ddp / "checkpoints").glob("*.ckpt"))) == 2  # rank 0 only: best + last


def test_dask_workers_give_identical_labels(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(to_uint8(nuclei_image((128, 160), n=12, seed=i)[0])).save(folder / f"im{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    single, dask = tmp_path / "single", tmp_path / "dask"
    r1 = subprocess.run(CLI + ["predict", str(folder), "-o", str(single), "--quiet"], env=ENV, capture_output=True, text=True)
    r2 = subprocess.run(CLI + ["predict", str(folder), "-o", str(dask), "--quiet", "--workers", "2"], env=ENV,
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == r2.returncode == 1  # the broken file fails in both
    assert "broken.png" in r2.stderr and r2.stderr.count("error:") == 1
    for i in range(6):
        a = tifffile.imread(single / f"im{i}_labels.tif")
        b = tifffile.imread(dask / f"im{i}_labels.tif")
        assert np.array_equal(a, b)
    assert (dask / "summary.csv").read_text().count(",done,") == 6


def test_large_lazy_image_blockwise_matches_in_memory(tmp_path):
    from nucleiseg.distributed import segment_large

    image, _ = mosaic((2600, 2300), seed=3)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image, tile=(256, 256))  # a tiled TIFF, read lazily block by block
    model = nucleiseg.load()
    model.use_backend("onnx")
    out = segment_large(model, path, tmp_path / "labels.zarr", block=1024, halo=128, progress=False)
    import zarr

    blockwise = np.asarray(zarr.open(str(out), mode="r")[:])
    in_memory = model.predict(image)
    assert blockwise.shape == image.shape
    n = int(blockwise.max())
    assert n > 100 and len(np.unique(blockwise)) == n + 1  # unique labels 1..N
    m = matching(in_memory, blockwise, 0.5)
    assert m["f1"] > 0.995, m  # blocks and tiles on the whole image's stride grid: measured 0.9999
    assert m["mean_matched_iou"] > 0.99, m


def test_large_lazy_image_measures_the_nucleus_size(tmp_path):
    from nucleiseg.distributed import segment_large

    small, small_labels = mosaic((640, 640), seed=5)
    k = 4  # nuclei about 4x the trained size, as in a high-magnification slide
    image, true = np.kron(small, np.ones((k, k), small.dtype)), np.kron(small_labels, np.ones((k, k), small_labels.dtype))
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image, tile=(256, 256))
    model = nucleiseg.load()
    model.use_backend("onnx")
    import zarr

    def blockwise(name, **kwargs):
        out = segment_large(model, path, tmp_path / name, block=1024, halo=128, progress=False, **kwargs)
        return np.asarray(zarr.open(str(out), mode="r")[:])

    auto, plain = blockwise("auto.zarr"), blockwise("plain.zarr", diameter=None)
    f1_auto, f1_plain = matching(true, auto, 0.5)["f1"], matching(true, plain, 0.5)["f1"]
    f1_small = matching(small_labels, model.predict(small), 0.5)["f1"]
    assert f1_auto >= f1_small - 0.1 and f1_auto > f1_plain + 0.1, (f1_auto, f1_plain, f1_small)
    n = int(auto.max())
    assert len(np.unique(auto)) == n + 1  # unique labels 1..N across blocks
    # zoomed block by block as good as the zoomed whole image (each window is resampled on its own
    # grid, so single nuclei differ: F1 between the two measured 0.92)
    assert f1_auto >= matching(true, model.predict(image), 0.5)["f1"] - 0.03


def test_blocks_normalise_a_colour_image_as_colour_even_where_its_channels_are_equal():
    """A model that gives grey images as gamma channels: a colour image segmented block by block is
    normalised as colour in every block, also in blocks where its channels happen to be equal; a grey
    image saved as RGB is segmented as the grey image it is."""
    from nucleiseg.blocks import segment_blocks

    grey, _ = mosaic((512, 768), seed=7)
    colour = np.repeat(grey[..., None], 3, axis=2)
    colour[:, :320, 1] //= 2  # coloured on the left only: blocks on the right see equal channels
    plain = nucleiseg.load()
    gamma = nucleiseg.load()
    gamma.config["normalization"] = {**gamma.config["normalization"], "grey_gammas": [1.0, 0.5, 0.25]}

    def blockwise(model, image):
        out = np.zeros(image.shape[:2], np.int32)
        segment_blocks(model, image, out, block=256, halo=64, diameter=None)
        return out

    assert np.array_equal(blockwise(gamma, colour), blockwise(plain, colour))
    rgb_grey = np.repeat(grey[..., None], 3, axis=2)
    gamma_grey = blockwise(gamma, rgb_grey)
    assert np.array_equal(gamma_grey, blockwise(gamma, grey))
    assert not np.array_equal(gamma_grey, blockwise(plain, grey))  # the gamma channels do reach the network
