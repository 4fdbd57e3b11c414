"""Cluster bootstrap: the right unit, stratified draws, vectorised metrics equal to evaluate, and CI coverage."""

from __future__ import annotations

import numpy as np
import pytest

from fmcache.errors import FmcacheError
from fmcache.report import resampling as rs
from fmcache.report.stats import Predictions, seed_mean


def _single_label(seed: int, n: int = 120, classes: int = 4, seeds: int = 3) -> Predictions:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    logits = rng.normal(size=(seeds, n, classes)) + 1.5 * np.eye(classes)[y]
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return Predictions(np.arange(n), y, np.round(p, 2))  # rounding makes ties


def _multi_label(seed: int, n: int = 150, labels: int = 5, seeds: int = 2) -> Predictions:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.3).astype(float)
    y[rng.random((n, labels)) < 0.25] = np.nan
    y[:, -1] = np.where(rng.random(n) < 0.05, 1.0, np.nan)  # a label that is often single-class in a resample
    p = np.clip(0.3 * np.nan_to_num(y)[None] + rng.random((seeds, n, labels)) * 0.7, 0, 1)
    return Predictions(np.arange(n), y, np.round(p, 2))


def test_clusters_group_rows_and_unknown_ids_are_their_own_clusters():
    ids = np.array(["p1", "p2", None, "p1", "", "p2", "p3", np.nan], dtype=object)
    c = rs.make_clusters(len(ids), ids, unit="patient")
    assert c.unit == "patient" and c.n_clusters == 6  # p1, p2, p3 and three unknown rows
    groups = {tuple(sorted(c.rows[c.offsets[k] : c.offsets[k + 1]])) for k in range(c.n_clusters)}
    assert groups == {(0, 3), (1, 5), (6,), (2,), (4,), (7,)}
    assert rs.make_clusters(5).unit == "image" and rs.make_clusters(5).n_clusters == 5
    assert rs.make_clusters(3, np.array([7.0, np.nan, 7.0]), unit="lesion").n_clusters == 2


def test_bad_cluster_input_is_one_clear_error():
    with pytest.raises(FmcacheError, match="cluster ids have shape"):
        rs.make_clusters(4, np.arange(3))
    with pytest.raises(FmcacheError, match="unknown resampling unit"):
        rs.make_clusters(3, np.arange(3), unit="ward")
    with pytest.raises(FmcacheError, match="unit 'patient' needs one cluster id per row"):
        rs.make_clusters(3, unit="patient")
    with pytest.raises(FmcacheError, match="labels for"):
        rs.make_clusters(3, np.arange(3), labels=np.zeros(4, dtype=int))
    pred = _single_label(0)
    with pytest.raises(FmcacheError, match="the clusters cover 10 rows"):
        rs.metric_ci("accuracy", pred, rs.make_clusters(10), resamples=5)


def test_stratified_draws_keep_each_strata_cluster_count():
    # patient strata = majority label (ties to the lowest): patients 0,1 → class 0; 2 → class 1
    ids = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    y = np.array([0, 0, 1, 0, 1, 1, 1, 0])
    c = rs.make_clusters(len(ids), ids, labels=y)
    assert c.strata.tolist() == [0, 0, 1]
    for index in rs.resample_indices(c, resamples=50, seed=3):
        drawn = np.unique(ids[index], return_counts=True)
        sizes = dict(zip(*drawn, strict=True))
        # patient 2 (its own stratum) is drawn exactly once: its 3 rows
        assert sizes.get(2, 0) == 3
    multi = np.array([[1, np.nan], [0, 0], [np.nan, np.nan], [0, 1]])
    assert rs.make_clusters(4, np.array([0, 0, 1, 2]), labels=multi).strata.tolist() == [1, 0, 1]


def test_weights_and_indices_describe_the_same_resamples():
    ids = np.random.default_rng(0).integers(0, 40, 130)
    c = rs.make_clusters(len(ids), ids, labels=ids % 3)
    indices = list(rs.resample_indices(c, resamples=150, seed=7))
    weights = np.concatenate(list(rs.resample_weights(c, resamples=150, seed=7)))
    assert weights.shape == (150, 130)
    for r, index in enumerate(indices):
        np.testing.assert_array_equal(np.bincount(index, minlength=130), weights[r])
        # whole clusters only: a drawn patient brings every one of its rows
        assert set(np.flatnonzero(np.isin(ids, ids[index]))) == set(index)


