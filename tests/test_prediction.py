"""Prediction for users: tiling without seams, ONNX backend, Python API, output files, CLI commands."""
import csv
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

import nucleiseg
from conftest import make_labels_layout, to_uint8
from nucleiseg.cli import main
from nucleiseg.data import median_diameter
from nucleiseg.inference import predict_maps, tile_starts
from nucleiseg.io import read_image
from nucleiseg.metrics import iou_matrix, matching
from nucleiseg.outputs import outlines, rle_decode, rle_encode
from nucleiseg.targets import vector_channels
from nucleiseg.synthetic import mosaic, nuclei_image


@pytest.fixture(scope="module")
def model():
    return nucleiseg.load()


def test_tile_starts_cover_with_overlap():
    for size, tile, overlap in [(3000, 1024, 128), (1025, 1024, 128), (5000, 512, 64), (2048, 1152, 128)]:
        starts, length = tile_starts(size, tile, overlap)
        assert length <= tile and length % 32 == 0
        assert starts[0] == 0 and starts[-1] < size <= starts[-1] + length  # the last tile may be cut short
        assert all(b - a <= length - overlap for a, b in zip(starts, starts[1:]))
        assert all(s % 32 == 0 for s in starts)  # the whole image's downsampling grid in every tile
    assert tile_starts(2048, 1152, 128) == ([0, 960], 1088)  # 2 x 2 tiles, not 3 x 3


def test_tiled_and_untiled_agree_on_large_mosaic(model):
    image, _ = mosaic((3000, 3000), seed=1)
    model.use_backend("onnx")
    try:
        whole = model.predict(image, tile_size=3008)  # one pass over the padded image
        tiled = model.predict(image, tile_size=1152)  # 4 x 4 overlapping tiles (overlap 256), blended
    finally:
        model.use_backend("torch")
    assert whole.max() > 100
    m = matching(whole, tiled, 0.5)
    assert m["f1"] > 0.995, m  # tiles on the whole image's stride grid: measured 0.9997
    assert m["mean_matched_iou"] > 0.99, m


def test_a_window_on_the_stride_grid_sees_the_whole_images_maps(model):
    """Tiles start on the network's stride grid, so a window (a block) of a large image gets the same
    probability maps as the whole image away from its edges (a shifted grid changes the output)."""
    from nucleiseg.transforms import intensity_scale

    image, _ = mosaic((2600, 2300), seed=3)
    scale = intensity_scale(image, model.config["normalization"])
    model.use_backend("onnx")
    try:
        whole = model.predict_maps(image, scale=scale)  # 3 x 3 tiles of 1152
        y0, x0, size, halo = 896, 896, 1280, 128
        window = model.predict_maps(image[y0:y0 + size, x0:x0 + size], scale=scale)  # 2 x 2 other tiles
    finally:
        model.use_backend("torch")
    diff = np.abs(whole[:, y0:y0 + size, x0:x0 + size] - window)[:, halo:-halo, halo:-halo]
    assert diff.mean() < 5e-4 and np.percentile(diff, 99.9) < 0.05, (diff.mean(), np.percentile(diff, 99.9))


def test_onnx_backend_matches_torch(model, tmp_path):
    image, _ = nuclei_image((200, 333), n=25, seed=5)
    torch_maps = model.predict_maps(image)
    path = model.export_onnx(tmp_path / "m.onnx")
    model.use_backend("onnx", onnx_path=path)
    try:
        onnx_maps = model.predict_maps(image)
        onnx_labels = model.predict(image)
    finally:
        model.use_backend("torch")
    assert np.abs(onnx_maps - torch_maps).max() < 1e-3
    iou = iou_matrix(model.predict(image), onnx_labels)
    assert iou.shape[0] == iou.shape[1] and (iou.shape[0] == 0 or iou.max(axis=1).min() > 0.95)


