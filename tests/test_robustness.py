"""Bad input never costs the run: a self-made malformed corpus, model-file damage, atomic outputs,
overwrite protection, and resuming after a real process is killed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import make_labels_layout, to_uint8
from nucleiseg.cli import main
from nucleiseg.data import find_samples, load_sample
from nucleiseg.io import ImageError, atomic_path, read_image
from nucleiseg.model import DEFAULT_MODEL_DIR, Model, ModelError
from nucleiseg.synthetic import nuclei_image

NUCLEISEG = [sys.executable, "-m", "nucleiseg.cli"]


def good_image(seed=0, shape=(96, 128)):
    img, _ = nuclei_image(shape, n=8, seed=seed)
    return to_uint8(img)


def make_malformed_corpus(folder: Path) -> dict[str, str]:
    """Write one file per failure kind; returns file name -> expected words in its error message."""
    folder.mkdir(parents=True, exist_ok=True)
    good = good_image()
    Image.fromarray(good).save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "full.png").unlink()
    expected = {}
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    expected["truncated.png"] = "truncated"
    (folder / "garbage.tif").write_bytes(os.urandom(4096))
    expected["garbage.tif"] = "not a readable"
    (folder / "text.jpg").write_text("this is not an image\n" * 20)
    expected["text.jpg"] = "not a readable"
    (folder / "empty.png").write_bytes(b"")
    expected["empty.png"] = "empty file"
    tifffile.imwrite(folder / "complex.tif", np.random.default_rng(0).random((64, 64)).astype(np.complex64))
    expected["complex.tif"] = "unsupported pixel type complex64"
    tifffile.imwrite(folder / "bool.tif", np.random.default_rng(0).random((64, 64)) > 0.5)
    expected["bool.tif"] = "unsupported pixel type bool"
    nan = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    nan[3, 3] = np.nan
    tifffile.imwrite(folder / "nan.tif", nan)
    expected["nan.tif"] = "NaN"
    inf = np.ones((64, 64), np.float32)
    inf[5, 5] = np.inf
    tifffile.imwrite(folder / "inf.tif", inf)
    expected["inf.tif"] = "infinite"
    tifffile.imwrite(folder / "zstack.tif", np.stack([good] * 10), photometric="minisblack")
    expected["zstack.tif"] = "axis 0"
    tifffile.imwrite(folder / "timeseries.tif", np.stack([np.stack([good] * 3)] * 5), photometric="minisblack")
    expected["timeseries.tif"] = "3-D array"
    return expected


def test_reader_errors_name_file_and_problem(tmp_path):
    expected = make_malformed_corpus(tmp_path / "bad")
    expected_4d = {"timeseries.tif": "4-D array"}
    for name, words in expected.items():
        with pytest.raises(ImageError) as info:
            read_image(tmp_path / "bad" / name)
        message = str(info.value)
        assert name in message and "\n" not in message
        assert words in message or expected_4d.get(name, "?") in message, message


def test_pixel_limit(tmp_path):
    Image.fromarray(good_image(shape=(200, 300))).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="exceeds the limit of 10,000"):
        read_image(tmp_path / "big.png", max_pixels=10_000)


def test_predict_mixed_folder(tmp_path, capsys):
    folder = tmp_path / "in"
    expected = make_malformed_corpus(folder)
    for i in range(2):
        Image.fromarray(good_image(i)).save(folder / f"good{i}.png")
    tifffile.imwrite(folder / "good16.tif", nuclei_image((80, 80), n=5, seed=4)[0])
    Image.fromarray(good_image(5, shape=(200, 300))).save(folder / "toolarge.png")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "out"
    code = main(["predict", str(folder), "-o", str(out), "--quiet", "--max-pixels", "40000"])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == len(expected) + 1
    for name in list(expected) + ["toolarge.png"]:
        assert sum(name in line for line in lines) == 1, name
    assert "Traceback" not in err
    for stem in ("good0", "good1", "good16"):
        for suffix in ("_labels.tif", "_mask.png", "_overlay.png", "_nuclei.csv"):
            assert (out / f"{stem}{suffix}").is_file()
    produced = {p.name for p in out.iterdir()}
    assert not any(n.startswith(".") for n in produced)  # no temporary leftovers
    assert not any(n.startswith(tuple(Path(k).stem + "_" for k in expected)) for n in produced)
    summary = (out / "summary.csv").read_text()
    assert summary.count(",failed,") == len(expected) + 1 and summary.count(",done,") == 3
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # inputs untouched


def test_empty_folder_and_unwritable_output(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "no image files" in err and str(tmp_path / "empty") in err
    Image.fromarray(good_image()).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("x")
    assert main(["predict", str(tmp_path / "a.png"), "-o", str(tmp_path / "file" / "out")]) == 1
    assert "not writable" in capsys.readouterr().err


def test_diameter_option_takes_a_number_auto_or_none(tmp_path, capsys):
    Image.fromarray(good_image()).save(tmp_path / "a.png")
    for value in ("auto", "none", "NONE", "20"):
        assert main(["predict", str(tmp_path / "a.png"), "-o", str(tmp_path / value), "--diameter", value, "--quiet"]) == 0
    # nuclei of the trained size: 'auto' measures them and leaves the image as it is, like 'none'
    read = lambda d: tifffile.imread(tmp_path / d / "a_labels.tif")  # noqa: E731
    assert read("auto").max() > 0 and np.array_equal(read("auto"), read("none"))
    for bad in ("0", "-5", "big"):
        assert main(["predict", str(tmp_path / "a.png"), "-o", str(tmp_path / "bad"), "--diameter", bad]) == 1
        assert "--diameter must be a positive number" in capsys.readouterr().err


def test_existing_outputs_need_overwrite(tmp_path, capsys):
    Image.fromarray(good_image()).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "a.png"), "-o", str(out), "--quiet"]) == 0
    stamp = (out / "a_labels.tif").stat().st_mtime_ns
    assert main(["predict", str(tmp_path / "a.png"), "-o", str(out), "--quiet"]) == 1
    assert "exists (use --overwrite" in capsys.readouterr().err
    assert (out / "a_labels.tif").stat().st_mtime_ns == stamp
    assert main(["predict", str(tmp_path / "a.png"), "-o", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "a_labels.tif").stat().st_mtime_ns != stamp


def test_dataset_problems_are_named(tmp_path):
    root = make_labels_layout(tmp_path / "ds", n=3, shape=(64, 64))
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(root / "labels" / "img01.png")
    _, samples = find_samples(root)
    with pytest.raises(ImageError, match="img01.png.*differs"):
        load_sample(samples[1])
    (root / "labels" / "orphan.png").write_bytes((root / "labels" / "img00.png").read_bytes())
    with pytest.raises(ImageError, match="orphan.png: label without its image"):
        find_samples(root)


@pytest.mark.parametrize("damage,words", [
    ("missing_weights", "weights file missing"),
    ("corrupt_weights", "corrupt weights"),
    ("other_version", "format version"),
    ("other_architecture", "architecture"),
    ("wrong_tensors", "do not match config.json"),
    ("bad_json", "not valid JSON"),
    ("small_blocks", "block_size 512 is too small"),
])
def test_damaged_model_folders_are_refused(tmp_path, damage, words):
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    if damage == "missing_weights":
        (folder / "weights.safetensors").unlink()
    elif damage == "corrupt_weights":
        data = (folder / "weights.safetensors").read_bytes()
        (folder / "weights.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "other_version":
        (folder / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    elif damage == "other_architecture":
        (folder / "config.json").write_text(json.dumps({**config, "architecture": {**config["architecture"], "name": "resnet-unet"}}))
    elif damage == "wrong_tensors":
        arch = {**config["architecture"], "decoder_channels": [64, 64, 48, 32, 16]}
        (folder / "config.json").write_text(json.dumps({**config, "architecture": arch}))
    elif damage == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif damage == "small_blocks":  # blocks of 256 px with a 256 px halo would not fit in 512: split again and again
        (folder / "config.json").write_text(json.dumps({**config, "inference": {**config["inference"], "block_size": 512}}))
    with pytest.raises(ModelError, match=words):
        Model.load(folder)


def _outputs_complete(out: Path, stems: list[str]) -> bool:
    return all((out / f"{s}{suf}").is_file() for s in stems for suf in ("_labels.tif", "_mask.png", "_overlay.png", "_nuclei.csv"))


def test_killed_prediction_resumes(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    stems = [f"img{i:02d}" for i in range(14)]
    for i, stem in enumerate(stems):
        Image.fromarray(good_image(i, shape=(384, 384))).save(folder / f"{stem}.png")
    out = tmp_path / "out"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen(NUCLEISEG + ["predict", str(folder), "-o", str(out), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*_nuclei.csv"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("*_nuclei.csv")))
    assert 3 <= finished < len(stems), "the kill should land mid-run"
    result = subprocess.run(NUCLEISEG + ["predict", str(folder), "-o", str(out), "--quiet", "--resume"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout
    skipped = int(result.stdout.split(" skipped")[0].split(", ")[-1])
    assert skipped >= finished - 1
    assert _outputs_complete(out, stems)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for stem in stems:  # every output is complete and readable
        assert tifffile.imread(out / f"{stem}_labels.tif").shape == (384, 384)
        Image.open(out / f"{stem}_overlay.png").load()


def test_sigterm_leaves_no_partial_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    n_images = 120  # far more than are done before the signal, so the run cannot finish first
    for i in range(n_images):
        Image.fromarray(good_image(i % 30, shape=(256, 256))).save(folder / f"im{i:03d}.png")
    out = tmp_path / "out"
    proc = subprocess.Popen(NUCLEISEG + ["predict", str(folder), "-o", str(out), "--quiet"],
                            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*_labels.tif"))) < 2:
        time.sleep(0.01)
    proc.terminate()
    code = proc.wait(timeout=60)
    done = len(list(out.glob("*_labels.tif")))
    assert code == 130, f"exit code {code} after {done} of {n_images} images: {proc.stderr.read().decode()[-500:]}"
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left after SIGTERM: {leftovers}"


def test_atomic_writes_keep_nothing_on_error_and_get_usual_permissions(tmp_path):
    target = tmp_path / "weights.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:  # a writer that creates its file private (as safetensors does)
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert list(tmp_path.iterdir()) == [target]


def test_evaluate_skips_bad_samples_and_fails_loudly(tmp_path, capsys):
    root = make_labels_layout(tmp_path / "ds", n=4, shape=(64, 64))
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(root / "labels" / "img01.png")  # wrong size
    (root / "labels" / "orphan.png").write_bytes((root / "labels" / "img00.png").read_bytes())  # no image
    (root / "images" / "img02.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")  # corrupt image
    code = main(["evaluate", "--data", str(root), "-o", str(tmp_path / "ev"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert any("img01.png" in e and "differs" in e for e in errors)
    assert any("orphan.png" in e and "without its image" in e for e in errors)
    assert any("img02.png" in e for e in errors)
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["summary"]["n_images"] == 2 and len(report["skipped"]) == 3
