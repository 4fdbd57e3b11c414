"""The paper's evaluation metrics, in plain numpy.

Metrics are known by name (:data:`METRICS`); which one a dataset reports is the dataset's own business (its
``metric`` in :mod:`fmcache.data.registry`: quadratic-weighted Cohen kappa for APTOS2019, ROC-AUC for CBIS-DDSM,
macro recall for ISIC2019, mean ROC-AUC over the labels for CheXpert). Stage two calls :func:`evaluate` with class
scores and gets that metric plus accuracy in one dict.

Unlike the seed code, an AUC that cannot be computed (one class only) is never scored 0.5: a binary AUC
raises :class:`FmcacheError`, and a multi-label column is skipped and reported in ``skipped``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fmcache.errors import FmcacheError

METRICS = ("qwk", "auc", "macro_recall", "mean_auc", "accuracy")


# Metrics defined on one integer label per sample; "mean_auc" is the only multi-label one.
_SINGLE_LABEL_METRICS = ("qwk", "auc", "macro_recall", "accuracy")


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is a known metric name, else raise an error listing the valid names."""
    if metric not in METRICS:
        raise FmcacheError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    return metric


def metric_for_labels(metric: str, multilabel: bool, owner: str = "this data") -> str:
    """The metric to report when ``owner`` (a dataset, for messages) names ``metric`` and has this label kind.

    ``accuracy`` becomes mean AUC for multi-label data (generic layouts name accuracy but may hold several
    label columns). Any other metric that does not fit the label kind is an error.
    """
    check_metric(metric)
    if multilabel and metric == "accuracy":
        return "mean_auc"
    if multilabel != (metric == "mean_auc"):
        kind = "multi-label" if multilabel else "single-label"
        raise FmcacheError(
            f"{owner} uses metric {metric!r}, which does not fit {kind} labels; check the dataset's label mode"
        )
    return metric


def _as_int_labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise FmcacheError(f"{name} must be a 1-D array of class indices, got shape {y.shape}")
    if y.dtype.kind == "f" and (not np.all(np.isfinite(y)) or np.any(y != np.round(y))):
        raise FmcacheError(f"{name} must hold integer class indices; found non-integer values")
    return y.astype(np.int64)