def test_tta_averages_flips_and_transposes(model):
    image, _ = nuclei_image((128, 160), n=12, seed=6)
    plain, tta = model.predict_maps(image), model.predict_maps(image, tta=True)
    assert tta.shape == plain.shape and not np.array_equal(tta, plain)
    n_classes = 3 if model.design == "contour" else 2  # distance and flow: 2 classes, then a distance channel
    assert np.allclose(tta[:n_classes].sum(axis=0), 1, atol=1e-4)
    vectors = list(vector_channels(model.design) or ())  # flow vectors lie in [-1, 1], the rest in [0, 1]
    scalars = np.delete(tta, vectors, axis=0)
    assert scalars.min() >= 0 and scalars.max() <= 1
    assert np.abs(tta[vectors]).max(initial=0) <= 1
    # a flipped image gives the flipped TTA result (TTA is flip-equivariant); a left-right flip reverses x vectors
    mirrored = model.predict_maps(image[:, ::-1].copy(), tta=True)[:, :, ::-1].copy()
    if vectors:
        mirrored[vectors[1]] *= -1
    assert np.allclose(mirrored, tta, atol=1e-4)
    # and the transposed image the transposed result (rows and columns swap, so do the vector components)
    transposed = model.predict_maps(np.ascontiguousarray(np.swapaxes(image, 0, 1)), tta=True).transpose(0, 2, 1).copy()
    if vectors:
        transposed[vectors] = transposed[vectors[::-1]].copy()
    assert np.allclose(transposed, tta, atol=1e-4)


def test_tta_negates_vector_channels_of_flipped_passes():
    """A flow model's vectors reverse under a flip: TTA must negate them before averaging, or the four
    passes cancel. The runner here outputs the image's gradient, a vector field that flips exactly."""
    def gradient_runner(batch):
        grey = batch[:, 0]
        gy, gx = np.gradient(grey, axis=(1, 2))
        return np.stack([grey, grey, grey, gy, gx], axis=1)

    image, _ = nuclei_image((64, 96), n=6, seed=2)
    image = np.repeat((image / image.max()).astype(np.float32)[..., None], 3, axis=2)
    plain = predict_maps(gradient_runner, image)
    tta = predict_maps(gradient_runner, image, tta=True, vectors=(3, 4))
    assert np.abs(plain[3:]).max() > 0.05
    assert np.allclose(tta, plain, atol=1e-5)
    unsigned = predict_maps(gradient_runner, image, tta=True)  # without the sign change the vectors cancel
    assert np.abs(unsigned[3:]).max() < 1e-5


def test_tta_reorders_ray_channels_of_flipped_passes():
    """A star model's rays swap directions under a flip: TTA must reorder them before averaging. The runner
    here outputs the exact ray lengths of the image's bright objects, which flip exactly."""
    from skimage.measure import label

    from nucleiseg.targets import ray_distances

    def ray_runner(batch):
        return np.stack([ray_distances(label(grey > 0.3)) for grey in batch[:, 0]])

    image, _ = nuclei_image((64, 96), n=6, seed=2)
    image = np.repeat((image / image.max()).astype(np.float32)[..., None], 3, axis=2)
    plain = predict_maps(ray_runner, image)
    assert plain.max() > 3
    assert np.allclose(predict_maps(ray_runner, image, tta=True, rays=0), plain, atol=1e-5)
    assert not np.allclose(predict_maps(ray_runner, image, tta=True), plain, atol=0.5)  # unordered rays blur


def test_diameter_zooms_large_nuclei_to_the_trained_size(model):
    k = 4  # nuclei 4x larger than in training (about 70 px across), as in a high-magnification image
    f1 = {"native": [], "zoomed": [], "plain": [], "auto": []}
    for seed in range(3):
        image, labels = nuclei_image((192, 192), n=12, seed=seed)
        big, true = np.kron(image, np.ones((k, k), image.dtype)), np.kron(labels, np.ones((k, k), labels.dtype))
        diameter = median_diameter([true])
        assert model.rescale_factor(diameter) == pytest.approx(model.config["nucleus_diameter"] / diameter)
        zoomed = model.predict(big, diameter=diameter)
        assert zoomed.shape == big.shape and zoomed.dtype == np.int32
        assert set(np.unique(zoomed)) == set(range(zoomed.max() + 1))  # labels stay 1..N after zooming back
        f1["zoomed"].append(matching(true, zoomed)["f1"])
        f1["plain"].append(matching(true, model.predict(big, diameter=None))["f1"])
        assert model.estimate_diameter(big) == pytest.approx(diameter, rel=0.25)  # measured by the quick pass
        f1["auto"].append(matching(true, model.predict(big))["f1"])  # diameter='auto' is the default
        native = model.predict(image)
        assert np.array_equal(native, model.predict(image, diameter=None))  # trained size: auto leaves it as it is
        f1["native"].append(matching(labels, native)["f1"])
    mean = {key: np.mean(v) for key, v in f1.items()}
    # with the diameter, given or measured, large nuclei are found as well as at the trained size
    assert mean["zoomed"] >= mean["native"] - 0.1 and mean["zoomed"] > mean["plain"] + 0.1, mean
    assert mean["auto"] >= mean["native"] - 0.1 and mean["auto"] > mean["plain"] + 0.1, mean
    # the minimum size stays in pixels of the input image (zooming resamples areas by a few %)
    min_size = int(np.median(np.bincount(zoomed.ravel())[1:]))
    kept = np.bincount(model.predict(big, diameter=diameter, thresholds={"min_size": min_size}).ravel())[1:]
    assert kept.size > 0 and kept.min() >= 0.9 * min_size
    for bad in (0, -3.0, "large", True):
        with pytest.raises(ValueError, match="diameter"):
            model.predict(image, diameter=bad)