@pytest.mark.parametrize(
    ("metric", "make"),
    [("qwk", _single_label), ("macro_recall", _single_label), ("accuracy", _single_label),
     ("auc", lambda s: _single_label(s, classes=2)), ("mean_auc", _multi_label)],
)  # fmt: skip
@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_metric_equals_evaluate_on_each_resample(metric, make, seed):
    pred = make(seed)
    clusters = rs.make_clusters(len(pred.labels), np.arange(len(pred.labels)) // 3, stratify=False)
    fast = rs.weighted_values(rs.weighted_metric(metric, pred), clusters, resamples=70, seed=seed)
    for r, index in enumerate(rs.resample_indices(clusters, resamples=70, seed=seed)):
        try:
            expected = seed_mean(metric, pred, index)
        except FmcacheError:
            expected = np.nan
        np.testing.assert_allclose(fast[r], expected, rtol=0, atol=1e-10, equal_nan=True)
    assert rs.weighted_metric(metric, pred)(np.ones((1, len(pred.labels))))[0] == pytest.approx(
        seed_mean(metric, pred), abs=1e-12
    )


def test_metric_ci_equals_the_generic_per_resample_path():
    pred = _multi_label(4)
    clusters = rs.make_clusters(len(pred.labels), np.arange(len(pred.labels)) // 2, labels=pred.labels)
    fast = rs.metric_ci("mean_auc", pred, clusters, resamples=120, seed=5)
    slow = rs.bootstrap_ci(lambda idx: seed_mean("mean_auc", pred, idx), clusters, resamples=120, seed=5)
    for key in ("point", "low", "high"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-12)
    assert fast["failed"] == slow["failed"]
    assert (fast["unit"], fast["n_clusters"], fast["resamples"]) == ("patient", 75, 120)


def test_undefined_resamples_are_dropped_and_counted():
    # 2 positives among 30 images: many image-level resamples hold no positive, so AUC is undefined there
    y = np.zeros(30, dtype=int)
    y[[3, 17]] = 1
    s = np.linspace(0, 1, 30)
    pred = Predictions(np.arange(30), y, np.stack([1 - s, s], -1)[None])
    clusters = rs.make_clusters(30, stratify=False)
    out = rs.metric_ci("auc", pred, clusters, resamples=200, seed=0)
    single_class = sum(len(np.unique(y[i])) < 2 for i in rs.resample_indices(clusters, 200, 0))
    assert out["failed"] == single_class > 0
    assert out["low"] <= out["point"] <= out["high"]
    with pytest.raises(FmcacheError, match="every bootstrap resample"):
        rs.bootstrap_ci(lambda idx: np.nan, clusters, resamples=10)


def test_paired_test_of_a_run_against_itself_and_a_worse_one():
    pred = _single_label(2, classes=2, n=200)
    same = rs.paired_metric_test("auc", pred, pred, resamples=100)
    assert same["delta"] == 0.0 and same["p_value"] == 1.0 and same["low"] == same["high"] == 0.0
    rng = np.random.default_rng(0)
    noisy = Predictions(pred.ids, pred.labels, np.clip(pred.scores + rng.normal(0, 0.4, pred.scores.shape), 0, 1))
    test = rs.paired_metric_test("auc", pred, noisy, resamples=300)
    assert test["delta"] > 0 and test["low"] > 0 and test["p_value"] < 0.01
    assert test["unit"] == "image"
    generic = rs.paired_bootstrap_weights(
        rs.weighted_metric("auc", pred),
        rs.weighted_metric("auc", noisy),
        rs.make_clusters(200, labels=pred.labels),
        resamples=300,
    )
    assert generic["delta"] == pytest.approx(test["delta"]) and generic["p_value"] == test["p_value"]
    with pytest.raises(FmcacheError, match="align them first"):
        rs.paired_metric_test("auc", pred, pred.take(np.arange(199, -1, -1)))


def _coverage(
    unit_ids: np.ndarray | None, sets: int, rho: float, patients: int, per_patient: int, resamples: int
) -> float:
    """Fraction of simulated test sets whose 95 % percentile CI of the mean image score covers the true mean 0."""
    rng = np.random.default_rng(12345)
    clusters = rs.make_clusters(patients * per_patient, unit_ids)
    covered = 0
    for k in range(sets):
        # image score = shared patient effect (variance ρ) + own noise: intra-patient correlation ρ
        x = np.repeat(rng.normal(size=patients) * np.sqrt(rho), per_patient)
        x += rng.normal(size=patients * per_patient) * np.sqrt(1 - rho)
        ci = rs.bootstrap_ci_weights(lambda w, x=x: (w @ x) / w.sum(axis=1), clusters, resamples, seed=k)
        covered += ci["low"] <= 0.0 <= ci["high"]
    return covered / sets


def test_patient_level_ci_covers_and_image_level_ci_undercovers():
    patients, per_patient, rho = 200, 5, 0.6
    ids = np.repeat(np.arange(patients), per_patient)
    # 400 resamples: with 200 the percentile endpoints are noisy enough to cost ~1 % of coverage
    patient = _coverage(ids, 2000, rho, patients, per_patient, resamples=400)
    image = _coverage(None, 2000, rho, patients, per_patient, resamples=200)
    # design effect 1 + (m − 1)ρ = 3.4: image-level intervals are √3.4 too narrow (nominal coverage ≈ 71 %)
    assert abs(patient - 0.95) <= 0.015, patient
    assert image < 0.80, image
