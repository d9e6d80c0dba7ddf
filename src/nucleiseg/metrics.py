"""Segmentation metrics on label images (pure NumPy/SciPy).

Instance metrics match true and predicted objects one-to-one at an IoU threshold (a match needs
IoU > threshold, as in the DSB2018 rules). Following DSB2018 and StarDist, "AP" at a threshold is
TP / (TP + FP + FN). The DSB2018 score is the mean of that over thresholds 0.50, 0.55, ..., 0.95,
computed per image, then averaged over images.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

DSB_THRESHOLDS = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2))


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every true object (rows, labels 1..) with every predicted object (columns)."""
    true = _sequential(true)
    pred = _sequential(pred)
    n_true, n_pred = int(true.max()), int(pred.max())
    if n_true == 0 or n_pred == 0:
        return np.zeros((n_true, n_pred))
    overlap = np.bincount(true.ravel().astype(np.int64) * (n_pred + 1) + pred.ravel(),
                          minlength=(n_true + 1) * (n_pred + 1)).reshape(n_true + 1, n_pred + 1)
    area_true = overlap.sum(axis=1, keepdims=True)
    area_pred = overlap.sum(axis=0, keepdims=True)
    union = area_true + area_pred - overlap
    iou = overlap / np.maximum(union, 1)
    return iou[1:, 1:]


def _sequential(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError("label images must be non-negative")
    values = np.unique(labels)
    values = values[values > 0]
    if values.size and values[-1] == values.size:
        return labels.astype(np.int64)
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int64)
    lut[values] = np.arange(1, values.size + 1)
    return lut[labels]


def _match_count(iou: np.ndarray, threshold: float) -> tuple[int, float]:
    """Number of one-to-one matches with IoU > threshold (optimal assignment) and their IoU sum."""
    if iou.size == 0:
        return 0, 0.0
    if threshold >= 0.5:  # IoU > 0.5 makes matches unique: no assignment problem
        hits = iou > threshold
        return int(hits.sum()), float(iou[hits].sum())
    rows, cols = linear_sum_assignment(-np.where(iou > threshold, iou, 0))
    good = iou[rows, cols] > threshold
    return int(good.sum()), float(iou[rows, cols][good].sum())


def _scores(tp: int, fp: int, fn: int, iou_sum: float) -> dict:
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
    denom = tp + fp + fn
    f1 = 2 * tp / (2 * tp + fp + fn) if denom else 1.0
    mean_iou = iou_sum / tp if tp else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1,
            "ap": tp / denom if denom else 1.0, "mean_matched_iou": mean_iou,
            "panoptic_quality": mean_iou * f1 if denom else 1.0}


def matching(true: np.ndarray, pred: np.ndarray, threshold: float = 0.5, iou: np.ndarray | None = None) -> dict:
    """TP, FP, FN, precision, recall, F1, AP (=TP/(TP+FP+FN)), mean matched IoU and panoptic quality.

    Empty truth and empty prediction together score 1 (nothing to find, nothing found).
    """
    if iou is None:
        iou = iou_matrix(true, pred)
    n_true, n_pred = iou.shape
    tp, iou_sum = _match_count(iou, threshold)
    return {"threshold": threshold, **_scores(tp, n_pred - tp, n_true - tp, iou_sum)}


def dsb_score(true: np.ndarray, pred: np.ndarray, iou: np.ndarray | None = None) -> float:
    """DSB2018 score of one image: mean over IoU thresholds 0.5..0.95 of TP/(TP+FP+FN)."""
    if iou is None:
        iou = iou_matrix(true, pred)
    return float(np.mean([matching(None, None, t, iou=iou)["ap"] for t in DSB_THRESHOLDS]))


def instance_metrics(true: np.ndarray, pred: np.ndarray) -> dict:
    """One image's DSB score plus matching at IoU 0.5 (ap50, f1_50, ...), from one IoU matrix."""
    iou = iou_matrix(true, pred)
    m = matching(None, None, 0.5, iou=iou)
    return {"dsb_score": dsb_score(None, None, iou=iou), "ap50": m["ap"], "f1_50": m["f1"],
            "precision50": m["precision"], "recall50": m["recall"], "mean_matched_iou": m["mean_matched_iou"],
            "panoptic_quality": m["panoptic_quality"], "n_true": iou.shape[0], "n_pred": iou.shape[1],
            "tp50": m["tp"], "fp50": m["fp"], "fn50": m["fn"]}


def pooled_matching(trues: list[np.ndarray], preds: list[np.ndarray], threshold: float = 0.5) -> dict:
    """Matching with TP/FP/FN summed over all images before the ratios (the 'pooled' variant)."""
    tp = fp = fn = 0
    iou_sum = 0.0
    for true, pred in zip(trues, preds):
        iou = iou_matrix(true, pred)
        t, s = _match_count(iou, threshold)
        tp, fp, fn, iou_sum = tp + t, fp + iou.shape[1] - t, fn + iou.shape[0] - t, iou_sum + s
    return {"threshold": threshold, **_scores(tp, fp, fn, iou_sum)}


def pooled_dsb_score(trues: list[np.ndarray], preds: list[np.ndarray]) -> float:
    """Pooled DSB-style score: TP/FP/FN summed over images at each threshold, then averaged."""
    ious = [iou_matrix(t, p) for t, p in zip(trues, preds)]
    scores = []
    for thr in DSB_THRESHOLDS:
        tp = sum(_match_count(i, thr)[0] for i in ious)
        n_true = sum(i.shape[0] for i in ious)
        n_pred = sum(i.shape[1] for i in ious)
        denom = n_true + n_pred - tp
        scores.append(tp / denom if denom else 1.0)
    return float(np.mean(scores))


def pixel_metrics(true_mask: np.ndarray, pred_mask: np.ndarray) -> dict:
    """Pixel accuracy, foreground IoU and Dice of two binary masks (empty vs empty scores 1)."""
    t = np.asarray(true_mask) > 0
    p = np.asarray(pred_mask) > 0
    inter = int(np.logical_and(t, p).sum())
    union = int(np.logical_or(t, p).sum())
    total = int(t.sum() + p.sum())
    return {"pixel_accuracy": float((t == p).mean()), "foreground_iou": inter / union if union else 1.0,
            "dice": 2 * inter / total if total else 1.0}
