"""Calibration from saved probabilities: ECE, MCE, Brier, NLL, reliability diagrams, temperature scaling.

Conventions (the ones torchmetrics' ``MulticlassCalibrationError``/``BinaryCalibrationError`` use, which the tests
check against):

* **Single-label** (top-label): confidence = the largest probability, correct = (argmax = label, ties to the
  lowest class as in :func:`fmcache.metrics.evaluate`). 15 equal-width bins [k/15, (k+1)/15); the last bin also
  holds confidence 1.0 (torchmetrics gives exactly 1.0 a bin of its own; the two agree everywhere else).
  ECE = Σ_bins (count/n)·|accuracy − mean confidence| (L1); MCE = the largest |accuracy − mean confidence| over
  non-empty bins. Brier = mean over samples of Σ_classes (p − one-hot)²; NLL = −mean log p_label.
* **Multi-label**: each label is a binary problem on its known rows (NaN masked): bins on p, "accuracy" = the
  positive rate in the bin; Brier = mean (p − y)²; NLL = binary cross-entropy. Summaries average over labels.
* **Seeds**: calibration is a property of one trained model, so it is computed per seed and averaged (averaging
  the seeds' probabilities first would measure an ensemble instead).
* **Logs**: probabilities are clipped to [1e-12, 1 − 1e-12] before a log, so a saved 0 costs log(1e-12), not inf.

Temperature scaling: only probabilities are saved, so log p serves as logits (softmax(log p / T) = p at T = 1), and
logit(p) for multi-label sigmoid outputs. One T > 0 per seed (shared by all labels) minimises the val NLL: a
bounded 1-D search on log T in [1/20, 20], deterministic. If the search ends above T = 1's NLL (it cannot, in
exact arithmetic: the NLL is convex in 1/T), T = 1 is kept, so scaling never raises the val NLL. T > 0 keeps every
argmax.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import optimize, sparse, special

from fmcache.errors import FmcacheError

N_BINS = 15
EPS = 1e-12
T_BOUNDS = (0.05, 20.0)

WeightedFn = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------------------------
# input checks


def _single(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or y.ndim != 1 or len(p) != len(y):
        raise FmcacheError(f"calibration needs (n, C) probabilities and (n,) labels, got {p.shape} and {y.shape}")
    if len(y) == 0:
        raise FmcacheError("calibration needs at least one prediction; the split is empty")
    if y.dtype.kind == "f" and (not np.all(np.isfinite(y)) or np.any(y != np.round(y))):
        raise FmcacheError("single-label calibration needs integer class labels; found non-integer values")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise FmcacheError(f"labels must lie in 0..{p.shape[1] - 1} for {p.shape[1]} probability columns")
    return p, y


def _binary(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The known rows of one binary problem: (p, y) with y 0/1; NaN labels are dropped."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1:
        raise FmcacheError(f"binary calibration needs (n,) probabilities and labels, got {p.shape} and {y.shape}")
    known = ~np.isnan(y)
    if not np.all(np.isin(y[known], (0, 1))):
        raise FmcacheError("binary calibration needs labels 0/1 (NaN = unknown); found other values")
    return p[known], y[known]


def _multilabel(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.ndim != 2 or p.shape != y.shape:
        raise FmcacheError(f"multi-label calibration needs (n, C) probabilities and labels, got {p.shape}, {y.shape}")
    return p, y


# ---------------------------------------------------------------------------------------------------------------
# binned calibration error


def _bin_of(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.minimum(np.searchsorted(edges, confidence, side="right") - 1, n_bins - 1).clip(0)


def _bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> dict:
    """Per bin: edges, count, mean confidence, accuracy (NaN in empty bins)."""
    b = _bin_of(confidence, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(b, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct.astype(np.float64), minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count, "confidence": conf, "accuracy": acc}


def _error(bins: dict, norm: str) -> float:
    gap = np.abs(bins["accuracy"] - bins["confidence"])
    filled = bins["count"] > 0
    if norm == "l1":
        return float(np.sum(gap[filled] * bins["count"][filled]) / bins["count"].sum())
    if norm == "max":
        return float(np.max(gap[filled]))
    raise FmcacheError(f"unknown calibration norm {norm!r}; choose one of: l1, max")


def _top_label(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predicted = np.argmax(p, axis=1)
    return p[np.arange(len(p)), predicted], predicted == y


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Reliability-diagram data of single-label ``probs`` (n, C): ``{edges, count, confidence, accuracy}``."""
    return _bins(*_top_label(*_single(probs, labels)), n_bins)


def binary_reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Reliability-diagram data of one binary label: bins on p, "accuracy" = positive rate; NaN labels masked."""
    p, y = _binary(probs, labels)
    if len(p) == 0:
        raise FmcacheError("binary calibration needs at least one known label; every label is NaN")
    return _bins(p, y, n_bins)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS, norm: str = "l1") -> float:
    """Top-label expected calibration error of single-label ``probs`` (n, C); ``norm="max"`` gives the MCE."""
    return _error(reliability(probs, labels, n_bins), norm)


def mce(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label maximum calibration error: the largest |accuracy − confidence| over non-empty bins."""
    return ece(probs, labels, n_bins, "max")


