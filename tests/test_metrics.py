"""Metrics equal scikit-learn's; undefined AUCs are skipped or refused, never scored 0.5."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    recall_score,
    roc_auc_score,
)

from fmcache import metrics
from fmcache.errors import FmcacheError

SEEDS = [0, 1, 2, 3, 4]


def _labels(seed: int, n: int = 200, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, c, n)
    # Predictions correlated with the truth so the metrics are not all near chance.
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, c, n))
    return y_true, y_pred


@pytest.mark.parametrize("seed", SEEDS)
def test_quadratic_kappa_equals_sklearn(seed):
    y_true, y_pred = _labels(seed)
    expected = cohen_kappa_score(y_true, y_pred, weights="quadratic")
    assert metrics.quadratic_kappa(y_true, y_pred) == pytest.approx(expected, abs=1e-12)


def test_quadratic_kappa_with_missing_grade_uses_grade_distance():
    # Grade 2 never occurs: with num_classes the weights stay (i - j)² over grades, as sklearn's labels=.
    y_true = np.array([0, 1, 3, 4, 4, 1, 0, 3])
    y_pred = np.array([0, 3, 3, 4, 1, 1, 0, 4])
    expected = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=np.arange(5))
    assert metrics.quadratic_kappa(y_true, y_pred, num_classes=5) == pytest.approx(expected, abs=1e-12)
    default = cohen_kappa_score(y_true, y_pred, weights="quadratic")
    assert metrics.quadratic_kappa(y_true, y_pred) == pytest.approx(default, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_recall_equals_sklearn(seed):
    y_true, y_pred = _labels(seed, c=8)
    assert metrics.macro_recall(y_true, y_pred) == pytest.approx(recall_score(y_true, y_pred, average="macro"))
    assert metrics.macro_recall(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_macro_recall_averages_classes_present_in_truth():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])  # class 2 is predicted but never true
    expected = recall_score(y_true, y_pred, average="macro", labels=np.unique(y_true))
    assert metrics.macro_recall(y_true, y_pred) == pytest.approx(expected) == pytest.approx(0.75)


def test_seed_macro_recall_counts_predicted_only_classes():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])
    seed_value = recall_score(y_true, y_pred, average="macro", zero_division=0)  # the seed's call: labels in either
    assert metrics.macro_recall_seed(y_true, y_pred) == pytest.approx(seed_value) == pytest.approx(0.5)
    out = metrics.evaluate("macro_recall", y_true, np.eye(3)[y_pred], multilabel=False)
    assert out["value"] == pytest.approx(0.75) and out["macro_recall_seed"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_equals_sklearn(seed):
    y_true, y_pred = _labels(seed)
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred))


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_auc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    score = np.round(rng.random(300) + 0.3 * y, 1)  # rounding creates many ties
    assert metrics.roc_auc_binary(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_binary_auc_single_class_is_an_error():
    with pytest.raises(FmcacheError, match="single class"):
        metrics.roc_auc_binary(np.ones(10, dtype=int), np.linspace(0, 1, 10))


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_auc_equals_sklearn_per_column_with_nans(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (400, 6)).astype(float)
    scores = rng.random((400, 6)) + 0.5 * y
    y[rng.random(y.shape) < 0.2] = np.nan
    mean, per_column, skipped = metrics.mean_auc(y, scores, [f"l{i}" for i in range(6)])
    expected = []
    for c in range(6):
        known = ~np.isnan(y[:, c])
        expected.append(roc_auc_score(y[known, c], scores[known, c]))
    assert skipped == []
    assert list(per_column.values()) == pytest.approx(expected, abs=1e-12)
    assert mean == pytest.approx(np.mean(expected), abs=1e-12)


def test_mean_auc_skips_and_reports_single_class_columns():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 3)).astype(float)
    y[:, 1] = 0.0  # one class only
    y[:, 2] = np.nan
    y[:5, 2] = 1.0  # known entries are all positive
    scores = rng.random((50, 3))
    mean, per_column, skipped = metrics.mean_auc(y, scores, ["a", "b", "c"])
    assert skipped == ["b", "c"]
    assert list(per_column) == ["a"]
    assert mean == pytest.approx(roc_auc_score(y[:, 0], scores[:, 0]))


def test_mean_auc_all_columns_skipped_is_an_error():
    with pytest.raises(FmcacheError, match="every label column"):
        metrics.mean_auc(np.zeros((10, 2)), np.random.default_rng(0).random((10, 2)), ["a", "b"])


def test_evaluate_single_label_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    scores = rng.random((300, 5))
    scores[np.arange(300), y] += 0.3 * rng.random(300)
    pred = scores.argmax(1)
    out = metrics.evaluate("qwk", y, scores, multilabel=False)
    assert out["metric"] == "qwk"
    assert out["value"] == out["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert out["accuracy"] == pytest.approx(accuracy_score(y, pred))
    out = metrics.evaluate("macro_recall", y, scores, multilabel=False)
    assert out["value"] == pytest.approx(recall_score(y, pred, average="macro"))


def test_evaluate_binary_auc_uses_class_one_probability():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(rng.random(200) * 0.7 + 0.3 * y, 0, 1)
    out = metrics.evaluate("auc", y, np.stack([1 - p1, p1], axis=1), multilabel=False)
    assert out["value"] == pytest.approx(roc_auc_score(y, p1))
    with pytest.raises(FmcacheError, match="needs 2 classes"):
        metrics.evaluate("auc", np.arange(3), np.eye(3), multilabel=False)


def test_evaluate_multilabel_accuracy_and_skips():
    y = np.array([[1, 0, np.nan], [0, 0, 1], [1, 0, np.nan], [0, 0, 0]], dtype=float)
    scores = np.array([[0.9, 0.2, 0.1], [0.6, 0.7, 0.8], [0.4, 0.1, 0.5], [0.1, 0.1, 0.9]])
    out = metrics.evaluate("mean_auc", y, scores, multilabel=True, label_names=["a", "b", "c"])
    assert out["skipped"] == ["b"]
    assert set(out["per_label"]) == {"a", "c"}
    # per-label accuracy at 0.5 over known entries: a 2/4, b 3/4, c 1/2 (two known)
    assert out["accuracy"] == pytest.approx(np.mean([0.5, 0.75, 0.5]))


def test_unknown_metric_lists_valid_names():
    with pytest.raises(FmcacheError, match="qwk, auc, macro_recall, mean_auc, accuracy"):
        metrics.evaluate("f1", np.zeros(3, dtype=int), np.ones((3, 2)) / 2, multilabel=False)


@pytest.mark.parametrize(
    ("dataset", "multilabel", "expected"),
    [
        ("aptos2019", False, "qwk"),
        ("cbis_ddsm", False, "auc"),
        ("isic2019", False, "macro_recall"),
        ("chexpert", True, "mean_auc"),
        ("csv", False, "accuracy"),
        ("imagefolder", False, "accuracy"),
        ("csv", True, "mean_auc"),
    ],
)
def test_metric_for_dataset(dataset, multilabel, expected):
    # each dataset names its own metric; metrics.py only adapts the name to the label kind
    from fmcache.data.registry import metric_for

    assert metric_for(dataset, multilabel) == expected


def test_metric_for_rejects_unknown_dataset_and_mismatched_label_kind():
    from fmcache.data.registry import metric_for

    with pytest.raises(FmcacheError, match="unknown dataset 'mnist'"):
        metric_for("mnist", False)
    with pytest.raises(FmcacheError, match="does not fit"):
        metric_for("aptos2019", True)
    with pytest.raises(FmcacheError, match="unknown metric"):
        metrics.metric_for_labels("kappa", False)