def test_auto_size_zooms_only_when_a_finer_second_pass_agrees(model, monkeypatch):
    """The 1/4-zoom pass can merge close DSB-sized nuclei into large ones (RESULTS: one validation image
    measured 74 px for 41.5 px nuclei); 'auto' zooms only when a pass at 1/2 zoom also finds large nuclei."""
    from nucleiseg.model import AUTO_ZOOM_ABOVE, CONFIRM_ZOOM, PROBE_ZOOM

    trained = model.config["nucleus_diameter"]
    image = np.zeros((64, 64), np.float32)
    for first, second, expected in ((3.8, 2.4, None), (3.8, 3.1, 3.8), (2.0, 3.1, None)):
        calls = []

        def measured(img, tile_size=None, scale=None, zoom=PROBE_ZOOM, first=first, second=second, calls=calls):
            calls.append(zoom)
            return (first if zoom == PROBE_ZOOM else second) * trained

        monkeypatch.setattr(model, "estimate_diameter", measured)
        got = model.auto_diameter(image)
        assert got == (None if expected is None else pytest.approx(expected * trained)), (first, second)
        # the second pass runs only on images the first would zoom
        assert calls == ([PROBE_ZOOM, CONFIRM_ZOOM] if first > AUTO_ZOOM_ABOVE else [PROBE_ZOOM])


def test_median_diameter_of_disks():
    yy, xx = np.mgrid[:200, :200]
    labels = np.zeros((200, 200), np.int32)
    for i, (y, x, r) in enumerate([(40, 40, 10), (100, 100, 10), (160, 160, 10), (40, 160, 20)], start=1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = i
    assert median_diameter([labels]) == pytest.approx(20, abs=0.3)  # three of the four disks are 20 px across
    assert median_diameter([np.zeros((5, 5), np.int32)]) == 0.0


def test_api_predict_many(model, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"x{i}.png"
        Image.fromarray(to_uint8(nuclei_image((96, 96), n=6, seed=i)[0])).save(p)
        paths.append(p)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    results = dict(model.predict_many(paths + [bad]))
    assert all(isinstance(results[p], np.ndarray) and results[p].shape == (96, 96) for p in paths)
    assert isinstance(results[bad], ValueError) and "bad.png" in str(results[bad])


def test_wide_integer_and_float64_files_segment_as_their_16_bit_original(model, tmp_path):
    image, true = nuclei_image((128, 128), n=10, seed=7)
    reference = model.predict(image)
    assert matching(true, reference)["f1"] > 0.8  # the original itself is segmented well
    for name, array in [("u32.tif", image.astype(np.uint32) * 65537), ("i64.tif", image.astype(np.int64) - 5000),
                        ("f64.tif", image / 65535.0)]:
        tifffile.imwrite(tmp_path / name, array)
        labels = model.predict(read_image(tmp_path / name))
        m = matching(reference, labels, threshold=0.9)
        assert m["tp"] == reference.max() == labels.max(), name


def test_outputs_are_standard_files(tmp_path):
    img = to_uint8(nuclei_image((128, 128), n=10, seed=2)[0])
    Image.fromarray(img).save(tmp_path / "cells.png")
    multi = np.stack([np.zeros((128, 128), np.uint16), nuclei_image((128, 128), n=10, seed=2)[0]])
    tifffile.imwrite(tmp_path / "two_channel.tif", multi, photometric="minisblack")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "cells.png"), "-o", str(out), "--quiet", "--outputs", "labels,mask,overlay,csv,rle"]) == 0
    labels = tifffile.imread(out / "cells_labels.tif")
    assert labels.dtype == np.uint16 and labels.shape == (128, 128)
    mask = np.asarray(Image.open(out / "cells_mask.png"))
    assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask > 0, labels > 0)
    assert np.asarray(Image.open(out / "cells_overlay.png")).shape == (128, 128, 3)
    rows = list(csv.DictReader(open(out / "cells_nuclei.csv")))
    assert len(rows) == labels.max()
    for key in ("label", "centroid_y", "centroid_x", "area", "perimeter", "eccentricity", "solidity",
                "bbox_min_y", "bbox_max_x", "intensity_mean", "intensity_max"):
        assert key in rows[0]
    if rows:
        assert int(rows[0]["area"]) == (labels == int(rows[0]["label"])).sum()
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert summary[0]["n_nuclei"] == str(labels.max()) and summary[0]["status"] == "done"
    rle = list(csv.DictReader(open(out / "submission_rle.csv")))
    assert len(rle) == labels.max()
    # --channel picks the nuclear stain of a multi-channel TIFF; --outputs selects files
    assert main(["predict", str(tmp_path / "two_channel.tif"), "-o", str(out), "--quiet", "--channel", "1",
                 "--outputs", "labels"]) == 0
    assert (out / "two_channel_labels.tif").is_file() and not (out / "two_channel_mask.png").exists()
    # outlines for QuPath / napari (GeoJSON) and Fiji (ImageJ ROI set), one per nucleus, named by its label
    from roifile import roiread

    assert main(["predict", str(tmp_path / "cells.png"), "-o", str(tmp_path / "o"), "--quiet", "--outputs", "outlines,rois"]) == 0
    features = json.loads((tmp_path / "o" / "cells_outlines.geojson").read_text())["features"]
    assert [f["properties"]["label"] for f in features] == list(range(1, labels.max() + 1))
    assert all(f["geometry"]["type"] == "Polygon" and f["properties"]["objectType"] == "detection" for f in features)
    rois = roiread(tmp_path / "o" / "cells_rois.zip")
    assert [r.name for r in rois] == [f"{i:06d}" for i in range(1, labels.max() + 1)]
    for roi, feature in zip(rois, features):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert np.allclose(roi.coordinates(), ring[:len(roi.coordinates())], atol=0.01)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")  # no nuclei: empty, valid files
    assert main(["predict", str(tmp_path / "empty.png"), "-o", str(tmp_path / "o"), "--quiet", "--outputs", "outlines,rois"]) == 0
    assert json.loads((tmp_path / "o" / "empty_outlines.geojson").read_text())["features"] == []
    assert roiread(tmp_path / "o" / "empty_rois.zip") == []


