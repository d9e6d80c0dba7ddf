"""Downloads against a local HTTP server on 127.0.0.1: dataset conversion, resume, and every failure mode."""
import csv
import hashlib
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from httpserver import Server
from nucleiseg.data import find_samples, load_sample
from nucleiseg.datasets import DSB2018_FILES, FIXES_COMMIT, download_dsb2018
from nucleiseg.download import DownloadError, fetch, safe_extract_zip
from nucleiseg.outputs import rle_encode
from nucleiseg.synthetic import nuclei_image


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_bbbc038(folder):
    """Small stand-ins for stage1_train.zip, stage1_test.zip and stage1_solution.csv."""
    truth = {}
    with zipfile.ZipFile(folder / "stage1_train.zip", "w") as zf:
        for i in range(2):
            img, lab = nuclei_image((64, 80), n=5, seed=i)
            sid = f"train{i}"
            zf.writestr(f"{sid}/images/{sid}.png", png_bytes((img // 257).astype(np.uint8)))
            for k in range(1, lab.max() + 1):
                zf.writestr(f"{sid}/masks/m{k:02d}.png", png_bytes(((lab == k) * 255).astype(np.uint8)))
            truth[sid] = lab
    rows = []
    with zipfile.ZipFile(folder / "stage1_test.zip", "w") as zf:
        img, lab = nuclei_image((48, 64), n=4, seed=9)
        zf.writestr("test0/images/test0.png", png_bytes((img // 257).astype(np.uint8)))
        for k in range(1, lab.max() + 1):
            rows.append(["test0", rle_encode(lab == k), 48, 64, "Public"])
        truth["test0"] = lab
    with open(folder / "stage1_solution.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageId", "EncodedPixels", "Height", "Width", "Usage"])
        w.writerows(rows)
    return truth


def test_download_dsb2018_converts_to_labels_layout(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    truth = make_bbbc038(served)
    with Server(served) as url:
        root = download_dsb2018(tmp_path / "data", base_url=url, quiet=True, fixed_labels=False)
    for split, ids in (("stage1_train", ["train0", "train1"]), ("stage1_test", ["test0"])):
        layout, samples = find_samples(root / split)
        assert layout == "labels" and [s.name for s in samples] == ids
        for s in samples:
            _, labels = load_sample(s)
            assert np.array_equal(labels, truth[s.name])  # exact instances back, train masks and test RLE alike
    sums = (root / "SHA256SUMS").read_text()
    assert hashlib.sha256((served / "stage1_train.zip").read_bytes()).hexdigest() in sums
    # a second run verifies against the recorded checksums and keeps the data
    with Server(served) as url:
        assert download_dsb2018(tmp_path / "data", base_url=url, quiet=True, fixed_labels=False) == root


def make_fixes_archive(folder, truth):
    """A stand-in for GitHub's archive of the fixes repository: train0's masks edited (its last nucleus
    deleted, two masks overlapping by a pixel), train1 dropped, as the real fixes drop and edit images."""
    fixed = truth["train0"].copy()
    fixed[fixed == fixed.max()] = 0
    top = f"kaggle-dsbowl-2018-dataset-fixes-{FIXES_COMMIT}/stage1_train/train0"
    with zipfile.ZipFile(folder / f"{FIXES_COMMIT}.zip", "w") as zf:
        zf.writestr(f"{top}/images/train0.png", png_bytes(np.zeros(fixed.shape, np.uint8)))
        for k in range(1, fixed.max() + 1):
            mask = fixed == k
            if k == 2:  # overlaps nucleus 1 by one pixel: the first mask in name order keeps it
                mask = mask | (fixed == 1) & (np.cumsum((fixed == 1).ravel()).reshape(fixed.shape) == 1)
            zf.writestr(f"{top}/masks/m{k:02d}.png", png_bytes((mask * 255).astype(np.uint8)))
    return fixed


def test_download_adds_the_community_fixed_labels(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    truth = make_bbbc038(served)
    fixed = make_fixes_archive(served, truth)
    with Server(served) as url:
        root = download_dsb2018(tmp_path / "data", base_url=url, fixes_url=url, quiet=True)
    # the fixed labels are preferred: the dropped image is skipped, the edited one has its edits
    layout, samples = find_samples(root / "stage1_train")
    assert [s.name for s in samples] == ["train0"] and samples[0].labels.parent.name == "labels_lopuhin_fixed"
    _, labels = load_sample(samples[0])
    assert np.array_equal(labels, fixed) and labels.max() == truth["train0"].max() - 1
    # the original labels stay beside them
    _, originals = find_samples(root / "stage1_train", label_dir="labels")
    assert [s.name for s in originals] == ["train0", "train1"]
    assert FIXES_COMMIT + ".zip" in (root / "SHA256SUMS").read_text()
    # a second run keeps the converted labels without fetching again (the server is gone)
    assert download_dsb2018(tmp_path / "data", base_url="http://127.0.0.1:9", fixes_url="http://127.0.0.1:9",
                            quiet=True) == root


def test_fixes_archive_without_masks_leaves_no_fixed_labels(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    make_bbbc038(served)
    with zipfile.ZipFile(served / f"{FIXES_COMMIT}.zip", "w") as zf:
        zf.writestr("README.rst", "no data here")
    with Server(served) as url, pytest.raises(DownloadError, match="no stage1_train folder"):
        download_dsb2018(tmp_path / "data", base_url=url, fixes_url=url, quiet=True)
    root = tmp_path / "data" / "dsb2018"
    assert (root / "stage1_train" / "labels").is_dir()  # the BBBC038 part is complete and kept
    assert not (root / "stage1_train" / "labels_lopuhin_fixed").exists() and not (root / ".fixes.partial").exists()


def test_changed_archive_fails_checksum_and_leaves_nothing(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    make_bbbc038(served)
    with Server(served) as url:
        root = download_dsb2018(tmp_path / "data", base_url=url, quiet=True, fixed_labels=False)
    (root / "downloads" / "stage1_test.zip").unlink()
    (served / "stage1_test.zip").write_bytes(b"tampered" + (served / "stage1_test.zip").read_bytes())
    with Server(served) as url, pytest.raises(DownloadError, match="checksum mismatch"):
        download_dsb2018(tmp_path / "data", base_url=url, quiet=True, fixed_labels=False)
    assert not (root / "downloads" / "stage1_test.zip").exists()
    assert not list((root / "downloads").glob("*.part"))


def test_pinned_checksum_mismatch(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    make_bbbc038(served)
    monkeypatch.setitem(DSB2018_FILES, "stage1_train.zip", "0" * 64)
    with Server(served) as url, pytest.raises(DownloadError, match="stage1_train.zip: checksum mismatch"):
        download_dsb2018(tmp_path / "data", base_url=url, quiet=True, fixed_labels=False)
    assert not (tmp_path / "data" / "dsb2018" / "stage1_train").exists()


def test_truncated_transfer_is_resumed(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    payload = np.random.default_rng(0).bytes(300_000)
    (served / "blob.bin").write_bytes(payload)
    with Server(served, truncate={"blob.bin": 100_000}) as url:
        path = fetch(f"{url}/blob.bin", tmp_path / "blob.bin", sha256=hashlib.sha256(payload).hexdigest(), quiet=True)
    assert path.read_bytes() == payload


def test_partial_file_from_killed_run_is_resumed(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    payload = np.random.default_rng(1).bytes(200_000)
    (served / "blob.bin").write_bytes(payload)
    (tmp_path / "blob.bin.part").write_bytes(payload[:50_000])
    with Server(served) as url:
        fetch(f"{url}/blob.bin", tmp_path / "blob.bin", quiet=True)
    assert (tmp_path / "blob.bin").read_bytes() == payload
    assert not (tmp_path / "blob.bin.part").exists()


def test_truncated_transfer_that_never_completes_is_rejected(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "blob.bin").write_bytes(b"x" * 10_000)
    cuts = {"blob.bin": 100}
    with Server(served, truncate=cuts) as url:
        from httpserver import RangeHandler

        class Always(dict):  # cut every attempt short
            def pop(self, key, default=None):
                return 100 if key == "blob.bin" else default
        RangeHandler.truncate = Always()
        with pytest.raises(DownloadError, match="truncated"):
            fetch(f"{url}/blob.bin", tmp_path / "blob.bin", retries=2, quiet=True)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()


def test_missing_file_is_a_clear_error(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    with Server(served) as url, pytest.raises(DownloadError, match="404"):
        fetch(f"{url}/nothing.zip", tmp_path / "nothing.zip", quiet=True)


@pytest.mark.parametrize("evil", ["../escape.txt", "a/../../escape.txt", "/abs/escape.txt"])
def test_zip_slip_is_rejected(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/file.txt", "fine")
        zf.writestr(evil, "gotcha")
    dest = tmp_path / "out" / "inner"
    with pytest.raises(DownloadError, match="zip slip"):
        safe_extract_zip(archive, dest)
    assert not (tmp_path / "out" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert not dest.exists() or not any(dest.iterdir())


def test_corrupt_zip_is_rejected(tmp_path):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DownloadError, match="not a valid zip"):
        safe_extract_zip(archive, tmp_path / "out")


def test_download_command_options(tmp_path, capsys):
    from nucleiseg.cli import main

    served = tmp_path / "served"
    served.mkdir()
    make_bbbc038(served)
    with Server(served) as url:  # no fixes archive served: --no-fixed-labels must not ask for it
        assert main(["download", "dsb2018", "--dest", str(tmp_path / "plain"), "--url", url, "--no-fixed-labels",
                     "--quiet"]) == 0
        assert not (tmp_path / "plain" / "dsb2018" / "stage1_train" / "labels_lopuhin_fixed").exists()
        make_fixes_archive(served, make_bbbc038(served))
        assert main(["download", "dsb2018", "--dest", str(tmp_path / "full"), "--url", url, "--fixes-url", url,
                     "--quiet"]) == 0
    assert (tmp_path / "full" / "dsb2018" / "stage1_train" / "labels_lopuhin_fixed" / "train0.png").is_file()
    assert "dataset ready" in capsys.readouterr().out
