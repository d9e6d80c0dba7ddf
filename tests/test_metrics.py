"""Metrics against hand-computed values."""
import numpy as np
import pytest

from nucleiseg.metrics import (dsb_score, instance_metrics, iou_matrix, matching, pixel_metrics,
                               pooled_dsb_score, pooled_matching)


def squares(*specs, shape=(20, 20)):
    """Label image with one square per (y, x, size)."""
    lab = np.zeros(shape, np.int32)
    for i, (y, x, s) in enumerate(specs, start=1):
        lab[y:y + s, x:x + s] = i
    return lab


def test_iou_matrix_hand_computed():
    true = squares((0, 0, 4), (10, 10, 4))
    pred = squares((0, 0, 4), (10, 12, 4))  # second shifted by 2: overlap 8, union 24
    iou = iou_matrix(true, pred)
    assert iou.shape == (2, 2)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[1, 1] == pytest.approx(8 / 24)
    assert iou[0, 1] == 0 and iou[1, 0] == 0


def test_matching_counts_and_scores():
    true = squares((0, 0, 4), (10, 10, 4), (0, 10, 3))
    pred = squares((0, 0, 4), (10, 12, 4), (15, 0, 2))
    m = matching(true, pred, 0.5)
    # only the first pair has IoU > 0.5
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 2)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 / 6)
    assert m["ap"] == pytest.approx(1 / 5)
    assert m["mean_matched_iou"] == pytest.approx(1.0)
    assert m["panoptic_quality"] == pytest.approx(1 / 3)
    # below 0.5 the optimal assignment also matches the shifted square (IoU 1/3)
    m2 = matching(true, pred, 0.3)
    assert (m2["tp"], m2["fp"], m2["fn"]) == (2, 1, 1)
    assert m2["mean_matched_iou"] == pytest.approx((1 + 1 / 3) / 2)


def test_dsb_score_hand_computed():
    true = squares((0, 0, 10))
    pred = np.zeros_like(true)
    pred[0:10, 0:8] = 1  # IoU 0.8: matched for t in 0.50..0.75 (6 of 10 thresholds)
    assert iou_matrix(true, pred)[0, 0] == pytest.approx(0.8)
    assert dsb_score(true, pred) == pytest.approx(0.6)
    # a match needs IoU strictly greater than the threshold
    pred2 = np.zeros_like(true)
    pred2[0:10, 0:5] = 1  # IoU exactly 0.5
    assert dsb_score(true, pred2) == pytest.approx(0.0)


def test_empty_cases():
    empty = np.zeros((8, 8), np.int32)
    one = squares((0, 0, 3), shape=(8, 8))
    assert dsb_score(empty, empty) == 1.0
    assert dsb_score(one, empty) == 0.0
    assert dsb_score(empty, one) == 0.0
    m = matching(one, empty)
    assert (m["tp"], m["fp"], m["fn"], m["precision"], m["recall"]) == (0, 0, 1, 0.0, 0.0)
    m = matching(empty, one)
    assert (m["tp"], m["fp"], m["fn"], m["precision"], m["recall"]) == (0, 1, 0, 0.0, 0.0)
    assert pixel_metrics(empty, empty)["foreground_iou"] == 1.0
    assert pixel_metrics(one, empty)["foreground_iou"] == 0.0


def test_label_values_need_not_be_sequential():
    true = squares((0, 0, 4), (10, 10, 4)) * 7
    pred = squares((10, 10, 4), (0, 0, 4)) + 100 * (squares((10, 10, 4), (0, 0, 4)) > 0)
    assert dsb_score(true, pred) == 1.0


def test_pooled_vs_per_image():
    t1, p1 = squares((0, 0, 4)), squares((0, 0, 4))
    t2 = squares((0, 0, 4), (10, 10, 4), (0, 10, 4))
    p2 = np.zeros_like(t2)
    # per image: 1.0 and 0.0 -> mean 0.5; pooled: TP 1, FN 3 -> 0.25
    per_image = np.mean([dsb_score(t1, p1), dsb_score(t2, p2)])
    assert per_image == pytest.approx(0.5)
    assert pooled_dsb_score([t1, t2], [p1, p2]) == pytest.approx(0.25)
    assert pooled_matching([t1, t2], [p1, p2])["ap"] == pytest.approx(0.25)


def test_pixel_metrics_hand_computed():
    t = np.zeros((4, 4), bool)
    t[:2] = True  # 8 px
    p = np.zeros((4, 4), bool)
    p[1:3] = True  # 8 px, overlap 4
    m = pixel_metrics(t, p)
    assert m["pixel_accuracy"] == pytest.approx(8 / 16)
    assert m["foreground_iou"] == pytest.approx(4 / 12)
    assert m["dice"] == pytest.approx(8 / 16)


def test_instance_metrics_keys():
    t = squares((0, 0, 4), (10, 10, 4))
    m = instance_metrics(t, t)
    assert m["dsb_score"] == 1.0 and m["ap50"] == 1.0 and m["f1_50"] == 1.0
    assert m["n_true"] == 2 and m["n_pred"] == 2