def test_glob_inputs(tmp_path):
    for i in range(2):
        Image.fromarray(to_uint8(nuclei_image((64, 64), n=4, seed=i)[0])).save(tmp_path / f"g{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "g*.png"), "-o", str(out), "--quiet", "--outputs", "labels"]) == 0
    assert sorted(p.name for p in out.glob("*_labels.tif")) == ["g0_labels.tif", "g1_labels.tif"]


def _shoelace(xy: np.ndarray) -> float:
    return 0.5 * abs(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))


def test_outlines_run_along_the_pixel_edges():
    labels = np.zeros((20, 30), np.int32)
    labels[3:13, 5:11] = 4  # rows 3..12, columns 5..10: 10 x 6 pixels
    labels[15:20, 25:30] = 7  # touches the image's corner
    (four, xy), (seven, xy7) = outlines(labels)
    assert (four, seven) == (4, 7) and np.array_equal(xy[0], xy[-1])  # closed rings
    # pixel-corner coordinates: the rectangle spans x 5..11, y 3..13; its 4 corners are cut by 1/8 pixel each
    assert xy[:, 0].min() == 5 and xy[:, 0].max() == 11 and xy[:, 1].min() == 3 and xy[:, 1].max() == 13
    assert _shoelace(xy) == pytest.approx(60 - 4 / 8)
    assert xy7[:, 0].max() == 30 and xy7[:, 1].max() == 20 and _shoelace(xy7) == pytest.approx(25 - 4 / 8)


def test_outlines_redraw_realistic_nuclei():
    from skimage.draw import polygon2mask

    _, labels = nuclei_image((128, 128), n=12, seed=4)
    polygons = outlines(labels)
    assert [i for i, _ in polygons] == sorted(set(np.unique(labels)) - {0})
    for i, xy in polygons:
        redrawn = polygon2mask(labels.shape, xy[:, ::-1] - 0.5)  # corners -> pixel centres, (row, column)
        assert iou_matrix(labels == i, redrawn)[0, 0] > 0.85
        assert _shoelace(xy) == pytest.approx((labels == i).sum(), rel=0.1)


