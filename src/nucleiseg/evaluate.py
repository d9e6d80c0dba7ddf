"""Evaluation on annotated data: pixel and instance metrics per image, per image type and overall;
threshold tuning on validation data; figures of examples and of the best and worst images."""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .data import find_samples, load_items
from .figures import outlines_figure
from .metrics import instance_metrics, pixel_metrics, pooled_dsb_score, pooled_matching
from .postprocess import WITH_FLOWS, instances
from .transforms import IMAGE_TYPES, image_type


def _score(maps: list[np.ndarray], labels: list[np.ndarray], design: str, thresholds: dict) -> float:
    from .metrics import dsb_score

    return float(np.mean([dsb_score(t, instances(m, design, thresholds)) for m, t in zip(maps, labels)]))


_SHARED: tuple | None = None  # (maps, labels, design) while tuning: forked worker processes inherit it, uncopied


def _score_shared(thresholds: dict) -> float:
    return _score(*_SHARED, thresholds)


def _scores(maps: list[np.ndarray], labels: list[np.ndarray], design: str, trials: list[dict], workers: int) -> list[float]:
    """Mean DSB score of each set of thresholds in ``trials``; in ``workers`` forked processes on Linux (the maps
    are shared, not pickled), else (or inside a daemon process, which may not have children) one after the other."""
    global _SHARED
    if (workers <= 1 or len(trials) == 1 or not sys.platform.startswith("linux")
            or multiprocessing.current_process().daemon):
        return [_score(maps, labels, design, t) for t in trials]
    _SHARED = (maps, labels, design)
    try:
        with ProcessPoolExecutor(min(workers, len(trials)), mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_score_shared, trials))
    finally:
        _SHARED = None


def tuning_grid(design: str) -> dict:
    """The values :func:`tune_thresholds` tries for each threshold (or pair) that ``design``'s post-processing uses."""
    grid = {"mask": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "marker": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
            "min_size": [0, 5, 10, 15, 25, 40], "peak_h": [0.0, 0.1, 0.2, 0.3],
            "object_prob": [0.0, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8],
            "contact": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], "flow_seed": [0, 3, 5, 10, 15, 25],
            "star_nms": [0.0, 0.2, 0.3, 0.4, 0.5, 0.6],
            # searched together: the flows' convergence raises the seed map's peaks, so it needs a larger peak_h
            ("flow_convergence", "peak_h"): [(w, h) for w in (0.0, 0.25, 0.5, 0.75, 1.0) for h in (0.2, 0.3, 0.4, 0.5)]}
    if design != "contact":
        del grid["contact"]
    if design not in WITH_FLOWS:  # flow design: seeds from the flows, or (flow_seed 0) from the distance map
        del grid["flow_seed"], grid[("flow_convergence", "peak_h")]
    if design != "star":  # star design: polygons and non-maximum suppression, or (star_nms 0) as the flow design
        del grid["star_nms"]
    if design == "semantic":
        del grid["marker"], grid["peak_h"]
    return grid


def tune_thresholds(maps: list[np.ndarray], labels: list[np.ndarray], design: str, start: dict | None = None,
                    workers: int | None = None) -> dict:
    """Choose mask / marker thresholds, peak height, minimum size, object probability (and the design's own
    thresholds) maximising the mean DSB score (coordinate search from ``start``, default :data:`DEFAULT_THRESHOLDS`,
    some thresholds in pairs; never worse than ``start``). The values of one threshold are scored in ``workers``
    processes (default: one per CPU).

    Flow designs seed nuclei in two ways (distance-map peaks, ``flow_seed`` 0; flow paths, ``flow_seed`` > 0) whose
    other thresholds differ: one search tends to stay with the way it reaches first (RESULTS stage 29), so the
    search runs once within each way, and the better result is kept."""
    from .postprocess import DEFAULT_THRESHOLDS

    start = {**DEFAULT_THRESHOLDS, **{k: v for k, v in (start or {}).items() if k in DEFAULT_THRESHOLDS}}
    grid = tuning_grid(design)
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)  # CPUs we may use
    searches = [(start, grid)]
    if "flow_seed" in grid:
        by_paths = [v for v in grid["flow_seed"] if v > 0]
        searches = [({**start, "flow_seed": 0}, {k: v for k, v in grid.items() if k != "flow_seed"}),
                    ({**start, "flow_seed": start["flow_seed"] or by_paths[0]}, {**grid, "flow_seed": by_paths})]
    # the search that begins at ``start`` itself returns at least its score: never worse than the start
    best, best_score = max((_coordinate_search(maps, labels, design, first, g, workers) for first, g in searches),
                           key=lambda found: found[1])
    return {**best, "tuned_dsb_score": round(best_score, 5), "tuned_on": f"{len(maps)} validation images"}