def binary_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS, norm: str = "l1") -> float:
    """ECE (or MCE with ``norm="max"``) of one binary label: bins on p against the positive rate; NaN masked."""
    return _error(binary_reliability(probs, labels, n_bins), norm)


# ---------------------------------------------------------------------------------------------------------------
# proper scores


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multiclass Brier score: mean over samples of Σ_classes (p − one-hot(label))²."""
    p, y = _single(probs, labels)
    target = np.zeros_like(p)
    target[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - target) ** 2, axis=1)))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Negative log-likelihood −mean log p_label (p clipped at 1e-12)."""
    p, y = _single(probs, labels)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))))


def binary_brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean (p − y)² over the known rows of one binary label."""
    p, y = _binary(probs, labels)
    return float(np.mean((p - y) ** 2))


def binary_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Binary cross-entropy over the known rows of one binary label (p clipped to [1e-12, 1 − 1e-12])."""
    p, y = _binary(probs, labels)
    p = np.clip(p, EPS, 1.0 - EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


# ---------------------------------------------------------------------------------------------------------------
# summaries (one seed, or the mean over seeds)


def summary(probs: np.ndarray, labels: np.ndarray, multilabel: bool, n_bins: int = N_BINS) -> dict:
    """``{ece, mce, brier, nll}`` of (n, C) or (n_seeds, n, C) probabilities, averaged over seeds.

    Multi-label: each value is the mean over labels with a known row, and ``per_label`` holds each label's.
    """
    p = np.asarray(probs, dtype=np.float64)
    per_seed = [_summary_one(s, labels, multilabel, n_bins) for s in (p[None] if p.ndim == 2 else p)]
    out = {k: float(np.mean([s[k] for s in per_seed])) for k in ("ece", "mce", "brier", "nll")}
    if multilabel:
        names = per_seed[0]["per_label"]
        out["per_label"] = {
            c: {k: float(np.mean([s["per_label"][c][k] for s in per_seed])) for k in names[c]} for c in names
        }
    return out


def _summary_one(p: np.ndarray, labels: np.ndarray, multilabel: bool, n_bins: int) -> dict:
    if not multilabel:
        return {
            "ece": ece(p, labels, n_bins),
            "mce": mce(p, labels, n_bins),
            "brier": brier(p, labels),
            "nll": nll(p, labels),
        }
    p, y = _multilabel(p, labels)
    per_label = {}
    for c in range(y.shape[1]):
        if np.all(np.isnan(y[:, c])):
            continue  # a label never known in this split has no calibration
        col = (p[:, c], y[:, c])
        per_label[f"label_{c}"] = {
            "ece": binary_ece(*col, n_bins),
            "mce": binary_ece(*col, n_bins, "max"),
            "brier": binary_brier(*col),
            "nll": binary_nll(*col),
        }
    if not per_label:
        raise FmcacheError("multi-label calibration needs known labels; every label is NaN")
    means = {k: float(np.mean([v[k] for v in per_label.values()])) for k in ("ece", "mce", "brier", "nll")}
    return {**means, "per_label": per_label}


# ---------------------------------------------------------------------------------------------------------------
# ECE on bootstrap weights (for resampling.bootstrap_ci_weights)


def weighted_ece(probs: np.ndarray, labels: np.ndarray, multilabel: bool, n_bins: int = N_BINS) -> WeightedFn:
    """``fn_w((r, n) row weights) -> (r,)``: the seed-mean ECE of each weighted resample, in one matrix product.

    ``probs`` is (n, C) or (n_seeds, n, C). A bin's weighted gap is Σ_i w_i (correct_i − confidence_i) over its
    rows, so ECE_r = Σ_bins |w_r · D[:, bin]| / Σ w_r. Multi-label: the mean over labels with a known row in the
    resample; NaN where none has.
    """
    p = np.asarray(probs, dtype=np.float64)
    seeds = p[None] if p.ndim == 2 else p
    if multilabel:
        y = _multilabel(seeds[0], labels)[1]
        known = (~np.isnan(y)).astype(np.float64)
        gaps = [
            _gap_matrix(s[:, c], np.nan_to_num(y[:, c]), n_bins) * known[:, c, None]
            for s in seeds
            for c in range(y.shape[1])
        ]
        n_labels = y.shape[1]
    else:
        gaps = [_gap_matrix(*_top_label(*_single(s, labels)), n_bins) for s in seeds]
        known, n_labels = np.ones((len(seeds[0]), 1)), 1
    # (n, n_seeds · n_labels · n_bins), one non-zero per row, seed and label: sparse, so a resample costs its rows
    # times the seeds and labels, not times the bins as well
    transposed = sparse.csr_matrix(np.concatenate(gaps, axis=1).T)

    def ece_w(w: np.ndarray) -> np.ndarray:
        per_bin = np.abs(transposed @ np.asarray(w, dtype=np.float64).T).T
        per_bin = per_bin.reshape(len(w), len(seeds), n_labels, n_bins)
        total = w @ known  # (r, n_labels) weight of each label's known rows
        with np.errstate(invalid="ignore", divide="ignore"):
            per_label = np.where(total[:, None, :] > 0, per_bin.sum(axis=3) / total[:, None, :], np.nan)
        return np.nanmean(per_label, axis=2).mean(axis=1) if multilabel else per_label[:, :, 0].mean(axis=1)

    return ece_w


def _gap_matrix(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """(n, n_bins): correct − confidence in the column of each row's bin, 0 elsewhere."""
    out = np.zeros((len(confidence), n_bins))
    out[np.arange(len(confidence)), _bin_of(confidence, n_bins)] = np.asarray(correct, np.float64) - confidence
    return out


# ---------------------------------------------------------------------------------------------------------------
# temperature scaling


def _logits(p: np.ndarray, multilabel: bool) -> np.ndarray:
    p = np.clip(p, EPS, 1.0 - EPS) if multilabel else np.clip(p, EPS, 1.0)
    return special.logit(p) if multilabel else np.log(p)


def _scaled_nll(logits: np.ndarray, labels: np.ndarray, multilabel: bool, temperature: float) -> float:
    z = logits / temperature
    if not multilabel:
        return float(-np.mean(special.log_softmax(z, axis=1)[np.arange(len(labels)), labels]))
    known = ~np.isnan(labels)
    y, z = labels[known], z[known]
    # −[y log σ(z) + (1 − y) log σ(−z)], written with log_expit for large |z|
    return float(-np.mean(y * special.log_expit(z) + (1.0 - y) * special.log_expit(-z)))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, multilabel: bool = False) -> float:
    """The T > 0 that minimises the NLL of ``probs`` (one seed's (n, C) validation probabilities) at T.

    Never worse than T = 1 on these data. Raises on an empty split.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise FmcacheError(f"temperature scaling needs (n, C) validation probabilities, got shape {p.shape}")
    if multilabel:
        p, y = _multilabel(p, labels)
        if np.all(np.isnan(y)):
            raise FmcacheError("temperature scaling needs known validation labels; every label is NaN")
    else:
        p, y = _single(p, labels)
    logits = _logits(p, multilabel)

    def loss(log_t: float) -> float:
        return _scaled_nll(logits, y, multilabel, float(np.exp(log_t)))

    found = optimize.minimize_scalar(loss, bounds=np.log(T_BOUNDS), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x)) if found.fun < loss(0.0) else 1.0


def apply_temperature(probs: np.ndarray, temperature: float, multilabel: bool = False) -> np.ndarray:
    """Probabilities at temperature T: softmax(log p / T), or sigmoid(logit(p) / T) for multi-label."""
    if not temperature > 0:
        raise FmcacheError(f"temperature must be > 0, got {temperature}")
    z = _logits(np.asarray(probs, dtype=np.float64), multilabel) / temperature
    return special.expit(z) if multilabel else special.softmax(z, axis=-1)


def temperature_scaling(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    multilabel: bool,
    n_bins: int = N_BINS,
) -> dict:
    """Fit T on val per seed, apply to test: ``{temperature: [per seed], val_nll_before/after, before, after}``.

    Probabilities are (n, C) or (n_seeds, n, C) (val and test with the same seeds); ``before``/``after`` are the
    test :func:`summary` without and with scaling.
    """
    val = np.asarray(val_probs, dtype=np.float64)
    test = np.asarray(test_probs, dtype=np.float64)
    val, test = (val[None], test[None]) if val.ndim == 2 else (val, test)
    if len(val) != len(test):
        raise FmcacheError(f"val has {len(val)} seeds of probabilities and test {len(test)}; they must match")
    temps = [fit_temperature(v, val_labels, multilabel) for v in val]
    scaled = np.stack([apply_temperature(t, k, multilabel) for t, k in zip(test, temps, strict=True)])
    y_val = np.asarray(val_labels, dtype=np.float64) if multilabel else _single(val[0], val_labels)[1]

    def val_nll(k: int, t: float) -> float:
        return _scaled_nll(_logits(val[k], multilabel), y_val, multilabel, t)

    return {
        "temperature": temps,
        "val_nll_before": float(np.mean([val_nll(k, 1.0) for k in range(len(val))])),
        "val_nll_after": float(np.mean([val_nll(k, t) for k, t in enumerate(temps)])),
        "before": summary(test, test_labels, multilabel, n_bins),
        "after": summary(scaled, test_labels, multilabel, n_bins),
    }
