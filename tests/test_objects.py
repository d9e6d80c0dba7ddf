"""The second-level object scorer: features that tell merged objects apart, the choice per region, the model folder."""
import json
import shutil

import numpy as np
import pytest
from skimage.measure import regionprops_table

import nucleiseg
from nucleiseg.cli import main
from nucleiseg.model import Model, ModelError
from nucleiseg.objects import (FEATURES, SCORER_FILE, TTA_SCORER_FILE, Candidates, _convex_areas, _differing_regions,
                               _eccentricity, assemble, candidates, choose, fit_scorer, object_features)
from nucleiseg.postprocess import instances
from nucleiseg.synthetic import nuclei_image
from nucleiseg.transforms import normalize

from conftest import make_labels_layout
from test_targets_postprocess import perfect_maps, two_touching_discs


def test_a_merged_object_disagrees_with_the_predicted_distance_and_flows():
    lab = two_touching_discs()
    maps = perfect_maps(lab, "flow")
    right = object_features(maps, lab)
    merged = object_features(maps, (lab > 0).astype(np.int32))
    col = {name: i for i, name in enumerate(FEATURES)}
    for name in ("flow_error", "distance_error"):
        assert right[:, col[name]].max() < 1e-3  # the right split reproduces the maps it came from
    assert merged[0, col["flow_error"]] > 0.5  # the flows point to two centres, not to the merged object's one
    assert merged[0, col["distance_error"]] > 0.02
    assert merged[0, col["solidity"]] < right[:, col["solidity"]].min()
    assert merged[0, col["eccentricity"]] > 0.8 > 0.2 > right[:, col["eccentricity"]].max()
    assert right[0, col["contact_fraction"]] > 0 and merged[0, col["contact_fraction"]] == 0
    np.testing.assert_allclose(np.exp(right[:, col["log_area"]]), [(lab == 1).sum(), (lab == 2).sum()])


def test_eccentricity_matches_scikit_image():
    _, lab = nuclei_image((96, 96), n=8, seed=3)
    from skimage.segmentation import relabel_sequential

    lab = relabel_sequential(lab)[0]
    ys, xs = np.nonzero(lab)
    area = np.bincount(lab[ys, xs])[1:].astype(float)
    expected = regionprops_table(lab, properties=("eccentricity",))["eccentricity"]
    np.testing.assert_allclose(_eccentricity(ys, xs, lab[ys, xs], area), expected, atol=1e-9)


def test_convex_areas_match_scikit_image():
    # touching nuclei cut by the watershed (concave sides), plus a pixel, a line, an L and a two-part object
    _, lab = nuclei_image((128, 128), n=40, touching=0.6, seed=5)
    lab = instances(perfect_maps((lab > 0).astype(np.int32), "flow"), "flow", {"peak_h": 0.2, "marker": 0.3})
    lab = lab.astype(np.int32)
    extra = np.zeros((20, 128), np.int32)
    extra[2, 3] = 1
    extra[5, 10:30] = 2
    extra[8:18, 40] = 3
    extra[17, 40:48] = 3
    extra[4:7, 60:63] = 4
    extra[12:15, 70:75] = 4
    lab = np.vstack([lab, np.where(extra > 0, extra + lab.max(), 0)])
    ys, xs = np.nonzero(lab)
    expected = regionprops_table(lab, properties=("area_convex",))["area_convex"]
    assert (expected > np.bincount(lab.ravel())[1:]).sum() > 5  # several objects are not convex
    np.testing.assert_array_equal(_convex_areas(ys, xs, lab[ys, xs], int(lab.max())), expected)


def test_regions_split_differently_are_found():
    region = np.array([[1, 1, 0, 2, 2, 0, 3, 3]])
    base = np.array([[1, 1, 0, 2, 2, 0, 3, 3]])
    other = np.array([[1, 2, 0, 3, 3, 0, 0, 0]])  # region 1 split, region 2 the same, region 3's object dropped
    assert _differing_regions(base, other, region).tolist() == [False, True, False, True]
    assert not _differing_regions(base, base, region).any()