def _coordinate_search(maps: list[np.ndarray], labels: list[np.ndarray], design: str, best: dict, grid: dict,
                       workers: int) -> tuple[dict, float]:
    """Two rounds over ``grid``'s keys, each time keeping the value (of one key, or one pair) that scores best."""
    best_score = _score(maps, labels, design, best)
    for _round in range(2):
        for key, values in grid.items():
            # each trial changes only this key (or pair), so scoring them together chooses as one by one would
            trials = [{**best, **(dict(zip(key, v)) if isinstance(key, tuple) else {key: v})} for v in values]
            for trial, s in zip(trials, _scores(maps, labels, design, trials, workers)):
                if s > best_score + 1e-6:
                    best, best_score = trial, s
    return best, best_score


def _summarise(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)]
    return {"n_images": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in keys if k not in ("n_true", "n_pred", "tp50", "fp50", "fn50")},
            "n_true": int(sum(r["n_true"] for r in rows)), "n_pred": int(sum(r["n_pred"] for r in rows))}


def evaluate_items(model, items: list[tuple[str, np.ndarray, np.ndarray]], maps: list[np.ndarray] | None = None,
                   tta: bool = False, keep_predictions: bool = False, diameter: float | str | None = None,
                   types: dict[str, str] | None = None) -> dict:
    """Metrics for cached (name, normalised image, labels) items: per-image rows, summary, per type
    (``types`` by name from ``data.load_items``, else judged from the normalised images). Each image is
    segmented by the model's specialist for its type where it has one, except with cached ``maps`` (of the
    model's own network).

    ``diameter`` None scores each image at its own size (what thresholds are tuned on); 'auto' or a number
    scores what ``nucleiseg predict`` writes with that ``--diameter`` (images zoomed to the trained size)."""
    if maps is not None and diameter is not None:
        raise ValueError("cached maps are of the images as they are: give maps or a diameter, not both")
    rows, preds = [], []
    inter = union = correct = total = 0
    for i, (name, image, true) in enumerate(items):
        started = time.perf_counter()
        kind = types[name] if types else image_type(image, model.config["normalization"])
        if maps is not None:  # maps of the model's own network (e.g. while tuning its thresholds)
            pred = model.segment(maps[i], model.thresholds_for(tta), tta)
        elif diameter is not None:  # the image is normalised already: a fixed identity scale
            pred = model.for_type(kind).predict(image, tta=tta, scale=(0.0, 1.0), diameter=diameter, route=False)
        else:
            sub = model.for_type(kind)  # its specialist for this type of image, if it has one
            pred = sub.segment(sub.maps_from_normalized(image, tta=tta), sub.thresholds_for(tta), tta)
        row = {"image": name, "type": kind,
               "height": true.shape[0], "width": true.shape[1],
               **pixel_metrics(true > 0, pred > 0), **instance_metrics(true, pred),
               "seconds": time.perf_counter() - started}
        rows.append(row)
        preds.append(pred)
        t, p = true > 0, pred > 0
        inter, union = inter + int((t & p).sum()), union + int((t | p).sum())
        correct, total = correct + int((t == p).sum()), total + t.size
    summary = _summarise(rows)
    summary["pooled"] = {"foreground_iou": inter / union if union else 1.0, "pixel_accuracy": correct / total,
                         "dsb_score": pooled_dsb_score([it[2] for it in items], preds),
                         **{f"{k}50": v for k, v in pooled_matching([it[2] for it in items], preds).items()
                            if k in ("ap", "f1", "precision", "recall")}}
    groups = {t: _summarise([r for r in rows if r["type"] == t]) for t in IMAGE_TYPES if any(r["type"] == t for r in rows)}
    result = {"summary": summary, "by_type": groups, "rows": rows}
    if keep_predictions:
        result["predictions"] = preds
    return result


def _settings(model, tta: bool) -> dict:
    """What a model segments with, for the report: its folder, thresholds and object scorer."""
    scorer = model.scorer_for(tta)
    return {"model": str(model.path), "thresholds": model.thresholds_for(tta), "object_scorer": scorer.info if scorer else None}


