"""Per-subgroup evidence: the paper metric, AUC and ECE per group (sex, age bin, view, …) with CIs, the worst group,
the largest gap and, for binary tasks, the equalised-odds difference.

Choices a reader should know:

* A missing group value (None, NaN, "") is its own group, :data:`UNKNOWN`, so no image silently leaves the
  report and the count of unknowns is visible.
* A group with fewer than ``min_size`` (30) images, or with one class only, is kept and *flagged*: its numbers
  are shown but it is not eligible as the worst group or for the gap (a 12-image group's metric is mostly noise).
  If every group is flagged, all groups with a defined metric compete.
* Each CI is a bootstrap *within the group* at the right unit (patients or lesions when ``cluster_ids`` are
  given), stratified by class, from :mod:`fmcache.report.resampling`; values are seed means, as in the tables.
* Equalised-odds difference (binary single-label only): a sample is predicted positive when the positive-class
  probability exceeds 0.5 (for probabilities that sum to 1 this is the argmax that :func:`fmcache.metrics.evaluate`
  uses); per seed it is the larger of the between-group ranges of TPR and of FPR over every group (unknown and
  flagged ones included, as fairlearn's ``equalized_odds_difference`` does) where the rate is defined, then
  averaged over seeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from fmcache.errors import FmcacheError
from fmcache.report import calibration
from fmcache.report.predictions import LEVEL, RESAMPLES, SEED, Predictions
from fmcache.report.resampling import bootstrap_ci_weights, make_clusters, metric_ci

UNKNOWN = "unknown"
MIN_SIZE = 30
AGE_EDGES = (0.0, 40.0, 60.0, 80.0, np.inf)


def age_bin(ages: Sequence[float] | np.ndarray, edges: Sequence[float] = AGE_EDGES) -> np.ndarray:
    """Age group labels for bins [edges[i], edges[i+1]): with the default edges "<40", "40-59", "60-79", "80+".

    Whole-number edges give inclusive labels ("40-59"), others half-open ones ("40-<59.5"). A missing age (NaN)
    or one outside the edges is :data:`UNKNOWN`.
    """
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2 or np.any(np.diff(e) <= 0):
        raise FmcacheError(f"age edges must increase strictly, got {list(edges)}")
    a = np.asarray(ages, dtype=np.float64)
    names = np.array([_age_name(lo, hi, first=i == 0) for i, (lo, hi) in enumerate(itertools.pairwise(e))])
    index = np.searchsorted(e, a, side="right") - 1
    inside = np.isfinite(a) & (index >= 0) & (index < len(names))
    return np.where(inside, names[np.clip(index, 0, len(names) - 1)], UNKNOWN).astype(object)


def _age_name(lo: float, hi: float, first: bool) -> str:
    def show(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    if np.isinf(hi):
        return f"{show(lo)}+"
    if first and lo <= 0:
        return f"<{show(hi)}"
    last = show(hi - 1) if float(lo).is_integer() and float(hi).is_integer() else f"<{show(hi)}"
    return f"{show(lo)}-{last}"


def group_labels(groups: Sequence[object] | np.ndarray, n_rows: int) -> np.ndarray:
    """One group name (str) per row; None, NaN and "" become :data:`UNKNOWN`."""
    g = np.asarray(groups, dtype=object)
    if g.ndim != 1 or len(g) != n_rows:
        raise FmcacheError(f"group labels have shape {g.shape} for {n_rows} test rows; give one group per row")
    missing = [v is None or (isinstance(v, float) and np.isnan(v)) or v == "" for v in g]
    return np.array([UNKNOWN if m else str(v) for v, m in zip(g, missing, strict=True)], dtype=object)


def _flags(pred: Predictions, min_size: int) -> list[str]:
    flags = [f"n={len(pred.labels)} < {min_size}"] if len(pred.labels) < min_size else []
    if pred.multilabel:
        y = np.asarray(pred.labels, dtype=np.float64)
        if not any(len(np.unique(col[~np.isnan(col)])) == 2 for col in y.T):
            flags.append("one class in every label")
    elif len(np.unique(pred.labels)) < 2:
        flags.append("one class")
    return flags


def _auc_metric(pred: Predictions) -> str | None:
    if pred.multilabel:
        return "mean_auc"
    return "auc" if pred.scores.shape[2] == 2 else None


def _guarded(compute: Callable[[], dict], flags: list[str], what: str) -> dict:
    """A CI, or ``{"error": line}`` and a flag when the statistic is undefined in this group."""
    try:
        return compute()
    except FmcacheError as exc:
        flags.append(f"{what} undefined")
        return {"error": str(exc)}


def _group_entry(
    metric: str, sub: Predictions, ids: np.ndarray | None, unit: str | None, min_size: int, ci: dict
) -> dict:
    clusters = make_clusters(len(sub.labels), ids, unit, labels=sub.labels)
    flags = _flags(sub, min_size)
    entry: dict = {"n": len(sub.labels), "n_clusters": clusters.n_clusters, "unit": clusters.unit}
    entry["metric"] = _guarded(lambda: metric_ci(metric, sub, clusters, **ci), flags, metric)
    auc = _auc_metric(sub)
    if auc == metric:
        entry["auc"] = entry["metric"]
    elif auc is not None:
        entry["auc"] = _guarded(lambda: metric_ci(auc, sub, clusters, **ci), flags, "AUC")
    ece = calibration.weighted_ece(sub.scores, sub.labels, sub.multilabel)
    entry["ece"] = _guarded(lambda: bootstrap_ci_weights(ece, clusters, **ci), flags, "ECE")
    entry["flags"] = flags
    return entry


def equalized_odds(pred: Predictions, groups: np.ndarray) -> dict:
    """Binary single-label: per group TPR and FPR at p(positive) > 0.5 (seed means) and the equalised-odds
    difference (max of the TPR and FPR ranges between groups, per seed, averaged over seeds)."""
    y = np.asarray(pred.labels)
    per_seed, rates = [], {name: {"tpr": [], "fpr": []} for name in np.unique(groups)}
    for scores in pred.scores:
        positive = scores[:, 1] > 0.5
        tpr, fpr = [], []
        for name in rates:
            rows = groups == name
            for rate, cls, keep in (("tpr", 1, tpr), ("fpr", 0, fpr)):
                if np.any(rows & (y == cls)):
                    value = float(np.mean(positive[rows & (y == cls)]))
                    rates[name][rate].append(value)
                    keep.append(value)
        spreads = [max(r) - min(r) for r in (tpr, fpr) if r]
        per_seed.append(max(spreads))
    mean_rates = {n: {k: float(np.mean(v)) if v else None for k, v in r.items()} for n, r in rates.items()}
    return {"difference": float(np.mean(per_seed)), "threshold": 0.5, "per_group": mean_rates}


def subgroup_report(
    metric: str,
    pred: Predictions,
    groups: Sequence[object] | np.ndarray,
    cluster_ids: np.ndarray | None = None,
    unit: str | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
    min_size: int = MIN_SIZE,
) -> dict:
    """Per-group evidence for one result's test predictions.

    ``groups`` has one value per test row (see :func:`group_labels`, :func:`age_bin`); ``cluster_ids`` (patient or
    lesion per row, ``unit`` naming them) set the bootstrap unit. Returns ``{"groups": {name: {n, n_clusters, unit,
    metric, auc?, ece, flags}}, "worst": name, "gap": float, "equalized_odds": {…} (binary tasks)}``; each of
    metric/auc/ece is a CI dict (or ``{"error"}`` where undefined in that group).
    """
    g = group_labels(groups, len(pred.labels))
    ids = None if cluster_ids is None else np.asarray(cluster_ids)
    if ids is not None and len(ids) != len(g):
        raise FmcacheError(f"cluster ids have {len(ids)} entries for {len(g)} test rows; give one id per row")
    ci = {"resamples": resamples, "seed": seed, "level": level}
    report: dict = {"metric": metric, "groups": {}}
    for name in sorted(set(g)):
        rows = np.flatnonzero(g == name)
        sub_ids = None if ids is None else ids[rows]
        report["groups"][name] = _group_entry(metric, pred.take(rows), sub_ids, unit, min_size, ci)
    report.update(_worst_and_gap(report["groups"]))
    if not pred.multilabel and pred.scores.shape[2] == 2:
        report["equalized_odds"] = equalized_odds(pred, g)
    return report


def _worst_and_gap(entries: dict) -> dict:
    defined = {n: e["metric"]["point"] for n, e in entries.items() if "point" in e["metric"]}
    eligible = {n: v for n, v in defined.items() if not entries[n]["flags"]} or defined
    if not eligible:
        return {"worst": None, "best": None, "gap": None}
    worst, best = min(eligible, key=eligible.get), max(eligible, key=eligible.get)
    return {"worst": worst, "best": best, "gap": float(eligible[best] - eligible[worst])}
