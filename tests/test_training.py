"""A short real training run on synthetic nuclei must learn; the model folder round-trips exactly."""
import json
import os

import numpy as np
import pytest

from conftest import make_labels_layout
from nucleiseg.cli import main
from nucleiseg.metrics import pixel_metrics
from nucleiseg.model import Model, ModelError
from nucleiseg.synthetic import nuclei_image
from nucleiseg.training import TrainConfig, train
from nucleiseg.transforms import normalize


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_labels_layout(root / "data", n=20, shape=(128, 128))
    cfg = TrainConfig(data=str(data), out=str(root / "run"), design="contour", epochs=12, batch_size=8, crop=96,
                      crops_per_image=2, lr=3e-3, encoder_weights="none", precision="auto", patience=12,
                      progress=False, previews=2)
    return train(cfg), root / "run"


def test_training_learns_synthetic_nuclei(trained):
    model_dir, _ = trained
    model = Model.load(model_dir)
    ious = []
    for seed in (101, 102, 103):  # images never seen in training
        image, labels = nuclei_image((128, 128), n=12, seed=seed)
        ious.append(pixel_metrics(labels > 0, model.predict(image) > 0)["foreground_iou"])
    assert np.mean(ious) > 0.8, ious


def test_run_folder_contents(trained):
    model_dir, run = trained
    for name in ("train_config.json", "history.csv", "curves.png", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    assert list((run / "previews").glob("epoch_*.png"))
    assert list((run / "logs").glob("events.out.tfevents.*"))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["design"] == "contour" and config["architecture"]["out_channels"] == 3
    assert config["data"]["train"] and config["data"]["val"]
    assert not set(config["data"]["train"]) & set(config["data"]["val"])
    assert config["normalization"]["method"] == "percentile"
    thresholds = json.loads((model_dir / "thresholds.json").read_text())
    assert {"mask", "marker", "min_size"} <= set(thresholds)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert 0 <= metrics["validation"]["dsb_score"] <= 1


def test_decoder_batchnorm_learns_in_every_epoch(trained):
    """The per-epoch preview runs the net in eval mode; training must go on in train mode afterwards
    (the decoder's BatchNorm counts every training step, the frozen encoder's counts none)."""
    import torch

    ckpt = torch.load(trained[1] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    counts = {k: int(v) for k, v in ckpt["state_dict"].items() if k.endswith("num_batches_tracked")}
    decoder = [v for k, v in counts.items() if k.startswith("net.decoder.")]
    assert decoder and all(v == ckpt["global_step"] for v in decoder), (set(decoder), ckpt["global_step"])
    assert ckpt["global_step"] == 12 * 4  # 12 epochs of 4 batches (16 training images x 2 crops / 8)
    assert all(v == 0 for k, v in counts.items() if k.startswith("net.encoder."))


def test_save_load_round_trip_identical(trained, tmp_path):
    model = Model.load(trained[0])
    image, _ = nuclei_image((100, 140), n=10, seed=7)
    expected = model.predict_maps(image)
    model.save(tmp_path / "copy")
    again = Model.load(tmp_path / "copy")
    assert np.array_equal(again.predict_maps(image), expected)
    assert np.array_equal(again.predict(image), model.predict(image))


def test_config_mismatch_is_refused(trained, tmp_path):
    model = Model.load(trained[0])
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    bad = dict(config, design="semantic")  # 2 channels expected, 3 in the architecture
    (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="output channels"):
        Model.load(tmp_path / "m")
    bad = {**config, "architecture": {**config["architecture"], "out_channels": 2}, "design": "semantic"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="do not match config.json"):
        Model.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ModelError, match="version"):
        Model.load(tmp_path / "m")


def test_fine_tuning_starts_from_the_given_model(trained, tmp_path):
    import csv

    model_dir, run = trained
    cfg = TrainConfig(data=json.loads((run / "train_config.json").read_text())["data"], out=str(tmp_path / "ft"),
                      design="contour", epochs=1, batch_size=8, crop=96, crops_per_image=2, lr=1e-4,
                      encoder_weights="none", init_model=str(model_dir), progress=False, previews=0)
    tuned = Model.load(train(cfg))
    assert tuned.config["training"]["init_model"] == str(model_dir)
    first = lambda folder: float(next(csv.DictReader(open(folder / "history.csv")))["val_loss"])  # noqa: E731
    assert first(tmp_path / "ft") < first(run)  # one epoch from the trained weights beats one from scratch
    image, labels = nuclei_image((128, 128), n=12, seed=104)  # unseen: the fine-tuned model still segments
    assert pixel_metrics(labels > 0, tuned.predict(image) > 0)["foreground_iou"] > 0.7
    wrong = TrainConfig(**{**cfg.__dict__, "design": "distance", "out": str(tmp_path / "wrong")})
    with pytest.raises(ValueError, match="design"):
        train(wrong)


def test_fine_tuning_from_the_bundled_model_loads_its_weights():
    import torch

    from nucleiseg.model import make_config
    from nucleiseg.training import SegmentationModule

    bundled = Model.load()
    full_res = bundled.config["architecture"].get("full_res_channels", 0)
    module = SegmentationModule(make_config(bundled.design, full_res_channels=full_res), {"data": "", "init_model": "default"})
    assert module.init_weights().startswith("model ")
    ours, theirs = module.net.state_dict(), bundled.net.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_fine_tuning_keeps_the_initial_models_architecture(trained, tmp_path):
    from nucleiseg.model import read_config

    model_dir, run = trained
    assert "full_res_channels" not in Model.load(model_dir).config["architecture"]  # from ImageNet: no skip
    data = json.loads((run / "train_config.json").read_text())["data"]
    cfg = TrainConfig(data=data, out=str(tmp_path / "ft"), epochs=1, batch_size=4, crop=96, max_images=6,
                      encoder_weights="none", init_model="default", progress=False, previews=0)
    tuned = Model.load(train(cfg))  # no design or full_res_channels given: the bundled model's are kept
    assert tuned.design == read_config("default")["design"]
    bundled = read_config("default")["architecture"].get("full_res_channels", 0)
    assert tuned.config["architecture"].get("full_res_channels", 0) == bundled
    assert json.loads((tmp_path / "ft" / "train_config.json").read_text())["full_res_channels"] == bundled
    assert tuned.config["architecture"]["decoder_channels"] == read_config("default")["architecture"]["decoder_channels"]
    # a wider decoder than the initial model's, from the command line: its new channels start at zero effect
    assert main(["train", "--data", data, "--out", str(tmp_path / "wide"), "--epochs", "1", "--batch-size", "4",
                 "--crop", "96", "--max-images", "6", "--encoder-weights", "none", "--init-model", "default",
                 "--decoder-channels", "128", "96", "64", "32", "16", "--augment", "strong",
                 "--scale-range", "0.75", "2", "--quiet"]) == 0
    wide = Model.load(tmp_path / "wide" / "model")
    assert wide.config["training"]["augment"] == "strong"
    assert wide.config["training"]["scale_range"] == [0.75, 2.0]
    assert wide.config["architecture"]["decoder_channels"] == [128, 96, 64, 32, 16]
    assert wide.config["architecture"].get("full_res_channels", 0) == bundled


def test_a_distance_model_starts_a_contact_model_with_its_outputs_unchanged(tmp_path):
    import torch

    from nucleiseg.model import build_network, make_config
    from nucleiseg.targets import probabilities
    from nucleiseg.training import SegmentationModule

    distance_config = make_config("distance", full_res_channels=8)
    torch.manual_seed(0)
    net = build_network(distance_config).eval()
    with torch.no_grad():  # a head that does not output zeros, as a trained one
        net.head.bias.copy_(torch.tensor([0.5, -0.5, 0.2]))
    distance = Model(net, distance_config, {"mask": 0.5, "marker": 0.5, "min_size": 5})
    distance_dir = distance.save(tmp_path / "distance")
    module = SegmentationModule(make_config("contact", full_res_channels=8), {"data": "", "init_model": str(distance_dir)})
    assert module.init_weights().endswith("(+ 1 new output)")
    image, _ = nuclei_image((64, 64), n=4, seed=5)
    x = torch.from_numpy(image.astype(np.float32) / image.max()).expand(1, 3, 64, 64)
    with torch.no_grad():
        ours = probabilities(module.net.eval()(x), "contact")
        theirs = probabilities(distance.net(x), "distance")
    assert ours.shape[1] == 4 and torch.allclose(ours[:, :3], theirs, atol=1e-6)
    assert torch.allclose(ours[:, 3], torch.full_like(ours[:, 3], 0.05), atol=1e-6)  # the new channel's prior
    # with a contact channel that marks nothing yet, the contact model segments as its distance parent
    contact_dir = Model(module.net, make_config("contact", full_res_channels=8), distance.thresholds).save(tmp_path / "contact")
    reloaded = Model.load(contact_dir)
    assert np.array_equal(reloaded.predict(image), Model.load(distance_dir).predict(image))
    # the other way round (a contact model into a distance run) is refused
    back = SegmentationModule(make_config("distance", full_res_channels=8), {"data": "", "init_model": str(contact_dir)})
    with pytest.raises(ValueError, match="design"):
        back.init_weights()


def test_a_flow_model_starts_a_star_model_with_its_outputs_unchanged(tmp_path):
    import torch

    from nucleiseg.model import build_network, make_config
    from nucleiseg.targets import N_RAYS, probabilities

    from nucleiseg.training import SegmentationModule

    flow_config = make_config("flow")
    torch.manual_seed(0)
    flow = Model(build_network(flow_config).eval(), flow_config, {"mask": 0.5, "marker": 0.5, "min_size": 5})
    flow_dir = flow.save(tmp_path / "flow")
    module = SegmentationModule(make_config("star"), {"data": "", "init_model": str(flow_dir)})
    assert module.init_weights().endswith(f"(+ {N_RAYS} new outputs)")
    image, _ = nuclei_image((64, 64), n=4, seed=5)
    x = torch.from_numpy(image.astype(np.float32) / image.max()).expand(1, 3, 64, 64)
    with torch.no_grad():
        ours = probabilities(module.net.eval()(x), "star")
        theirs = probabilities(flow.net(x), "flow")
    assert ours.shape[1] == 5 + N_RAYS and torch.allclose(ours[:, :5], theirs, atol=1e-6)
    assert torch.allclose(ours[:, 5:], torch.full_like(ours[:, 5:], 8.0), atol=1e-4)  # rays start at 8 px


def test_type_balance_gives_rare_image_types_more_crops():
    from nucleiseg.training import EpochSampler, crops_per_item

    rng = np.random.default_rng(0)
    fluorescence = np.repeat(rng.uniform(0, 0.2, (32, 32, 1)), 3, axis=2)  # grey on dark
    brightfield = np.repeat(rng.uniform(0.7, 1.0, (32, 32, 1)), 3, axis=2)  # grey on bright
    histology = rng.uniform(0, 1, (32, 32, 3))  # coloured
    items = [("f", fluorescence, None)] * 16 + [("b", brightfield, None)] + [("h", histology, None)] * 4
    assert list(crops_per_item(items, 2)) == [2] * 21  # default: the same for every image
    counts = crops_per_item(items, 2, type_balance=0.5)
    assert counts[0] == 2 and counts[16] == 6 and counts[17] == 3  # weights 1/4, 1, 1/2; their mean is 1/3
    sampler = EpochSampler(len(items), seed=0, counts=counts)
    drawn = np.bincount([index for _, index, _ in sampler], minlength=len(items))
    assert np.array_equal(drawn, counts) and len(sampler) == counts.sum()


def test_cosine_run_keeps_its_last_annealed_weights(trained, tmp_path):
    import csv

    import torch

    model_dir, run = trained
    cfg = TrainConfig(data=json.loads((run / "train_config.json").read_text())["data"], out=str(tmp_path / "cos"),
                      design="contour", epochs=3, batch_size=8, crop=96, lr=1e-3, schedule="cosine",
                      encoder_weights="none", init_model=str(model_dir), progress=False, previews=0)
    saved = Model.load(train(cfg)).net.state_dict()
    lrs = [float(row["lr"]) for row in csv.DictReader(open(tmp_path / "cos" / "history.csv"))]
    assert lrs[0] > lrs[1] > lrs[2] >= 1e-5
    last = torch.load(tmp_path / "cos" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    weights = {k[len("net."):]: v for k, v in last["state_dict"].items() if k.startswith("net.")}
    assert all(torch.equal(saved[k], weights[k]) for k in saved)
    with pytest.raises(ValueError, match="cannot be extended"):  # the cosine would climb back up
        train(TrainConfig(data="", out=str(tmp_path / "cos"), progress=False), resume=True, epochs=6)


def test_validation_every_n_epochs_and_changed_on_resume(trained, tmp_path):
    """--val-every 2 validates only every second epoch (the history has no stale validation figures in the others);
    a resumed run may change it (to 3: epoch 3 is not validated); the plateau schedule, which steps on each
    validation, refuses it."""
    import csv

    model_dir, run = trained
    data = json.loads((run / "train_config.json").read_text())["data"]
    cfg = TrainConfig(data=data, out=str(tmp_path / "sparse"), design="contour", epochs=3, batch_size=8, crop=96,
                      lr=1e-3, schedule="constant", encoder_weights="none", init_model=str(model_dir), progress=False,
                      previews=0, val_every=2)
    train(cfg)
    assert (tmp_path / "sparse" / "checkpoints" / "best.ckpt").is_file()
    train(TrainConfig(data="", out=str(tmp_path / "sparse"), progress=False), resume=True, epochs=4, val_every=3)
    rows = list(csv.DictReader(open(tmp_path / "sparse" / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"] and all(r["train_loss"] for r in rows)
    assert [bool(r["val_dsb"]) for r in rows] == [False, True, False, False]
    with pytest.raises(ValueError, match="plateau"):
        train(TrainConfig(data=data, out=str(tmp_path / "plateau"), schedule="plateau", val_every=2))


def test_weight_averaging_keeps_the_mean_of_the_last_epochs():
    from types import SimpleNamespace

    import torch

    from nucleiseg.training import WeightAveraging

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    module = SimpleNamespace(net=net)
    averaging = WeightAveraging(2, epochs=4)  # epochs 2 and 3 of 0..3
    seen = []
    for epoch in range(4):
        with torch.no_grad():
            net[0].weight.fill_(float(epoch + 1))
            net[1].running_mean.fill_(10.0 * epoch)
        seen.append(net[0].weight.clone())
        averaging.on_train_epoch_end(SimpleNamespace(current_epoch=epoch, sanity_checking=False), module)
    assert averaging.count == 2
    assert torch.allclose(averaging.mean["0.weight"], (seen[2] + seen[3]) / 2)  # 3.5: epochs 2 and 3 only
    assert torch.allclose(averaging.mean["1.running_mean"], torch.full((2,), 25.0))
    assert "1.num_batches_tracked" not in averaging.mean  # integer counters are not averaged
    restored = WeightAveraging(2, epochs=4)
    restored.load_state_dict(averaging.state_dict())  # what a checkpoint carries to a resumed run
    assert restored.count == 2 and torch.equal(restored.mean["0.weight"], averaging.mean["0.weight"])


def test_averaged_run_saves_the_mean_weights(trained, tmp_path):
    import csv

    import torch

    model_dir, run = trained
    cfg = TrainConfig(data=json.loads((run / "train_config.json").read_text())["data"], out=str(tmp_path / "avg"),
                      design="contour", epochs=3, batch_size=8, crop=96, lr=1e-3, schedule="constant", average_last=2,
                      encoder_weights="none", init_model=str(model_dir), progress=False, previews=0)
    model = Model.load(train(cfg))
    lrs = [float(row["lr"]) for row in csv.DictReader(open(tmp_path / "avg" / "history.csv"))]
    assert lrs == [1e-3] * 3
    assert model.config["training"]["epochs_averaged"] == 2
    last = torch.load(tmp_path / "avg" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    mean = next(v for k, v in last["callbacks"].items() if k.startswith("WeightAveraging"))["mean"]
    weights = {k[len("net."):]: v for k, v in last["state_dict"].items() if k.startswith("net.")}
    saved = model.net.state_dict()
    assert all(torch.allclose(saved[k], mean[k]) for k in mean)
    assert not all(torch.equal(saved[k], weights[k]) for k in mean)  # not the last epoch's weights
    with pytest.raises(ValueError, match="average_last"):
        TrainConfig(data="", epochs=3, average_last=4)


def test_thresholds_from_keep_tta_thresholds_only_without_own_tuning(trained, tmp_path):
    import shutil

    model_dir, run = trained
    source = tmp_path / "source"
    shutil.copytree(model_dir, source)
    thresholds = {**json.loads((source / "thresholds.json").read_text()), "tta": {"peak_h": 0.1, "object_prob": 0.55}}
    (source / "thresholds.json").write_text(json.dumps(thresholds))
    data = json.loads((run / "train_config.json").read_text())["data"]
    kept = {}
    for val_fraction in (0.0, 0.2):
        cfg = TrainConfig(data=data, out=str(tmp_path / f"run{val_fraction}"), design="contour", epochs=1, batch_size=8,
                          crop=96, lr=1e-4, val_fraction=val_fraction, encoder_weights="none", init_model=str(model_dir),
                          thresholds_from=str(source), progress=False, previews=0)
        kept[val_fraction] = json.loads((train(cfg) / "thresholds.json").read_text()).get("tta")
    assert kept[0.0] == thresholds["tta"]  # trained on all images: every threshold comes from the split run
    assert kept[0.2] is None  # tuned on its own validation images: TTA thresholds of another network are dropped


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_learning_rate_schedule(schedule):
    from nucleiseg.model import make_config
    from nucleiseg.training import SegmentationModule

    cfg = {"data": "", "epochs": 10, "lr": 1e-3, "schedule": schedule, "encoder_weights": "none"}
    setup = SegmentationModule(make_config("distance"), cfg).configure_optimizers()
    opt, sched = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(*([1.0] if schedule == "plateau" else []))  # plateau: a validation loss that never improves
    if schedule == "cosine":  # anneals smoothly from lr to lr/100 over the run
        assert lrs[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs, lrs[1:]))
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    else:  # halves only after the validation loss has stalled for a few epochs
        assert lrs[:4] == [1e-3] * 4 and 5e-4 in lrs and all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_encoder_learns_at_its_own_scaled_rate():
    from nucleiseg.model import make_config
    from nucleiseg.training import SegmentationModule

    cfg = {"data": "", "epochs": 10, "lr": 1e-3, "schedule": "cosine", "encoder_weights": "none", "encoder_lr_scale": 0.1}
    module = SegmentationModule(make_config("flow"), cfg)
    opt, sched = (lambda s: (s["optimizer"], s["lr_scheduler"]["scheduler"]))(module.configure_optimizers())
    decoder_group, encoder_group = opt.param_groups
    assert {id(p) for p in encoder_group["params"]} == {id(p) for p in module.net.encoder.parameters()}
    assert len(decoder_group["params"]) + len(encoder_group["params"]) == len(list(module.net.parameters()))
    assert (decoder_group["lr"], encoder_group["lr"]) == (pytest.approx(1e-3), pytest.approx(1e-4))
    for _ in range(10):
        opt.step()
        sched.step()
    assert (decoder_group["lr"], encoder_group["lr"]) == (pytest.approx(1e-5), pytest.approx(1e-6))  # each to 1/100 of its own


def test_weight_decay_shrinks_convolution_weights_but_not_biases_or_norms():
    """--weight-decay: AdamW with the decay on weights of 2+ dimensions only; with a zero gradient a decayed weight
    shrinks by lr x W per step and a bias or norm scale stays as it is."""
    import torch

    from nucleiseg.model import make_config
    from nucleiseg.training import SegmentationModule

    cfg = {"data": "", "epochs": 10, "lr": 1e-3, "schedule": "cosine", "encoder_weights": "none", "weight_decay": 0.05}
    module = SegmentationModule(make_config("flow"), cfg)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    params = dict(module.net.named_parameters())
    assert decayed == {id(p) for p in params.values() if p.ndim > 1} and decayed
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in params.items():
        factor = 1 - 1e-3 * 0.05 if p.ndim > 1 else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor)
    plain = SegmentationModule(make_config("flow"), {**cfg, "weight_decay": 0.0}).configure_optimizers()["optimizer"]
    assert type(plain) is torch.optim.Adam and len(plain.param_groups) == 1  # as runs before the option


def test_unknown_learning_rate_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):  # at once, before any image is read
        TrainConfig(data="", schedule="step")


def test_flow_design_learns_to_separate_synthetic_nuclei(tmp_path):
    """A short flow-design run: its model folder describes the five maps, its thresholds include the flow
    seed count, and it separates touching nuclei on images it never saw."""
    from nucleiseg.metrics import dsb_score

    data = make_labels_layout(tmp_path / "data", n=20, shape=(128, 128))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), design="flow", epochs=12, batch_size=8, crop=96,
                      crops_per_image=2, lr=3e-3, encoder_weights="none", precision="auto", patience=12,
                      progress=False, previews=0)
    model = Model.load(train(cfg))
    assert model.design == "flow" and model.config["architecture"]["out_channels"] == 5
    assert model.config["classes"][3:] == ["flow_y", "flow_x"] and "flow_seed" in model.thresholds
    scores = []
    for seed in (101, 102, 103):
        image, labels = nuclei_image((128, 128), n=12, seed=seed, touching=0.5)
        scores.append(dsb_score(labels, model.predict(image)))
    assert np.mean(scores) > 0.5, scores


def test_split_seed_keeps_the_split_while_the_seed_changes(trained, tmp_path):
    model_dir, run = trained
    data = json.loads((run / "train_config.json").read_text())["data"]
    val = {}
    for split_seed in (0, None):
        cfg = TrainConfig(data=data, out=str(tmp_path / f"run{split_seed}"), design="contour", epochs=1, batch_size=8,
                          crop=96, lr=1e-4, seed=1, split_seed=split_seed, encoder_weights="none",
                          init_model=str(model_dir), progress=False, previews=0)
        val[split_seed] = json.loads((train(cfg) / "config.json").read_text())["data"]["val"]
    assert val[0] == json.loads((model_dir / "config.json").read_text())["data"]["val"]  # the seed-0 run's split
    assert val[None] != val[0]  # without --split-seed, --seed 1 also draws another split


def test_grey_gammas_are_stored_inherited_and_used_at_prediction(trained, tmp_path):
    """``--grey-gammas`` is recorded in the model's normalisation, kept by a fine-tuning run, refused when the
    initial model lacks it, turns channel shuffling off, and prediction gives the network the gamma channels."""
    from nucleiseg.data import augmentation

    model_dir, run = trained
    data = json.loads((run / "train_config.json").read_text())["data"]
    assert main(["train", "--data", data, "--out", str(tmp_path / "g"), "--design", "contour", "--epochs", "1",
                 "--batch-size", "4", "--crop", "96", "--max-images", "6", "--encoder-weights", "none",
                 "--grey-gammas", "1", "0.5", "0.25", "--quiet"]) == 0
    gamma = Model.load(tmp_path / "g" / "model")
    assert gamma.config["normalization"]["grey_gammas"] == [1.0, 0.5, 0.25]
    cfg = TrainConfig(data=data, out=str(tmp_path / "ft"), epochs=1, batch_size=4, crop=96, max_images=6,
                      encoder_weights="none", init_model=str(tmp_path / "g" / "model"), progress=False, previews=0)
    assert Model.load(train(cfg)).config["normalization"] == gamma.config["normalization"]
    with pytest.raises(ValueError, match="normalisation"):  # a plain model cannot start a gamma run
        train(TrainConfig(data=data, out=str(tmp_path / "bad"), epochs=1, batch_size=4, crop=96, max_images=6,
                          encoder_weights="none", init_model=str(model_dir), grey_gammas=[1, 0.5, 0.25],
                          progress=False, previews=0))
    names = [type(t).__name__ for t in augmentation(96, channel_shuffle=False)]
    assert "ChannelShuffle" not in names and "ChannelShuffle" in [type(t).__name__ for t in augmentation(96)]
    image, _ = nuclei_image((128, 128), n=12, seed=5)
    maps = gamma.predict_maps(image)  # the network sees the gamma channels, not grey repeated
    assert np.array_equal(maps, gamma.maps_from_normalized(normalize(image, {"grey_gammas": [1, 0.5, 0.25]})))
    assert np.abs(maps - gamma.maps_from_normalized(normalize(image))).max() > 1e-5  # (after 1 epoch: small)


def test_invert_is_stored_inherited_and_used_at_prediction(trained, tmp_path):
    """``--invert auto`` is recorded in the model's normalisation, kept by a fine-tuning run, and prediction
    gives the network a bright-background image inverted (and a fluorescence image as it is)."""
    model_dir, run = trained
    data = json.loads((run / "train_config.json").read_text())["data"]
    assert main(["train", "--data", data, "--out", str(tmp_path / "i"), "--design", "contour", "--epochs", "1",
                 "--batch-size", "4", "--crop", "96", "--max-images", "6", "--encoder-weights", "none",
                 "--invert", "auto", "--quiet"]) == 0
    inv = Model.load(tmp_path / "i" / "model")
    assert inv.config["normalization"]["invert"] == "auto"
    cfg = TrainConfig(data=data, out=str(tmp_path / "ft"), epochs=1, batch_size=4, crop=96, max_images=6,
                      encoder_weights="none", init_model=str(tmp_path / "i" / "model"), progress=False, previews=0)
    assert Model.load(train(cfg)).config["normalization"] == inv.config["normalization"]
    fluo, _ = nuclei_image((128, 128), n=12, seed=5)
    bright = (fluo.max() - fluo).astype(fluo.dtype)
    maps = inv.predict_maps(bright)
    assert np.allclose(maps, inv.maps_from_normalized(1 - normalize(bright)), atol=1e-5)
    assert np.abs(maps - inv.maps_from_normalized(normalize(bright))).max() > 1e-5
    assert np.array_equal(inv.predict_maps(fluo), inv.maps_from_normalized(normalize(fluo)))


def test_precision_auto_uses_bf16_only_on_hardware_with_bf16_units(monkeypatch, caplog):
    """bf16 autocast is 2.3x faster than fp32 on a CPU with AMX but ~10x slower on one without bf16 units
    (measured: AMD EPYC with AVX2 only), so 'auto' picks by the hardware and an explicit bf16 there warns."""
    import torch

    from nucleiseg.training import resolve_precision

    for amx, avx512_bf16, expected in ((True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert resolve_precision("auto", "cpu") == expected
        assert resolve_precision("32", "cpu") == "32"
    with caplog.at_level("WARNING"):
        assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"  # as asked, with a warning
    assert "without bf16 units" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "gpu") == "32"


def test_lightning_messages_print_once_and_follow_the_log_level():
    """Lightning's own messages (e.g. 'GPU available') go through the application's logging: once each,
    and not at all under --quiet (level WARNING)."""
    import subprocess
    import sys

    code = ("import logging, sys; logging.basicConfig(level=getattr(logging, sys.argv[1]), format='%(message)s'); "
            "import nucleiseg.training; lg = logging.getLogger('lightning.pytorch.utilities.rank_zero'); "
            "lg.info('an info line'); lg.warning('a warning line')")
    for level, expected in (("INFO", ["an info line", "a warning line"]), ("WARNING", ["a warning line"])):
        run = subprocess.run([sys.executable, "-c", code, level], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
        assert run.returncode == 0, run.stderr
        assert [line for line in run.stderr.splitlines() if line.endswith(" line")] == expected, run.stderr