def evaluate(model, data: str | Path, out: str | Path, labels: str | None = None, subset: str = "all",
             tta: bool = False, progress: bool = True, diameter: float | str | None = None) -> dict:
    """Evaluate ``model`` on a dataset folder; write metrics.json, per_image.csv and figures into ``out``.

    ``subset``: 'all' images, or 'val' / 'train' to use the split stored in the model config.
    ``diameter``: None (default) scores images as they are; 'auto' or pixels as :meth:`Model.predict`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    types: dict[str, str] = {}
    items = annotated_items(model, data, labels, subset, progress, problems, types)
    result = evaluate_items(model, items, tta=tta, keep_predictions=True, diameter=diameter, types=types)
    preds = result.pop("predictions")
    rows = result["rows"]
    with open(out / "per_image.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = {"data": str(data), "subset": subset, "tta": tta, "diameter": diameter, **_settings(model, tta),
              "specialists": {kind: _settings(m, tta) for kind, m in model.specialists.items()},
              "summary": result["summary"], "by_type": result["by_type"],
              "skipped": problems}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    order = np.argsort([r["dsb_score"] for r in rows])
    pick = lambda idx: [(rows[i]["image"], items[i][1], items[i][2], preds[i], rows[i]["dsb_score"]) for i in idx]  # noqa: E731
    outlines_figure(pick(order[:4]), out / "worst.png", "Worst images")
    outlines_figure(pick(order[::-1][:4]), out / "best.png", "Best images")
    examples = np.linspace(0, len(rows) - 1, min(8, len(rows))).round().astype(int)
    outlines_figure(pick(examples), out / "examples.png", "Examples")
    return report


def annotated_items(model, data, labels: str | None, subset: str, progress: bool, problems: list[str],
                    types: dict[str, str] | None = None) -> list:
    """Normalised (name, image, labels) of a dataset, or of the model's own 'val' / 'train' split of it
    (with their image types into ``types``, see ``data.load_items``)."""
    _, samples = find_samples(data, labels, problems=problems)
    if subset != "all":
        wanted = set(model.config.get("data", {}).get(subset, []))
        samples = [s for s in samples if s.name in wanted]
        if not samples:
            raise ValueError(f"no images of the model's {subset!r} split found in {data}")
    items = load_items(samples, model.config["normalization"], progress=progress, problems=problems, types=types)
    if not items:
        raise ValueError(f"{data}: no usable annotated images ({len(problems)} skipped)")
    return items


def tune(model, data: str | Path, labels: str | None = None, subset: str = "val", progress: bool = True,
         tta: bool = False) -> dict:
    """Tune ``model``'s thresholds on annotated images (never on images it was trained on, for honest
    figures) and save them in its folder; with ``tta``, the thresholds for test-time augmented maps
    (``thresholds['tta']``), starting from the plain ones. Returns {'before': score, 'thresholds': ...
    (those tuned), 'skipped': [...]}."""
    problems: list[str] = []
    items = annotated_items(model, data, labels, subset, progress, problems)
    maps = [model.maps_from_normalized(image, tta=tta) for _, image, _ in items]
    truth = [it[2] for it in items]
    start = model.thresholds_for(tta)
    before = _score(maps, truth, model.design, start)
    tuned = {**tune_thresholds(maps, truth, model.design, start=start), "tuned_on": f"{len(items)} images of {data} ({subset})"}
    if tta:
        model.thresholds["tta"] = tuned
    else:
        model.thresholds.update(tuned)
    if model.path is not None:
        model.save_thresholds()
    return {"before": before, "thresholds": tuned, "skipped": problems}


def format_report(report: dict) -> str:
    """A short human-readable table of the summary and per-type metrics."""
    keys = ("n_images", "pixel_accuracy", "foreground_iou", "dice", "dsb_score", "ap50", "f1_50")
    lines = ["group          " + " ".join(f"{k:>14}" for k in keys)]
    for name, s in [("all", report["summary"]), *report["by_type"].items()]:
        lines.append(f"{name:<15}" + " ".join(f"{s[k]:>14.4f}" if k != "n_images" else f"{s[k]:>14d}" for k in keys))
    pooled = report["summary"]["pooled"]
    lines.append(f"pooled over all pixels/objects: foreground IoU {pooled['foreground_iou']:.4f}, pixel accuracy "
                 f"{pooled['pixel_accuracy']:.4f}, DSB score {pooled['dsb_score']:.4f}, AP@0.5 {pooled['ap50']:.4f}, "
                 f"F1@0.5 {pooled['f150']:.4f}")
    return "\n".join(lines)
