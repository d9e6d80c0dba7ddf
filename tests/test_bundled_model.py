"""The bundled default model: a self-describing folder that loads, predicts, and still segments real
DSB2018 images well after fp16 packaging (a regression check on images from its training data)."""
import json

import numpy as np

import nucleiseg
from conftest import SHARED_DATA, needs_shared_data
from nucleiseg.data import find_samples, load_items
from nucleiseg.evaluate import evaluate_items
from nucleiseg.io import read_image
from nucleiseg.model import DEFAULT_MODEL_DIR

EXAMPLES = sorted((DEFAULT_MODEL_DIR.parent.parent / "examples").glob("*.png"))


def test_model_folder_is_complete_and_small():
    for name in ("config.json", "weights.safetensors", "thresholds.json", "metrics.json", "README.md"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    assert (DEFAULT_MODEL_DIR / "weights.safetensors").stat().st_size < 10 * 2**20  # fp16
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["design"] in ("contour", "distance", "flow") and config["training"]["encoder_weights"]
    card = (DEFAULT_MODEL_DIR / "README.md").read_text()
    assert "CC0" in card and "nucleiseg train" in card
    for kind, sub in config.get("specialists", {}).items():  # each a complete, small model folder, named in the card
        for name in ("config.json", "weights.safetensors", "thresholds.json"):
            assert (DEFAULT_MODEL_DIR / sub / name).is_file(), (kind, name)
        assert (DEFAULT_MODEL_DIR / sub / "weights.safetensors").stat().st_size < 10 * 2**20
        assert f"Specialist for {kind} images" in card


def test_examples_go_to_the_model_for_their_type():
    """Each bundled example is named by its type; an image of a type with a specialist goes to that specialist."""
    model = nucleiseg.load()
    for path in EXAMPLES:
        kind = path.name.split("_")[0]
        chosen = model.specialist_for(read_image(path))
        assert chosen is model.specialists.get(kind, model), (path.name, kind)


def test_examples_give_plausible_nuclei():
    model = nucleiseg.load()
    assert len(EXAMPLES) == 3
    for path in EXAMPLES:
        labels = model.predict(read_image(path))
        n = labels.max()
        assert 5 <= n <= 400, (path.name, n)
        sizes = np.bincount(labels.ravel())[1:]
        assert np.median(sizes) > 20  # nuclei, not speckle


@needs_shared_data
def test_bundled_model_on_real_dsb_images():
    """Regression guard after fp16 packaging on 40 DSB images (partly seen in training: not a validation
    figure). The bundled model measured DSB 0.52 and foreground IoU above 0.8 on them; a broken
    packaging (wrong weights, thresholds or normalisation) scores far below these bounds."""
    model = nucleiseg.load()
    _, samples = find_samples(SHARED_DATA)
    items = load_items(samples[::16][:40], model.config["normalization"], progress=False)
    summary = evaluate_items(model, items)["summary"]
    assert summary["foreground_iou"] > 0.8, summary
    assert summary["dsb_score"] > 0.45, summary
