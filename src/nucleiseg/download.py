"""Downloading files safely: resumable HTTP with checksum checks, and archive extraction without zip slip.

Used for the ImageNet encoder checkpoint (:mod:`nucleiseg.weights`) and public datasets
(:mod:`nucleiseg.datasets`). Errors leave no partial file at the destination; an interrupted process
leaves ``<dest>.part``, which the next call resumes with an HTTP Range request.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download or archive could not be used; the message says which and why."""


def sha256sum(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hash(path: Path, sha256: str | None, url: str) -> None:
    if sha256 is None:
        return
    actual = sha256sum(path)
    if not actual.startswith(sha256.lower()):
        path.unlink(missing_ok=True)
        raise DownloadError(f"{url}: checksum mismatch (expected sha256 {sha256}, got {actual}); the file was deleted")


def fetch(url: str, dest: str | os.PathLike, sha256: str | None = None, retries: int = 3,
          timeout: float = 60.0, quiet: bool = False) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify ``sha256`` (full hash or prefix).

    A transfer that ends early is resumed up to ``retries`` times; if it still fails the partial file
    is removed and :class:`DownloadError` raised. ``dest`` appears only once complete and verified.
    """
    dest = Path(dest)
    if dest.exists():
        _check_hash(dest, sha256, url)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error, complete = "unknown error", False
    for _attempt in range(retries + 1):
        try:
            complete = _transfer(url, part, timeout, quiet)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403, 404, 410):
                break
            continue
        if complete:
            break
        last_error = "the transfer ended before the announced size (truncated)"
    if not complete:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: download failed ({last_error}); partial data deleted")
    _check_hash(part, sha256, url)
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, timeout: float, quiet: bool) -> bool:
    """Append the rest of ``url`` to ``part``; True when the announced length was reached."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "nucleiseg"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - user-chosen http(s) URL
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # range not satisfiable: we already have everything
            return True
        raise
    with response:
        if have and response.status != 206:  # server ignored Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        with open(part, mode) as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                          desc=part.name[:-5], disable=quiet, leave=False) as bar:
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                fh.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    return total is None or size >= total


def safe_extract_zip(archive: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract a zip into ``dest`` after checking that no member escapes it (zip slip) and it is intact."""
    archive, dest = Path(archive), Path(dest)
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in members:
                target = (root / member.filename).resolve()
                if member.filename.startswith(("/", "\\")) or (target != root and root not in target.parents):
                    raise DownloadError(f"{archive}: unsafe path {member.filename!r} in archive (zip slip); nothing extracted")
            bad = zf.testzip()
            if bad is not None:
                raise DownloadError(f"{archive}: corrupt member {bad!r}; nothing extracted")
            tmp = dest.with_name(dest.name + ".extracting")
            shutil.rmtree(tmp, ignore_errors=True)
            zf.extractall(tmp)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archive}: not a valid zip archive ({exc})") from None
    dest.mkdir(parents=True, exist_ok=True)
    extracted = []
    for item in sorted(tmp.iterdir()):
        target = dest / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(item, target)
        extracted.append(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return extracted
