"""DeLong's AUC variance and paired test equal an independent O(m·n) reference written from the 1988 formulas."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fmcache import metrics
from fmcache.errors import FmcacheError
from fmcache.report import delong
from fmcache.report import resampling as rs


def _reference(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong, DeLong & Clarke-Pearson (1988): AUCs and covariance of k score vectors, by direct comparison.

    ψ(x, y) = 1 if x > y, ½ if x = y, 0 otherwise; V10(X_i) = mean_j ψ(X_i, Y_j), V01(Y_j) = mean_i ψ(X_i, Y_j);
    S10, S01 = sample covariance matrices (denominators m − 1, n − 1); S = S10/m + S01/n.
    """
    x, y = scores[:, labels == 1], scores[:, labels == 0]
    m, n = x.shape[1], y.shape[1]
    psi = (x[:, :, None] > y[:, None, :]) + 0.5 * (x[:, :, None] == y[:, None, :])  # (k, m, n)
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    auc = psi.mean(axis=(1, 2))
    s10 = (v10 - auc[:, None]) @ (v10 - auc[:, None]).T / (m - 1)
    s01 = (v01 - auc[:, None]) @ (v01 - auc[:, None]).T / (n - 1)
    return auc, s10 / m + s01 / n


def _data(seed: int, n: int = 90, k: int = 3):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    scores = np.round(y[None] * rng.uniform(0.2, 1.0, (k, 1)) + rng.normal(size=(k, n)), 1)  # rounding: many ties
    return y, scores


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_covariance_equals_the_1988_reference(seed):
    y, scores = _data(seed)
    auc, cov = delong.delong_cov(y, scores)
    ref_auc, ref_cov = _reference(y, scores)
    np.testing.assert_allclose(auc, ref_auc, rtol=0, atol=1e-10)
    np.testing.assert_allclose(cov, ref_cov, rtol=0, atol=1e-10)
    assert auc[0] == pytest.approx(metrics.roc_auc_binary(y, scores[0]), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 5])