def test_rle_round_trip():
    _, labels = nuclei_image((50, 70), n=6, seed=3)
    for k in range(1, labels.max() + 1):
        assert np.array_equal(rle_decode(rle_encode(labels == k), labels.shape), labels == k)
    # column-major order: (0,0)=1, (1,0)=1, (0,1)=0, (1,1)=1 -> runs "start 1 length 2", "start 4 length 1"
    assert rle_encode(np.array([[1, 0], [1, 1]])) == "1 2 4 1"


def test_evaluate_command_writes_reports(tmp_path, capsys):
    data = make_labels_layout(tmp_path / "ds", n=3, shape=(96, 96))
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "-o", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "dsb_score" in printed and "fluorescence" in printed
    report = json.loads((out / "metrics.json").read_text())
    for key in ("pixel_accuracy", "foreground_iou", "dice", "dsb_score", "ap50", "f1_50"):
        assert 0 <= report["summary"][key] <= 1
    assert "pooled" in report["summary"] and "fluorescence" in report["by_type"]
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 3 and {"image", "type", "dsb_score", "ap50", "foreground_iou"} <= set(rows[0])
    for name in ("examples.png", "best.png", "worst.png"):
        assert (out / name).stat().st_size > 1000


def test_evaluate_diameter_scores_what_predict_writes(tmp_path, model):
    """`evaluate --diameter auto` scores the zoomed segmentation `predict` writes; the default scores images
    as they are (what thresholds are tuned on)."""

    k = 4  # nuclei 4x the trained size
    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    img, lab = nuclei_image((128, 128), n=10, seed=20)
    Image.fromarray(to_uint8(np.kron(img, np.ones((k, k), img.dtype)))).save(root / "images" / "b0.png")
    Image.fromarray(np.kron(lab, np.ones((k, k), lab.dtype)).astype(np.uint16)).save(root / "labels" / "b0.png")
    scores = {}
    for diameter in ("none", "auto"):
        out = tmp_path / f"e-{diameter}"
        assert main(["evaluate", "--data", str(root), "-o", str(out), "--diameter", diameter, "--quiet"]) == 0
        report = json.loads((out / "metrics.json").read_text())
        assert report["diameter"] == (None if diameter == "none" else "auto")
        scores[diameter] = float(next(csv.DictReader(open(out / "per_image.csv")))["f1_50"])
    truth = np.asarray(Image.open(root / "labels" / "b0.png"))
    assert scores["auto"] == pytest.approx(matching(truth, model.predict(read_image(root / "images" / "b0.png")))["f1"])
    assert scores["auto"] > scores["none"] + 0.1, scores


def test_tune_command_saves_thresholds_no_worse_than_before(tmp_path, capsys):
    import shutil

    data = make_labels_layout(tmp_path / "ds", n=4, shape=(128, 128))
    model_dir = tmp_path / "model"
    shutil.copytree(nucleiseg.model.DEFAULT_MODEL_DIR, model_dir)
    before = json.loads((model_dir / "thresholds.json").read_text())
    # tuning scores the watershed alone (the object scorer, when the model has one, comes on top)
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "-o", str(tmp_path / "e0"), "--quiet",
                 "--no-object-scorer"]) == 0
    score_before = json.loads((tmp_path / "e0" / "metrics.json").read_text())["summary"]["dsb_score"]
    assert main(["tune", "--model", str(model_dir), "--data", str(data), "--subset", "all", "--quiet"]) == 0
    assert "saved to" in capsys.readouterr().out
    after = json.loads((model_dir / "thresholds.json").read_text())
    assert set(before) - {"tuned_on", "tuned_dsb_score"} <= set(after) and "peak_h" in after
    assert after["tuned_dsb_score"] >= score_before - 1e-4
    # the saved thresholds are the ones evaluation (and prediction) now use
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "-o", str(tmp_path / "e1"), "--quiet",
                 "--no-object-scorer"]) == 0
    score_after = json.loads((tmp_path / "e1" / "metrics.json").read_text())["summary"]["dsb_score"]
    assert score_after == pytest.approx(after["tuned_dsb_score"], abs=1e-4)


