"""Calibration equals torchmetrics (ECE, MCE) and sklearn (NLL); temperature scaling keeps argmax and lowers val NLL."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss

from fmcache.errors import FmcacheError
from fmcache.report import calibration as cal
from fmcache.report import resampling as rs


def _probs(seed: int, n: int = 500, classes: int = 5, sharpness: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels; sharpness > 1 makes the model over-confident, < 1 under-confident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 1.5
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(classes, p=p) for p in true_p])  # labels drawn from true_p: true_p is calibrated
    shown = np.exp(sharpness * logits)
    # float32-representable values: torchmetrics computes in float32
    return (shown / shown.sum(1, keepdims=True)).astype(np.float32).astype(np.float64), y


@pytest.mark.parametrize(("seed", "classes"), [(0, 2), (1, 3), (2, 5), (3, 10)])
def test_ece_and_mce_equal_torchmetrics(seed, classes):
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.classification")
    p, y = _probs(seed, classes=classes, sharpness=2.0)
    # probabilities on a 1/1024 grid: torchmetrics sums them exactly in float32, so only its divisions round
    p = np.round(p * 1024) / 1024
    top = np.sort(p, axis=1)
    p, y = p[top[:, -1] > top[:, -2]], y[top[:, -1] > top[:, -2]]  # no tied argmax: tie-breaking is not the point
    preds, target = torch.from_numpy(p).float(), torch.from_numpy(y)
    for norm, ours in (("l1", cal.ece(p, y)), ("max", cal.mce(p, y))):
        ref = tm.MulticlassCalibrationError(num_classes=classes, n_bins=15, norm=norm)(preds, target)
        assert ours == pytest.approx(float(ref), abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_ece_equals_torchmetrics_and_masks_unknown_labels(seed):
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.classification")
    rng = np.random.default_rng(seed)
    p = np.round(rng.random(400) * 1024) / 1024  # exact float32 sums, as above
    y = (rng.random(400) < p**2).astype(float)
    for norm in ("l1", "max"):
        ref = tm.BinaryCalibrationError(n_bins=15, norm=norm)(torch.from_numpy(p).float(), torch.from_numpy(y).long())
        assert cal.binary_ece(p, y, norm=norm) == pytest.approx(float(ref), abs=1e-7)
    with_unknown = np.r_[y, np.nan, np.nan]
    assert cal.binary_ece(np.r_[p, 0.99, 0.01], with_unknown) == cal.binary_ece(p, y)


def test_brier_nll_and_reliability_data():
    p, y = _probs(4)
    p = p / p.sum(axis=1, keepdims=True)  # exact row sums in float64, as sklearn's log_loss expects
    one_hot = np.eye(p.shape[1])[y]
    assert cal.brier(p, y) == pytest.approx(np.mean(np.sum((p - one_hot) ** 2, 1)), abs=1e-12)
    assert cal.nll(p, y) == pytest.approx(log_loss(y, p, labels=range(p.shape[1])), abs=1e-6)
    bins = cal.reliability(p, y)
    assert bins["count"].sum() == len(y) and len(bins["count"]) == 15
    filled = bins["count"] > 0
    ece = np.sum(bins["count"][filled] * np.abs(bins["accuracy"] - bins["confidence"])[filled]) / len(y)
    assert ece == pytest.approx(cal.ece(p, y), abs=1e-12)
    # confidence 1.0 falls in the last bin, 0.2 (on an edge) in the bin that starts there
    edge = cal.reliability(np.array([[0.0, 1.0], [0.2, 0.8], [0.5, 0.5]]), np.array([1, 0, 0]), n_bins=5)
    assert edge["count"].tolist() == [0, 0, 1, 0, 2]


def test_multilabel_summary_is_the_mean_of_binary_labels():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 3)) < 0.3).astype(float)
    y[rng.random((300, 3)) < 0.2] = np.nan
    p = np.clip(np.nan_to_num(y) * 0.5 + rng.random((300, 3)) * 0.5, 0, 1)
    out = cal.summary(p, y, multilabel=True)
    assert out["ece"] == pytest.approx(np.mean([cal.binary_ece(p[:, c], y[:, c]) for c in range(3)]), abs=1e-12)
    assert out["brier"] == pytest.approx(np.mean([cal.binary_brier(p[:, c], y[:, c]) for c in range(3)]), abs=1e-12)
    two_seeds = cal.summary(np.stack([p, p**2]), y, multilabel=True)
    assert two_seeds["nll"] == pytest.approx((out["nll"] + cal.summary(p**2, y, True)["nll"]) / 2, abs=1e-12)


@pytest.mark.parametrize("multilabel", [False, True])
def test_weighted_ece_equals_ece_on_each_resample(multilabel):
    rng = np.random.default_rng(1)
    if multilabel:
        y = (rng.random((120, 3)) < 0.4).astype(float)
        y[rng.random((120, 3)) < 0.3] = np.nan
        p = rng.random((2, 120, 3))
    else:
        p, y = _probs(5, n=120)
        p = np.stack([p, _probs(6, n=120)[0]])
    clusters = rs.make_clusters(120, np.arange(120) // 4)
    fast = rs.weighted_values(cal.weighted_ece(p, y, multilabel), clusters, resamples=40, seed=0)
    for r, index in enumerate(rs.resample_indices(clusters, resamples=40, seed=0)):
        assert fast[r] == pytest.approx(cal.summary(p[:, index], y[index], multilabel)["ece"], abs=1e-12)


@pytest.mark.parametrize(("seed", "sharpness"), [(0, 1.0), (1, 3.0), (2, 0.4), (3, 1.0), (4, 6.0)])
def test_temperature_scaling_keeps_argmax_and_never_raises_val_nll(seed, sharpness):
    val_p, val_y = _probs(seed, sharpness=sharpness)
    test_p, test_y = _probs(seed + 100, sharpness=sharpness)
    t = cal.fit_temperature(val_p, val_y)
    assert t > 0
    if sharpness > 2:
        assert t > 1.5  # over-confident: softened
    if sharpness < 0.5:
        assert t < 0.7  # under-confident: sharpened
    scaled = cal.apply_temperature(test_p, t)
    np.testing.assert_array_equal(np.argmax(scaled, 1), np.argmax(test_p, 1))
    assert cal.nll(cal.apply_temperature(val_p, t), val_y) <= cal.nll(val_p, val_y) + 1e-12
    out = cal.temperature_scaling(val_p, val_y, test_p, test_y, multilabel=False)
    assert out["val_nll_after"] <= out["val_nll_before"] and out["temperature"] == [t]
    if sharpness > 2:
        assert out["after"]["ece"] < out["before"]["ece"]


@pytest.mark.parametrize("sharpness", [1.0, 4.0])
def test_multilabel_temperature_scaling(sharpness):
    rng = np.random.default_rng(0)
    logit = rng.normal(size=(400, 4)) * 2
    y = (rng.random((400, 4)) < 1 / (1 + np.exp(-logit))).astype(float)
    y[rng.random((400, 4)) < 0.2] = np.nan
    p = 1 / (1 + np.exp(-sharpness * logit))
    t = cal.fit_temperature(p, y, multilabel=True)
    scaled = cal.apply_temperature(p, t, multilabel=True)
    np.testing.assert_array_equal(scaled > 0.5, p > 0.5)  # T keeps the side of 0.5
    before = np.mean([cal.binary_nll(p[:, c], y[:, c]) for c in range(4)])
    after = np.mean([cal.binary_nll(scaled[:, c], y[:, c]) for c in range(4)])
    assert after <= before + 1e-9
    assert t == pytest.approx(sharpness, rel=0.2)


def test_bad_calibration_input_is_one_clear_error():
    with pytest.raises(FmcacheError, match="validation probabilities"):
        cal.fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(FmcacheError, match=r"\(n, C\) probabilities and \(n,\) labels"):
        cal.ece(np.full((4, 2), 0.5), np.zeros(3, dtype=int))
    with pytest.raises(FmcacheError, match="labels must lie in"):
        cal.brier(np.full((2, 2), 0.5), np.array([0, 2]))
    with pytest.raises(FmcacheError, match="temperature must be > 0"):
        cal.apply_temperature(np.full((2, 2), 0.5), 0.0)
