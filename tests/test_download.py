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
from nucleiseg.datasets import DSB2018_FILES, download_dsb2018
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
        root = download_dsb2018(tmp_path / "data", base_url=url, quiet=True)
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
        assert download_dsb2018(tmp_path / "data", base_url=url, quiet=True) == root


def test_changed_archive_fails_checksum_and_leaves_nothing(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    make_bbbc038(served)
    with Server(served) as url:
        root = download_dsb2018(tmp_path / "data", base_url=url, quiet=True)
    (root / "downloads" / "stage1_test.zip").unlink()
    (served / "stage1_test.zip").write_bytes(b"tampered" + (served / "stage1_test.zip").read_bytes())
    with Server(served) as url, pytest.raises(DownloadError, match="checksum mismatch"):
        download_dsb2018(tmp_path / "data", base_url=url, quiet=True)
    assert not (root / "downloads" / "stage1_test.zip").exists()
    assert not list((root / "downloads").glob("*.part"))


def test_pinned_checksum_mismatch(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    make_bbbc038(served)
    monkeypatch.setitem(DSB2018_FILES, "stage1_train.zip", "0" * 64)
    with Server(served) as url, pytest.raises(DownloadError, match="stage1_train.zip: checksum mismatch"):
        download_dsb2018(tmp_path / "data", base_url=url, quiet=True)
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