def _check_same_length(a: np.ndarray, b: np.ndarray) -> None:
    if len(a) != len(b):
        raise FmcacheError(f"labels and predictions differ in length ({len(a)} vs {len(b)})")
    if len(a) == 0:
        raise FmcacheError("cannot compute a metric on an empty split; check the split sizes")


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Confusion matrix (rows = true, columns = predicted) over sorted ``labels``; other values are dropped."""
    n = len(labels)
    t = np.minimum(np.searchsorted(labels, y_true), n - 1)
    p = np.minimum(np.searchsorted(labels, y_pred), n - 1)
    keep = (labels[t] == y_true) & (labels[p] == y_pred)
    return np.bincount(t[keep] * n + p[keep], minlength=n * n).reshape(n, n).astype(np.float64)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of samples whose predicted class equals the true class."""
    y_true, y_pred = _as_int_labels(y_true, "y_true"), _as_int_labels(y_pred, "y_pred")
    _check_same_length(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> float:
    """Quadratic-weighted Cohen kappa (APTOS2019's metric).

    The disagreement weight of classes i and j is (i - j)². With ``num_classes`` the classes are
    0..num_classes-1, so the weight is the distance between grades even when a grade never occurs
    (sklearn's ``labels=range(C)``); without it, the sorted union of observed labels is used, as sklearn
    does by default. Raises if kappa is undefined (true and predicted labels are all one class).
    """
    y_true, y_pred = _as_int_labels(y_true, "y_true"), _as_int_labels(y_pred, "y_pred")
    _check_same_length(y_true, y_pred)
    labels = np.arange(num_classes) if num_classes else np.union1d(y_true, y_pred)
    observed = _confusion(y_true, y_pred, labels)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    idx = np.arange(len(labels), dtype=np.float64)
    weights = (idx[:, None] - idx[None, :]) ** 2
    denominator = float(np.sum(weights * expected))
    if denominator == 0.0:
        raise FmcacheError(
            "quadratic kappa is undefined when true and predicted labels are all the same class;"
            " the evaluated split needs more than one class"
        )
    return float(1.0 - np.sum(weights * observed) / denominator)


def macro_recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (= balanced accuracy; ISIC2019's metric).

    A class that is only predicted, never true, has no recall and is not averaged in; this equals
    ``recall_score(average='macro', labels=np.unique(y_true))`` and ``balanced_accuracy_score``.
    """
    y_true, y_pred = _as_int_labels(y_true, "y_true"), _as_int_labels(y_pred, "y_pred")
    _check_same_length(y_true, y_pred)
    cm = _confusion(y_true, y_pred, np.union1d(y_true, y_pred))
    support = cm.sum(1)
    in_truth = support > 0
    return float(np.mean(np.diag(cm)[in_truth] / support[in_truth]))


def macro_recall_seed(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The seed's macro recall: sklearn ``recall_score(average='macro')`` over the classes in truth or prediction.

    A class that is predicted but never true counts with recall 0, so this is at most :func:`macro_recall`.
    """
    y_true, y_pred = _as_int_labels(y_true, "y_true"), _as_int_labels(y_pred, "y_pred")
    _check_same_length(y_true, y_pred)
    cm = _confusion(y_true, y_pred, np.union1d(y_true, y_pred))
    support = cm.sum(1)
    recall = np.divide(np.diag(cm), support, out=np.zeros(len(support)), where=support > 0)
    return float(np.mean(recall))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc_binary(y_true: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of ``score`` for binary labels {0, 1}, by the Mann–Whitney U statistic (ties count half).

    Raises :class:`FmcacheError` if only one class is present: AUC is undefined then.
    """
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise FmcacheError(f"AUC needs 1-D labels and scores, got shapes {y.shape} and {s.shape}")
    _check_same_length(y, s)
    if not np.all(np.isin(y, (0, 1))):
        raise FmcacheError("AUC needs binary labels 0/1; found other values")
    if not np.all(np.isfinite(s)):
        raise FmcacheError("AUC scores contain NaN or inf; check the model outputs")
    positive = y == 1
    n_pos = int(positive.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "positive" if n_neg == 0 else "negative"
        raise FmcacheError(
            f"ROC-AUC is undefined: all {len(y)} labels are {only} (a single class);"
            " the evaluated split needs both classes"
        )
    rank_sum = _average_ranks(s)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mean_auc(
    y_true: np.ndarray, scores: np.ndarray, names: Sequence[str] | None = None
) -> tuple[float, dict[str, float], list[str]]:
    """Mean ROC-AUC over label columns (CheXpert's metric).

    ``y_true`` is (N, C) with 0/1 and NaN for an unknown label; each column uses only its known entries.
    A column with a single class among its known entries (or none known) is skipped and named in the
    returned ``skipped`` list, never scored 0.5. Returns ``(mean over scored columns, {name: auc},
    skipped names)``; raises if every column is skipped. ``names`` default to ``label_<i>``.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or y.shape != s.shape:
        raise FmcacheError(f"mean AUC needs (N, C) labels and scores of one shape, got {y.shape} and {s.shape}")
    names = list(names) if names is not None else [f"label_{i}" for i in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise FmcacheError(f"got {len(names)} label names for {y.shape[1]} label columns")
    per_column: dict[str, float] = {}
    skipped: list[str] = []
    for c, name in enumerate(names):
        known = ~np.isnan(y[:, c])
        if len(np.unique(y[known, c])) < 2:
            skipped.append(name)
            continue
        per_column[name] = roc_auc_binary(y[known, c], s[known, c])
    if not per_column:
        raise FmcacheError(
            f"mean AUC is undefined: every label column ({', '.join(skipped)}) has a single class"
            " in the evaluated split; use a larger split"
        )
    return float(np.mean(list(per_column.values()))), per_column, skipped


def multilabel_accuracy(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> float:
    """Mean over label columns of the accuracy of ``scores >= threshold`` on that column's known entries.

    Columns without known entries are left out of the mean.
    """
    y = np.asarray(y_true, dtype=np.float64)
    predicted = np.asarray(scores, dtype=np.float64) >= threshold
    known = ~np.isnan(y)
    correct = (predicted == (y == 1)) & known
    counts = known.sum(0)
    has_known = counts > 0
    if not np.any(has_known):
        raise FmcacheError("multi-label accuracy is undefined: no known labels in the evaluated split")
    return float(np.mean(correct.sum(0)[has_known] / counts[has_known]))


def evaluate(
    metric: str,
    y_true: np.ndarray,
    scores: np.ndarray,
    multilabel: bool,
    label_names: Sequence[str] | None = None,
) -> dict:
    """Compute the paper metric and accuracy from class scores.

    ``scores`` is (N, C) probabilities: softmax outputs or k-NN vote shares for single-label data (the
    prediction is the argmax, ties to the lowest class; binary "auc" ranks by column 1), per-label
    probabilities for multi-label data (accuracy thresholds them at 0.5). ``y_true`` is (N,) class
    indices, or (N, C) 0/1 with NaN = unknown when ``multilabel``.

    Returns ``{"metric": name, "value": float, name: float, "accuracy": float}``; with ``mean_auc`` also
    ``"per_label": {name: auc}`` and ``"skipped": [names]``. For multi-label data "auc" means
    "mean_auc", and "accuracy" is the mean per-label accuracy at threshold 0.5 over known entries.
    """
    check_metric(metric)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise FmcacheError(f"scores must be (N, C), got shape {s.shape}")
    if multilabel:
        return _evaluate_multilabel(metric, y_true, s, label_names)
    return _evaluate_single_label(metric, y_true, s)


def _evaluate_multilabel(
    metric: str, y_true: np.ndarray, scores: np.ndarray, label_names: Sequence[str] | None
) -> dict:
    if metric not in ("mean_auc", "auc"):
        raise FmcacheError(f"metric {metric!r} needs single-label data; use mean_auc for multi-label data")
    value, per_label, skipped = mean_auc(y_true, scores, label_names)
    return {
        "metric": "mean_auc",
        "value": value,
        "mean_auc": value,
        "accuracy": multilabel_accuracy(y_true, scores),
        "per_label": per_label,
        "skipped": skipped,
    }


def _evaluate_single_label(metric: str, y_true: np.ndarray, scores: np.ndarray) -> dict:
    y = _as_int_labels(y_true, "y_true")
    _check_same_length(y, scores)
    num_classes = scores.shape[1]
    if y.min() < 0 or y.max() >= num_classes:
        raise FmcacheError(f"labels must lie in 0..{num_classes - 1} for {num_classes} score columns")
    y_pred = np.argmax(scores, axis=1)
    extra: dict[str, float] = {}
    if metric == "qwk":
        value = quadratic_kappa(y, y_pred, num_classes)
    elif metric == "auc":
        if num_classes != 2:
            raise FmcacheError(f"metric 'auc' needs 2 classes, got {num_classes}; use accuracy or macro_recall")
        value = roc_auc_binary(y, scores[:, 1])
    elif metric == "macro_recall":
        value = macro_recall(y, y_pred)
        # The seed's sklearn recall_score(average="macro") also averages in classes that are only predicted
        # (recall 0); report it beside ours so the paper's number can be compared when the two differ.
        extra["macro_recall_seed"] = macro_recall_seed(y, y_pred)
    elif metric == "accuracy":
        value = accuracy(y, y_pred)
    elif metric == "mean_auc":
        raise FmcacheError("metric 'mean_auc' needs multi-label data; use auc, qwk, macro_recall or accuracy")
    else:
        raise FmcacheError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    return {"metric": metric, "value": value, metric: value, "accuracy": accuracy(y, y_pred), **extra}
