"""Property-based tests: readers never crash with anything but their own clear error; post-processing
and metrics keep their invariants on random label images."""

import numpy as np
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nucleiseg.io import ImageError, as_2d_image, read_image, read_labels
from nucleiseg.metrics import dsb_score, instance_metrics, matching, pixel_metrics
from nucleiseg.postprocess import instances

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float16, np.float32, np.float64, np.bool_])


@FAST
@given(data=st.binary(min_size=0, max_size=2048), ext=st.sampled_from([".png", ".tif", ".jpg", ".tiff", ".jpeg"]))
def test_random_bytes_give_image_error(tmp_path, data, ext):
    path = tmp_path / f"random{ext}"
    path.write_bytes(data)
    for reader in (read_image, read_labels):
        try:
            reader(path)
        except ImageError as exc:
            assert "random" in str(exc)


@FAST
@given(header=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"\xff\xd8\xff\xe0"]),
       tail=st.binary(max_size=512), ext=st.sampled_from([".png", ".tif", ".jpg"]))
def test_valid_headers_with_garbage_give_image_error(tmp_path, header, tail, ext):
    path = tmp_path / f"hdr{ext}"
    path.write_bytes(header + tail)
    try:
        read_image(path)
    except ImageError as exc:
        assert "hdr" in str(exc)


@FAST
@given(arr=arrays(DTYPES, st.tuples(st.integers(1, 12), st.integers(1, 40), st.integers(1, 40))
                  | st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_arrays_of_any_shape_and_dtype(arr):
    try:
        out = as_2d_image(arr, "arr")
    except ImageError as exc:
        assert str(exc).startswith("arr:")
        return
    assert out.ndim in (2, 3) and (out.ndim == 2 or out.shape[2] == 3)
    assert out.dtype.kind in "uif" and out.dtype != np.float64


@FAST
@given(arr=arrays(st.sampled_from([np.uint8, np.uint16, np.float32]), st.tuples(st.integers(8, 30), st.integers(8, 30))))
def test_tiff_round_trip_of_random_images(tmp_path, arr):
    path = tmp_path / "r.tif"
    tifffile.imwrite(path, arr)
    try:
        out = read_image(path)
    except ImageError as exc:
        assert "NaN" in str(exc) or "infinite" in str(exc)
        return
    np.testing.assert_array_equal(out, arr)


LABELS = arrays(np.int32, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.integers(0, 6))


@FAST
@given(true=LABELS, pred=LABELS)
def test_metric_invariants(true, pred):
    if true.shape != pred.shape:
        pred = np.resize(pred, true.shape)
    s = dsb_score(true, pred)
    assert 0.0 <= s <= 1.0
    m = instance_metrics(true, pred)
    for key in ("ap50", "f1_50", "precision50", "recall50", "mean_matched_iou", "panoptic_quality"):
        assert 0.0 <= m[key] <= 1.0
    assert m["tp50"] + m["fn50"] == m["n_true"] and m["tp50"] + m["fp50"] == m["n_pred"]
    assert dsb_score(true, true) == 1.0  # a perfect prediction scores 1
    for key, value in pixel_metrics(true, pred).items():
        assert 0.0 <= value <= 1.0
    if true.max() > 0:
        assert dsb_score(true, np.zeros_like(true)) == 0.0
        assert dsb_score(np.zeros_like(true), true) == 0.0
    assert matching(true, pred, 0.3)["tp"] >= matching(true, pred, 0.7)["tp"]


@FAST
@given(maps=arrays(np.float32, st.tuples(st.just(3), st.integers(4, 40), st.integers(4, 40)),
                   elements=st.floats(0, 1, width=32)),
       design=st.sampled_from(["semantic", "contour", "distance"]),
       mask=st.floats(0.05, 0.95), marker=st.floats(0.05, 0.95), min_size=st.integers(0, 30))
def test_postprocess_on_random_maps(maps, design, mask, marker, min_size):
    if design == "semantic":
        maps = maps[:2]
    labels = instances(maps, design, {"mask": mask, "marker": marker, "min_size": min_size})
    assert labels.shape == maps.shape[1:] and labels.dtype == np.int32
    n = labels.max()
    assert set(np.unique(labels)) - {0} == set(range(1, n + 1))  # sequential labels
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        assert sizes.min() >= min_size
        # nuclei only where the mask allows, or in holes enclosed by the mask (which are filled)
        from scipy.ndimage import binary_fill_holes
        assert np.all(binary_fill_holes(1 - maps[0] > mask)[labels > 0])
