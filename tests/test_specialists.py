"""Specialists: a second model in a model folder that segments the images of one type (routing, folder, CLI)."""
import json
import shutil

import numpy as np
import pytest

from nucleiseg.cli import main
from nucleiseg.distributed import segment_large
from nucleiseg.evaluate import evaluate_items
from nucleiseg.model import DEFAULT_MODEL_DIR, Model, ModelError, attach_specialist, validate_config
from nucleiseg.synthetic import nuclei_image
from nucleiseg.transforms import normalize


def plain_copy(dest):
    """The bundled model's own network, thresholds and scorer, without the specialists it ships with."""
    shutil.copytree(DEFAULT_MODEL_DIR, dest)
    config = json.loads((dest / "config.json").read_text())
    for sub in config.pop("specialists", {}).values():
        shutil.rmtree(dest / sub)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The bundled model with a brightfield specialist that finds nothing (its min_size is huge), so where an image
    went shows in the labels; and that specialist's own folder."""
    root = tmp_path_factory.mktemp("specialists")
    main_folder, finder = root / "main", root / "finds-nothing"
    plain_copy(main_folder)
    plain_copy(finder)
    thresholds = json.loads((finder / "thresholds.json").read_text())
    thresholds.pop("tta", None)
    thresholds.update(min_size=10**6, object_scorer=0)
    (finder / "thresholds.json").write_text(json.dumps(thresholds))
    attach_specialist(main_folder, "brightfield", finder)
    return main_folder, finder


@pytest.fixture(scope="module")
def images():
    """A fluorescence-like image (bright nuclei on dark) and the same inverted (dark nuclei on bright: brightfield)."""
    image, _ = nuclei_image((160, 160), n=12, seed=3)
    return image, image.max() - image


def test_images_of_the_specialists_type_go_to_it(folders, images):
    model = Model.load(folders[0])
    fluo, bright = images
    assert set(model.specialists) == {"brightfield"}
    own = model.predict(fluo, route=False)
    assert own.max() >= 10 and np.array_equal(model.predict(fluo), own)
    assert model.predict(bright, route=False).max() >= 5  # the model's own network finds these nuclei ...
    assert model.predict(bright).max() == 0  # ... but the image went to the specialist
    assert model.predict(bright, tta=True).max() == 0


def test_one_model_segments_every_block_of_a_large_image(folders, images):
    model = Model.load(folders[0])
    for m in (model, *model.specialists.values()):
        m.config["inference"].update(block_size=512, tile_overlap=64)  # blocks of 256 px with a halo of 64
    fluo, bright = (np.tile(im, (4, 4)) for im in images)  # 640 x 640 > 512 x 512: segmented block by block
    # diameter None: no size-measuring passes, the blocks alone
    assert model.predict(fluo, diameter=None).max() >= 100 and model.predict(bright, diameter=None).max() == 0
    assert model.predict(bright, diameter=None, route=False).max() >= 50
    import zarr

    for image, name in ((bright, "bright"), (fluo, "fluo")):  # images larger than memory: one model for all blocks too
        out = segment_large(model, image, folders[0].parent / f"{name}.zarr", block=128, halo=64, progress=False,
                            diameter=None)
        found = np.asarray(zarr.open(str(out), mode="r")).max()
        assert found == 0 if name == "bright" else found >= 100


def test_evaluation_scores_each_image_with_the_model_for_its_type(folders, images):
    model = Model.load(folders[0])
    _, true = nuclei_image((160, 160), n=12, seed=3)
    norm = model.config["normalization"]
    items = [("fluo", normalize(images[0], norm), true), ("bright", normalize(images[1], norm), true)]
    rows = {r["image"]: r for r in evaluate_items(model, items)["rows"]}
    assert rows["fluo"]["type"] == "fluorescence" and rows["fluo"]["n_pred"] >= 10 and rows["fluo"]["ap50"] > 0.8
    assert rows["bright"]["type"] == "brightfield" and rows["bright"]["n_pred"] == 0
    rows = {r["image"]: r for r in evaluate_items(model, items, types={"fluo": "brightfield", "bright": "fluorescence"})["rows"]}
    assert rows["fluo"]["n_pred"] == 0 and rows["bright"]["n_pred"] >= 5  # the given types decide


def test_folder_round_trip_and_refusals(folders, tmp_path):
    main_folder, finder = folders
    config = json.loads((main_folder / "config.json").read_text())
    assert config["specialists"] == {"brightfield": "brightfield"}
    assert (main_folder / "brightfield" / "weights.safetensors").is_file()
    model = Model.load(main_folder)
    copy = model.save(tmp_path / "copy")
    again = Model.load(copy)
    assert set(again.specialists) == {"brightfield"} and again.specialists["brightfield"].thresholds["min_size"] == 10**6
    with pytest.raises(ModelError, match="specialists of its own"):
        attach_specialist(finder, "histology", main_folder)
    odd = tmp_path / "odd"
    shutil.copytree(finder, odd)
    odd_config = json.loads((odd / "config.json").read_text())
    odd_config["normalization"]["high"] = 99.0
    (odd / "config.json").write_text(json.dumps(odd_config))
    with pytest.raises(ModelError, match="normalise images as the model does"):
        attach_specialist(copy, "histology", odd)
    with pytest.raises(ModelError, match="image types"):
        validate_config({**config, "specialists": {"phase-contrast": "x"}})
    with pytest.raises(ModelError, match="image types"):
        validate_config({**config, "specialists": {"histology": "../elsewhere"}})
    with pytest.raises(ModelError, match="bundled model"):
        attach_specialist(DEFAULT_MODEL_DIR, "histology", finder)
    shutil.rmtree(copy / "brightfield")
    with pytest.raises(ModelError, match="model folder not found"):
        Model.load(copy)


def test_add_specialist_and_export_commands(folders, tmp_path, capsys):
    target = plain_copy(tmp_path / "model")
    assert main(["add-specialist", "--model", str(target), "--image-type", "histology", "--specialist", str(folders[1])]) == 0
    assert "histology" in capsys.readouterr().out
    assert set(Model.load(target).specialists) == {"histology"}
    assert main(["export", "--model", str(target), "-o", str(tmp_path / "nuclei.onnx")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "nuclei.onnx").is_file() and (tmp_path / "nuclei_histology.onnx").is_file()
    assert "specialist for histology" in out
    assert main(["add-specialist", "--model", str(target), "--image-type", "brightfield", "--specialist",
                 str(tmp_path / "missing")]) == 1
    assert "model folder not found" in capsys.readouterr().err