def test_each_region_keeps_the_set_that_promises_most_matches():
    base = np.array([[1, 1, 1, 1, 0, 2, 2, 0, 3]])
    split = np.array([[1, 1, 2, 2, 0, 0, 0, 0, 0]])  # region 1 split in two
    c = Candidates([base, split], [np.array([1, 2, 3]), np.array([1, 1])])
    # the merged object is unlikely, its two halves likely: region 1 takes the split; object 3 falls below the cut
    keep = choose(c, [np.array([0.2, 0.9, 0.1]), np.array([0.9, 0.8])], cut=0.3, margin=0.5)
    assert [k.tolist() for k in keep] == [[False, True, False], [True, True]]
    labels = assemble(c, keep)
    assert labels.tolist() == [[2, 2, 3, 3, 0, 1, 1, 0, 0]]
    # a gain within the margin keeps the tuned segmentation
    keep = choose(c, [np.array([0.7, 0.9, 0.9]), np.array([0.7, 0.7])], cut=0.3, margin=0.5)  # 0.8 against 0.4
    assert [k.tolist() for k in keep] == [[True, True, True], [False, False]]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The bundled model with an object scorer learnt on four synthetic images, in a folder of its own."""
    folder = tmp_path_factory.mktemp("scored") / "model"
    shutil.copytree(nucleiseg.model.DEFAULT_MODEL_DIR, folder)
    (folder / SCORER_FILE).unlink(missing_ok=True)
    model = Model.load(folder)
    items = []
    for seed in range(4):
        image, lab = nuclei_image((128, 128), n=14, seed=seed)
        items.append((f"s{seed}", normalize(image, model.config["normalization"]), lab))
    scorer = fit_scorer(model, items, epochs=3, progress=False)
    scorer.save(folder / SCORER_FILE)
    return folder, items, scorer


def test_fit_scorer_with_worker_processes_learns_the_same_scorer(fitted):
    folder, items, scorer = fitted
    parallel = fit_scorer(Model.load(folder), items, epochs=3, progress=False, workers=2)
    np.testing.assert_array_equal(parallel.mean, scorer.mean)  # the same candidates, in the same order
    x = np.random.default_rng(0).normal(size=(50, len(FEATURES))) * scorer.std + scorer.mean
    np.testing.assert_allclose(parallel.probabilities(x), scorer.probabilities(x), atol=1e-6)


def test_fitted_scorer_round_trips_through_the_model_folder(fitted):
    folder, items, scorer = fitted
    assert scorer.info["objects"] > 40 and 0 < scorer.info["matched_fraction"] <= 1
    model = Model.load(folder)
    assert model.scorer is not None and model.scorer.cut == scorer.cut and model.scorer.variants == scorer.variants
    f = object_features(model.maps_from_normalized(items[0][1]), instances(model.maps_from_normalized(items[0][1]), "flow",
                                                                             model.thresholds_for()))
    np.testing.assert_allclose(model.scorer.probabilities(f), scorer.probabilities(f))
    p = scorer.probabilities(f)
    assert p.shape == (len(f),) and ((p >= 0) & (p <= 1)).all()


def test_prediction_uses_the_scorer_unless_told_not_to(fitted):
    folder, items, _ = fitted
    model = Model.load(folder)
    image, true = items[1][1], items[1][2]
    maps = model.maps_from_normalized(image)
    t = model.thresholds_for()
    scored = model.predict(image, scale=(0.0, 1.0), diameter=None)  # already normalised: an identity scale
    np.testing.assert_array_equal(scored, model.scorer.segment(maps, model.design, t))
    plain = model.predict(image, scale=(0.0, 1.0), diameter=None, thresholds={"object_scorer": 0})
    np.testing.assert_array_equal(plain, instances(maps, model.design, t))
    # one label per object, numbered 1..N, every object from one of the candidate segmentations
    n = int(scored.max())
    assert n > 5 and set(np.unique(scored)) == set(range(n + 1))
    c = candidates(maps, model.design, t)
    for k in range(1, n + 1):
        obj = scored == k
        assert any(len(np.unique(s[obj])) == 1 and s[obj][0] > 0 and (s == s[obj][0]).sum() == obj.sum() for s in c.sets)


def test_a_scorer_learnt_on_tta_maps_serves_tta_prediction_only(fitted, tmp_path):
    folder, items, scorer = fitted
    shutil.copytree(folder, tmp_path / "model")
    model = Model.load(tmp_path / "model")
    assert model.tta_scorer is None and model.scorer_for(True) is model.scorer  # without one, TTA uses the plain scorer
    tta_scorer = fit_scorer(model, items, epochs=3, progress=False, tta=True)
    assert tta_scorer.info["maps"] == "tta" and scorer.info["maps"] == "plain"
    assert tta_scorer.info["objects"] != scorer.info["objects"]  # candidates of other maps (smoother, other thresholds)
    tta_scorer.save(tmp_path / "model" / TTA_SCORER_FILE)
    model = Model.load(tmp_path / "model")
    assert model.tta_scorer is not None and model.scorer_for(False) is model.scorer
    np.testing.assert_array_equal(model.tta_scorer.mean, tta_scorer.mean)
    image = items[2][1]
    maps, tta_maps = model.maps_from_normalized(image), model.maps_from_normalized(image, tta=True)
    f = object_features(tta_maps, instances(tta_maps, "flow", model.thresholds_for(True)))
    assert np.abs(model.tta_scorer.probabilities(f) - model.scorer.probabilities(f)).max() > 1e-3  # two different scorers
    np.testing.assert_array_equal(model.predict(image, scale=(0.0, 1.0), diameter=None),
                                  model.scorer.segment(maps, model.design, model.thresholds_for(False)))
    np.testing.assert_array_equal(model.predict(image, tta=True, scale=(0.0, 1.0), diameter=None),
                                  model.tta_scorer.segment(tta_maps, model.design, model.thresholds_for(True)))
    # saving the model keeps both scorers
    model.save(tmp_path / "copy")
    assert (tmp_path / "copy" / SCORER_FILE).is_file() and (tmp_path / "copy" / TTA_SCORER_FILE).is_file()
    (tmp_path / "model" / TTA_SCORER_FILE).write_bytes(b"damaged")
    with pytest.raises(ModelError, match="object_scorer_tta.*fit-scorer --tta"):
        Model.load(tmp_path / "model")


def test_fit_scorer_command_and_a_damaged_scorer_file(tmp_path, capsys):
    data = make_labels_layout(tmp_path / "ds", n=3, shape=(128, 128))
    folder = tmp_path / "model"
    shutil.copytree(nucleiseg.model.DEFAULT_MODEL_DIR, folder)
    (folder / SCORER_FILE).unlink(missing_ok=True)
    assert main(["fit-scorer", "--model", str(folder), "--data", str(data), "--subset", "all", "--epochs", "2", "--quiet"]) == 0
    assert "candidate objects" in capsys.readouterr().out
    assert Model.load(folder).scorer.info["trained_on"].startswith("3 images")
    assert main(["evaluate", "--model", str(folder), "--data", str(data), "-o", str(tmp_path / "e"), "--quiet"]) == 0
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["object_scorer"]["objects"] > 0
    assert main(["evaluate", "--model", str(folder), "--data", str(data), "-o", str(tmp_path / "e0"), "--quiet",
                 "--no-object-scorer"]) == 0
    assert json.loads((tmp_path / "e0" / "metrics.json").read_text())["object_scorer"] is None
    assert main(["fit-scorer", "--model", str(folder), "--data", str(data), "--subset", "all", "--epochs", "1", "--quiet",
                 "--tta"]) == 0
    assert "(TTA maps)" in capsys.readouterr().out and (folder / TTA_SCORER_FILE).is_file()
    assert main(["evaluate", "--model", str(folder), "--data", str(data), "-o", str(tmp_path / "et"), "--quiet", "--tta"]) == 0
    assert json.loads((tmp_path / "et" / "metrics.json").read_text())["object_scorer"]["maps"] == "tta"
    (folder / TTA_SCORER_FILE).unlink()
    (folder / SCORER_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="object scorer.*fit-scorer"):
        Model.load(folder)
    assert Model.load(folder, object_scorer=False).scorer is None
    # evaluating the watershed alone does not need the scorer file at all
    assert main(["evaluate", "--model", str(folder), "--data", str(data), "-o", str(tmp_path / "e1"), "--quiet",
                 "--no-object-scorer"]) == 0
    # fit-scorer replaces a scorer it cannot use (damaged, or of another feature set)
    assert main(["fit-scorer", "--model", str(folder), "--data", str(data), "--subset", "all", "--epochs", "1", "--quiet"]) == 0
    assert Model.load(folder).scorer is not None


def test_scorer_needs_flows():
    lab = two_touching_discs()
    with pytest.raises(ValueError, match="flows"):
        candidates(perfect_maps(lab, "distance"), "distance", {"mask": 0.5, "marker": 0.5, "min_size": 5})
