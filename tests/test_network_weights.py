"""Network shapes, torchvision-compatible encoder weights (file, local server download), freezing."""
import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import SHARED_WEIGHTS, needs_shared_weights
from httpserver import Server
from nucleiseg.download import DownloadError
from nucleiseg.model import Model, make_config
from nucleiseg.network import MobileNetV2Encoder, UNet
from nucleiseg.weights import imagenet_checkpoint, load_encoder_weights

# a few keys exactly as torchvision.models.mobilenet_v2().state_dict() names them
TORCHVISION_KEYS = ["features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight",
                    "features.1.conv.1.weight", "features.1.conv.2.bias", "features.2.conv.0.0.weight",
                    "features.2.conv.2.weight", "features.2.conv.3.num_batches_tracked", "features.17.conv.3.weight",
                    "features.18.0.weight", "features.18.1.bias"]


def torchvision_like_checkpoint(seed=0):
    """A full MobileNetV2 state dict (features + 1000-class classifier) in torchvision's layout."""
    torch.manual_seed(seed)
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in MobileNetV2Encoder().state_dict().items()}
    state["classifier.1.weight"] = torch.randn(1000, 1280)
    state["classifier.1.bias"] = torch.randn(1000)
    return state


def test_encoder_has_torchvision_parameter_names():
    keys = MobileNetV2Encoder().state_dict().keys()
    assert len(keys) == 312  # torchvision's 314 minus the classifier's weight and bias
    assert set(TORCHVISION_KEYS) <= set(keys)


@pytest.mark.parametrize("size", [(32, 32), (65, 97), (100, 77), (257, 300)])
def test_any_image_size_gives_full_size_maps(size):
    model = Model(UNet(3), make_config("contour"))
    maps = model.predict_maps(np.random.default_rng(0).random(size).astype(np.float32))
    assert maps.shape == (3, *size)
    assert np.allclose(maps.sum(axis=0), 1, atol=1e-4)
    assert model.predict(np.random.default_rng(0).random(size).astype(np.float32)).shape == size


def test_unet_output_channels_configurable():
    for c in (2, 3, 5):
        assert UNet(c)(torch.rand(1, 3, 64, 96)).shape == (1, c, 64, 96)


def test_load_safetensors_and_pth_strictly(tmp_path):
    state = torchvision_like_checkpoint()
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        enc = MobileNetV2Encoder()
        load_encoder_weights(enc, str(tmp_path / name))
        assert torch.equal(enc.state_dict()["features.5.conv.1.0.weight"], state["features.5.conv.1.0.weight"])


def test_mismatching_checkpoint_is_refused(tmp_path):
    state = torchvision_like_checkpoint()
    del state["features.3.conv.0.0.weight"]
    save_file(state, tmp_path / "bad.safetensors")
    enc = MobileNetV2Encoder()
    before = enc.state_dict()["features.0.0.weight"].clone()
    with pytest.raises(ValueError, match="missing"):
        load_encoder_weights(enc, str(tmp_path / "bad.safetensors"))
    assert torch.equal(enc.state_dict()["features.0.0.weight"], before)  # nothing half-loaded


def test_imagenet_download_from_local_server(tmp_path, monkeypatch):
    """The real download path (hash-checked, cached), served from 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    state = torchvision_like_checkpoint(1)
    torch.save(state, served / "mobilenet_v2.pth")
    digest = hashlib.sha256((served / "mobilenet_v2.pth").read_bytes()).hexdigest()
    monkeypatch.setenv("NUCLEISEG_CACHE", str(tmp_path / "cache"))
    with Server(served) as url:
        monkeypatch.setenv("NUCLEISEG_IMAGENET_URL", f"{url}/mobilenet_v2.pth")
        monkeypatch.setenv("NUCLEISEG_IMAGENET_SHA256", digest[:8])
        enc = MobileNetV2Encoder()
        load_encoder_weights(enc, "imagenet")
        assert torch.equal(enc.state_dict()["features.18.0.weight"], state["features.18.0.weight"])
        cached = list((tmp_path / "cache").glob("*.pth"))
        assert len(cached) == 1
        # wrong hash: refused, nothing cached
        cached[0].unlink()
        monkeypatch.setenv("NUCLEISEG_IMAGENET_SHA256", "deadbeef")
        with pytest.raises(DownloadError, match="checksum mismatch"):
            imagenet_checkpoint()
        assert not list((tmp_path / "cache").glob("*"))


@needs_shared_weights
def test_shared_imagenet_weights_load_strictly():
    net = UNet(3)
    load_encoder_weights(net.encoder, str(SHARED_WEIGHTS))
    # folded BatchNorm: identity statistics, as the weights' README says
    bn = net.encoder.features[0][1]
    assert torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_freeze_encoder_keeps_weights_and_bn_fixed():
    net = UNet(3)
    net.freeze_encoder(True)
    net.train()
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.decoder.parameters())
    assert not net.encoder.training and net.decoder.training
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-2)
    net(torch.rand(2, 3, 64, 64)).mean().backward()
    opt.step()
    after = net.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _with_trained_statistics(net: UNet) -> UNet:
    for m in net.modules():  # non-trivial BatchNorm statistics, as in a trained model
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_full_resolution_skip_starts_from_a_model_without_one_unchanged(tmp_path):
    from nucleiseg.training import grow_decoder

    torch.manual_seed(0)
    plain = _with_trained_statistics(UNet(3))
    wide = UNet(3, full_res_channels=8).eval()
    assert wide.decoder[-1].conv[0].in_channels == plain.decoder[-1].conv[0].in_channels + 8
    state = plain.state_dict()
    assert grow_decoder(wide, state, source_full_res=0) == ["a new full-resolution skip of 8 channels"]
    wide.load_state_dict(state)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(wide(x), plain(x), atol=1e-5)
    assert not grow_decoder(wide, wide.state_dict(), source_full_res=8)  # same architecture: nothing to add
    with pytest.raises(ValueError, match="full-resolution"):
        grow_decoder(UNet(3, full_res_channels=4), wide.state_dict(), source_full_res=8)
    # the model folder records it and rebuilds the same network
    config = make_config("distance", full_res_channels=8)
    assert config["architecture"]["full_res_channels"] == 8
    assert "full_res_channels" not in make_config("distance")["architecture"]  # older folders stay valid as they are
    Model(wide, config).save(tmp_path / "m")
    back = Model.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(back.net(x), wide(x), atol=1e-6)


def test_wider_decoder_starts_from_a_narrower_model_unchanged_and_learns():
    from nucleiseg.training import grow_decoder

    torch.manual_seed(1)
    narrow = _with_trained_statistics(UNet(3, full_res_channels=8))
    wide = UNet(3, decoder_channels=(128, 96, 64, 48, 16), full_res_channels=8).eval()
    state = narrow.state_dict()
    grown = grow_decoder(wide, state, source_full_res=8)
    assert grown == ["decoder block 0 widened 96 -> 128", "decoder block 1 widened 64 -> 96",
                     "decoder block 2 widened 48 -> 64", "decoder block 3 widened 32 -> 48"]
    wide.load_state_dict(state)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(wide(x), narrow(x), atol=1e-5)  # the skips moved with the widened parts
    # the new channels learn: after one step they change the output
    wide.train()
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        wide(x).square().mean().backward()
        opt.step()
    assert wide.decoder[0].conv[0].weight.detach()[:96, 96:128].abs().sum() > 0
    with pytest.raises(ValueError, match="can only grow"):
        grow_decoder(UNet(3, full_res_channels=8), wide.state_dict(), source_full_res=8)
