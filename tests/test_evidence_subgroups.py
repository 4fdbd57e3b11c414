"""Subgroup evidence: a planted shift is found, per-group values equal fairlearn's, small groups are flagged."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, roc_auc_score

from fmcache.errors import FmcacheError
from fmcache.report import calibration, subgroups
from fmcache.report.stats import Predictions


def _binary(seed: int, n: int = 600, seeds: int = 2) -> tuple[Predictions, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    group = rng.choice(np.array(["F", "M", "X"], dtype=object), n, p=[0.45, 0.45, 0.1])
    logit = 1.5 * (2 * y - 1)[None] + rng.normal(size=(seeds, n))
    logit[:, group == "X"] = rng.normal(size=(seeds, int(np.sum(group == "X"))))  # planted: X's scores are noise
    p1 = 1 / (1 + np.exp(-logit))
    patients = np.arange(n) // 3
    return Predictions(np.arange(n), y, np.stack([1 - p1, p1], -1)), group, patients


def test_planted_shift_is_the_worst_group():
    pred, group, patients = _binary(0)
    out = subgroups.subgroup_report("auc", pred, group, cluster_ids=patients, unit="patient", resamples=200)
    assert out["worst"] == "X" and out["best"] in ("F", "M")
    x = out["groups"]["X"]
    assert x["metric"]["low"] < 0.5 < x["metric"]["high"] and x["flags"] == []  # noise: chance-level AUC
    assert x["metric"]["unit"] == "patient" and x["n_clusters"] <= x["n"]
    assert out["gap"] == pytest.approx(out["groups"][out["best"]]["metric"]["point"] - x["metric"]["point"])
    assert out["equalized_odds"]["threshold"] == 0.5 and out["equalized_odds"]["difference"] > 0.2


def test_group_values_equal_fairlearn_metricframe():
    fairlearn = pytest.importorskip("fairlearn.metrics")
    pred, group, _ = _binary(1, seeds=1)
    y, p1 = pred.labels, pred.scores[0, :, 1]
    y_hat = (p1 > 0.5).astype(int)
    for metric, fn, uses_scores in (("auc", roc_auc_score, True), ("accuracy", accuracy_score, False),
                                    ("macro_recall", balanced_accuracy_score, False)):  # fmt: skip
        ours = subgroups.subgroup_report(metric, pred, group, resamples=20)["groups"]
        frame = fairlearn.MetricFrame(
            metrics=fn, y_true=y, y_pred=p1 if uses_scores else y_hat, sensitive_features=group
        )
        for name, value in frame.by_group.items():
            assert ours[name]["metric"]["point"] == pytest.approx(value, abs=1e-12)
    eod = fairlearn.equalized_odds_difference(y, y_hat, sensitive_features=group)
    assert subgroups.subgroup_report("auc", pred, group, resamples=20)["equalized_odds"]["difference"] == (
        pytest.approx(eod, abs=1e-12)
    )


def test_multiclass_qwk_and_ece_per_group_equal_references():
    fairlearn = pytest.importorskip("fairlearn.metrics")
    rng = np.random.default_rng(3)
    n, classes = 500, 5
    y = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 2 * np.eye(classes)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    group = rng.choice(["a", "b"], n)
    out = subgroups.subgroup_report("qwk", Predictions(np.arange(n), y, p[None]), group, resamples=20)
    frame = fairlearn.MetricFrame(
        metrics=lambda t, q: cohen_kappa_score(t, q, weights="quadratic", labels=range(classes)),
        y_true=y, y_pred=p.argmax(1), sensitive_features=group,
    )  # fmt: skip
    for name, value in frame.by_group.items():
        assert out["groups"][name]["metric"]["point"] == pytest.approx(value, abs=1e-12)
        rows = group == name
        assert out["groups"][name]["ece"]["point"] == pytest.approx(calibration.ece(p[rows], y[rows]), abs=1e-12)
        assert "auc" not in out["groups"][name]  # a 5-class task has no single AUC
    assert "equalized_odds" not in out


def test_small_single_class_and_unknown_groups_are_flagged_not_dropped():
    pred, _, _ = _binary(2, n=200)
    group = np.array(["A"] * 150 + ["B"] * 20 + [None] * 20 + [np.nan] * 10, dtype=object)
    y = pred.labels.copy()
    y[150:170] = 1  # B holds one class only
    pred = Predictions(pred.ids, y, pred.scores)
    out = subgroups.subgroup_report("auc", pred, group, resamples=30)
    assert set(out["groups"]) == {"A", "B", "unknown"} and out["groups"]["unknown"]["n"] == 30
    b = out["groups"]["B"]
    assert "n=20 < 30" in b["flags"] and "one class" in b["flags"] and "error" in b["metric"]
    assert out["worst"] in ("A", "unknown") and sum(e["n"] for e in out["groups"].values()) == 200


def test_multilabel_groups_report_mean_auc_and_ece():
    rng = np.random.default_rng(4)
    n = 300
    y = (rng.random((n, 3)) < 0.3).astype(float)
    y[rng.random((n, 3)) < 0.2] = np.nan
    p = np.clip(np.nan_to_num(y) * 0.4 + rng.random((2, n, 3)) * 0.6, 0, 1)
    ages = rng.uniform(20, 95, n)
    ages[:5] = np.nan
    out = subgroups.subgroup_report("mean_auc", Predictions(np.arange(n), y, p), subgroups.age_bin(ages), resamples=30)
    assert set(out["groups"]) == {"<40", "40-59", "60-79", "80+", "unknown"}
    young = subgroups.age_bin(ages) == "<40"
    expected = calibration.summary(p[:, young], y[young], multilabel=True)["ece"]
    assert out["groups"]["<40"]["ece"]["point"] == pytest.approx(expected, abs=1e-12)
    assert "equalized_odds" not in out


def test_age_bins_and_bad_group_input():
    bins = subgroups.age_bin([0, 39.5, 40, 59, 60, 79, 80, 104, np.nan, -2])
    assert bins.tolist() == ["<40", "<40", "40-59", "40-59", "60-79", "60-79", "80+", "80+", "unknown", "unknown"]
    assert subgroups.age_bin([30, 70], edges=(18, 65, np.inf)).tolist() == ["18-64", "65+"]
    with pytest.raises(FmcacheError, match="increase strictly"):
        subgroups.age_bin([30], edges=(0, 60, 40))
    pred, group, _ = _binary(5, n=90)
    with pytest.raises(FmcacheError, match="group labels have shape"):
        subgroups.subgroup_report("auc", pred, group[:-1])
    with pytest.raises(FmcacheError, match="cluster ids have 10 entries"):
        subgroups.subgroup_report("auc", pred, group, cluster_ids=np.arange(10))