def test_tune_tta_keeps_its_own_thresholds_used_with_tta(tmp_path, capsys):
    import shutil

    data = make_labels_layout(tmp_path / "ds", n=3, shape=(128, 128))
    model_dir = tmp_path / "model"
    shutil.copytree(nucleiseg.model.DEFAULT_MODEL_DIR, model_dir)
    before = json.loads((model_dir / "thresholds.json").read_text())
    assert main(["tune", "--model", str(model_dir), "--data", str(data), "--subset", "all", "--tta", "--quiet"]) == 0
    assert "(key 'tta')" in capsys.readouterr().out
    after = json.loads((model_dir / "thresholds.json").read_text())
    assert all(after[k] == v for k, v in before.items() if k != "tta")  # the plain thresholds are kept
    assert {"mask", "marker", "peak_h", "tuned_dsb_score"} <= set(after["tta"])
    # evaluation with --tta scores with the TTA thresholds (the score tuning found), without it with the plain ones
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "-o", str(tmp_path / "e"), "--tta", "--quiet",
                 "--no-object-scorer"]) == 0
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["summary"]["dsb_score"] == pytest.approx(after["tta"]["tuned_dsb_score"], abs=1e-4)
    assert report["thresholds"]["mask"] == after["tta"]["mask"]


def test_tta_thresholds_apply_only_with_tta(model):
    import copy

    image, _ = nuclei_image((96, 96), n=6, seed=3)
    m = copy.copy(model)
    m.thresholds = {**model.thresholds, "tta": {"min_size": 10**6}}  # TTA thresholds that keep nothing
    assert m.thresholds_for(True)["min_size"] == 10**6 and m.thresholds_for(False)["min_size"] == model.thresholds["min_size"]
    assert m.thresholds_for(True, {"min_size": 5})["min_size"] == 5  # explicit overrides win
    assert m.predict(image, tta=True).max() == 0
    assert m.predict(image).max() > 0


def test_export_and_onnx_backend_cli(tmp_path, capsys):
    assert main(["export", "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[2] == "height" and dims[3] == "width"
    Image.fromarray(to_uint8(nuclei_image((96, 128), n=8, seed=1)[0])).save(tmp_path / "a.png")
    for backend in ("torch", "onnx"):
        assert main(["predict", str(tmp_path / "a.png"), "-o", str(tmp_path / backend), "--quiet", "--backend", backend]) == 0
    a = tifffile.imread(tmp_path / "torch" / "a_labels.tif")
    b = tifffile.imread(tmp_path / "onnx" / "a_labels.tif")
    assert a.max() == b.max() and (a > 0).sum() == pytest.approx((b > 0).sum(), rel=0.01)


def test_predict_cli_diameter_and_threshold_overrides(tmp_path, capsys):
    image, labels = nuclei_image((96, 96), n=6, seed=2)
    big = np.kron(image, np.ones((3, 3), image.dtype))
    tifffile.imwrite(tmp_path / "big.tif", big)
    d = median_diameter([np.kron(labels, np.ones((3, 3), labels.dtype))])
    assert main(["predict", str(tmp_path / "big.tif"), "-o", str(tmp_path / "a"), "--quiet", "--diameter", f"{d:.1f}"]) == 0
    found = tifffile.imread(tmp_path / "a" / "big_labels.tif")
    assert found.shape == big.shape and 4 <= found.max() <= 8
    # a minimum size above every nucleus, given on the command line, reaches the per-file options
    assert main(["predict", str(tmp_path / "big.tif"), "-o", str(tmp_path / "b"), "--quiet", "--min-size", "100000"]) == 0
    assert tifffile.imread(tmp_path / "b" / "big_labels.tif").max() == 0
    # --peak-h 0 switches to region seeds, which find the same 6 nuclei about as well
    assert main(["predict", str(tmp_path / "big.tif"), "-o", str(tmp_path / "p"), "--quiet", "--peak-h", "0",
                 "--diameter", f"{d:.1f}"]) == 0
    assert 4 <= tifffile.imread(tmp_path / "p" / "big_labels.tif").max() <= 8
    # without the flows' convergence (the stage-10 post-processing) as well
    assert main(["predict", str(tmp_path / "big.tif"), "-o", str(tmp_path / "f"), "--quiet", "--flow-convergence", "0",
                 "--peak-h", "0.3", "--diameter", f"{d:.1f}"]) == 0
    assert 4 <= tifffile.imread(tmp_path / "f" / "big_labels.tif").max() <= 8
    assert main(["predict", str(tmp_path / "big.tif"), "-o", str(tmp_path / "c"), "--diameter", "-3"]) == 1
    assert "--diameter must be a positive number" in capsys.readouterr().err


def test_help_and_info(capsys):
    for cmd in (["--help"], ["predict", "--help"], ["train", "--help"], ["evaluate", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(cmd)
        assert info.value.code == 0
        assert "example" in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "nucleiseg" in out and "default model" in out and "backends" in out and "object scorer: yes" in out