def test_paired_test_equals_reference_and_is_symmetric(seed):
    y, scores = _data(seed, k=2)
    ab = delong.delong_test(y, scores[0], scores[1])
    ba = delong.delong_test(y, scores[1], scores[0])
    auc, cov = _reference(y, scores)
    z = (auc[0] - auc[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert ab["z"] == pytest.approx(z, abs=1e-10)
    assert ab["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), abs=1e-10)
    assert ba["z"] == pytest.approx(-ab["z"], abs=1e-12) and ba["p_value"] == pytest.approx(ab["p_value"], abs=1e-12)
    se = delong.auc_se(y, scores[0])
    assert se["se"] == pytest.approx(np.sqrt(cov[0, 0]), abs=1e-10) and se["low"] < se["auc"] < se["high"]


def test_identical_inputs_give_z_zero_and_p_one():
    y, scores = _data(9, k=1)
    out = delong.delong_test(y, scores[0], scores[0].copy())
    assert out["z"] == 0.0 and out["p_value"] == 1.0 and out["delta"] == 0.0 and out["se"] == 0.0


def test_seeds_give_the_variance_of_the_seed_mean_auc():
    # the mean over seeds of each seed's AUC is a U-statistic whose kernel is the seeds' mean kernel
    y, seeds_a = _data(3, k=4)
    _, seeds_b = _data(4, k=3)
    out = delong.delong_test(y, seeds_a, seeds_b)
    assert out["auc_a"] == pytest.approx(np.mean([metrics.roc_auc_binary(y, s) for s in seeds_a]), abs=1e-12)
    x, yy = seeds_a[:, y == 1], seeds_a[:, y == 0]
    psi_a = ((x[:, :, None] > yy[:, None, :]) + 0.5 * (x[:, :, None] == yy[:, None, :])).mean(axis=0)
    x, yy = seeds_b[:, y == 1], seeds_b[:, y == 0]
    psi_b = ((x[:, :, None] > yy[:, None, :]) + 0.5 * (x[:, :, None] == yy[:, None, :])).mean(axis=0)
    d = psi_a - psi_b  # the difference kernel, averaged over seeds
    m, n = d.shape
    v10, v01 = d.mean(axis=1), d.mean(axis=0)
    var = v10.var(ddof=1) / m + v01.var(ddof=1) / n
    assert out["se"] == pytest.approx(np.sqrt(var), abs=1e-10)


def _multilabel(seed: int, n: int = 80, labels: int = 4):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.35).astype(float)
    y[rng.random((n, labels)) < 0.3] = np.nan
    a = np.round(np.nan_to_num(y) * 0.8 + rng.normal(size=(n, labels)), 1)
    b = np.round(np.nan_to_num(y) * 0.3 + rng.normal(size=(n, labels)), 1)
    return y, a, b


def test_multilabel_masks_unknowns_per_label():
    y, a, b = _multilabel(0)
    out = delong.multilabel_delong(y, a, b, names=["w", "x", "y", "z"])
    for c, name in enumerate("wxyz"):
        known = ~np.isnan(y[:, c])
        single = delong.delong_test(y[known, c].astype(int), a[known, c], b[known, c])
        for key in ("auc_a", "auc_b", "z", "p_value", "se"):
            assert out["per_label"][name][key] == pytest.approx(single[key], abs=1e-12)
    assert out["mean"]["delta"] == pytest.approx(np.mean([out["per_label"][k]["delta"] for k in "wxyz"]), abs=1e-12)
    mean_auc = metrics.mean_auc(y, a)[0]
    assert delong.multilabel_delong(y, a)["mean"]["auc"] == pytest.approx(mean_auc, abs=1e-12)


def test_mean_auc_variance_counts_images_shared_by_labels():
    # two copies of one label: the mean AUC is that label's AUC, so its SE must be the label's SE, not SE/√2
    y, a, _ = _multilabel(1, labels=1)
    twice = delong.multilabel_delong(np.repeat(y, 2, axis=1), np.repeat(a, 2, axis=1))
    assert twice["mean"]["se"] == pytest.approx(twice["per_label"]["label_0"]["se"], abs=1e-12)
    # independent labels on disjoint images: the variance of the mean is the mean variance over 2
    rng = np.random.default_rng(2)
    y2 = np.full((120, 2), np.nan)
    y2[:60, 0] = rng.random(60) < 0.5
    y2[60:, 1] = rng.random(60) < 0.5
    s2 = np.nan_to_num(y2) + rng.normal(size=(120, 2))
    out = delong.multilabel_delong(y2, s2)
    per = [out["per_label"][k]["se"] ** 2 for k in ("label_0", "label_1")]
    assert out["mean"]["se"] ** 2 == pytest.approx(sum(per) / 4, abs=1e-12)


def test_label_without_two_of_each_class_is_skipped_by_name():
    y, a, b = _multilabel(3)
    y[:, 2] = np.nan
    y[:5, 2] = [1, 0, 0, 0, 0]
    out = delong.multilabel_delong(y, a, b)
    assert "label_2" in out["skipped"] and "2 positives" in out["skipped"]["label_2"]
    assert out["mean"]["n_labels"] == 3


def test_cluster_robust_form():
    y, scores = _data(6, n=120, k=2)
    plain = delong.delong_test(y, scores[0], scores[1])
    singletons = delong.delong_test(y, scores[0], scores[1], cluster_ids=np.arange(120))
    assert singletons["se"] == pytest.approx(plain["se"], abs=1e-14) and singletons["unit"] == "patient"
    # patients with 4 strongly correlated images: the cluster-robust SE agrees with the patient-level bootstrap SE
    rng = np.random.default_rng(0)
    patients, per = 300, 4
    ids = np.repeat(np.arange(patients), per)
    y = np.repeat(rng.random(patients) < 0.4, per).astype(int)
    s = y + np.repeat(rng.normal(size=patients), per) + 0.5 * rng.normal(size=patients * per)
    se = delong.auc_se(y, s, cluster_ids=ids)["se"]
    boot = rs.weighted_values(rs.weighted_auc(y, s), rs.make_clusters(len(y), ids, labels=y), 600, seed=1)
    assert se == pytest.approx(np.std(boot, ddof=1), rel=0.15)
    assert se > 1.3 * delong.auc_se(y, s)["se"]  # the image-level SE is too small


def test_bad_input_is_one_clear_error():
    with pytest.raises(FmcacheError, match="labels 0/1"):
        delong.delong_test(np.array([0, 1, 2, 1]), np.arange(4.0), np.arange(4.0))
    with pytest.raises(FmcacheError, match="scores must be"):
        delong.delong_test(np.array([0, 1, 0, 1]), np.arange(5.0), np.arange(4.0))
    with pytest.raises(FmcacheError, match="at least 2 positives"):
        delong.auc_se(np.array([0, 0, 0, 1]), np.arange(4.0))
    with pytest.raises(FmcacheError, match="cluster ids have shape"):
        delong.auc_se(np.array([0, 1, 0, 1]), np.arange(4.0), cluster_ids=np.arange(3))
