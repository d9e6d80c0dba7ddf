"""Encoder initialisation: torchvision's ImageNet checkpoint (downloaded, hash-checked, cached),
a local file (.safetensors, or .pth read with ``weights_only=True``), or none.

Loading is strict on the encoder: every ``features.*`` tensor must be present with the right shape;
the only keys allowed to be left over are the ImageNet classifier's.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .download import fetch
from .network import MobileNetV2Encoder

# torchvision's official MobileNetV2 IMAGENET1K_V1 checkpoint; the hash prefix is part of its file name.
IMAGENET_URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
IMAGENET_SHA256_PREFIX = "b0353104"


def cache_dir() -> Path:
    """Where downloaded files are kept (``$NUCLEISEG_CACHE`` or ``~/.cache/nucleiseg``)."""
    return Path(os.environ.get("NUCLEISEG_CACHE", Path.home() / ".cache" / "nucleiseg"))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors, or from a .pth/.pt with ``weights_only=True`` (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def imagenet_checkpoint(url: str | None = None, quiet: bool = False) -> Path:
    """Path of torchvision's ImageNet MobileNetV2 checkpoint, downloading it once into the cache.

    ``$NUCLEISEG_IMAGENET_URL`` / ``$NUCLEISEG_IMAGENET_SHA256`` override the address and the expected
    hash (a mirror, or a local server in tests).
    """
    url = url or os.environ.get("NUCLEISEG_IMAGENET_URL", IMAGENET_URL)
    sha = os.environ.get("NUCLEISEG_IMAGENET_SHA256", IMAGENET_SHA256_PREFIX)
    return fetch(url, cache_dir() / f"mobilenet_v2-{sha[:8]}.pth", sha256=sha, quiet=quiet)


def load_encoder_weights(encoder: MobileNetV2Encoder, source: str | None) -> str:
    """Initialise ``encoder`` from ``source`` ('imagenet', a file path, or None/'none'); return a description."""
    if source in (None, "", "none"):
        return "random"
    path = imagenet_checkpoint() if source == "imagenet" else Path(source)
    state = read_state_dict(path)
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    leftover = sorted(k for k in state if not k.startswith(("features.", "classifier.")))
    if leftover:
        raise ValueError(f"{path}: not a MobileNetV2 checkpoint (unexpected keys such as {leftover[:3]})")
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(features))
    shape_errors = [k for k in features if k in expected and features[k].shape != expected[k].shape]
    unexpected = sorted(set(features) - set(expected))
    if missing or shape_errors or unexpected:
        raise ValueError(f"{path}: encoder weights do not match MobileNetV2: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {shape_errors[:3]}")
    encoder.load_state_dict(features, strict=True)
    return str(path)
