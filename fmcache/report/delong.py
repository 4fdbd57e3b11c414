"""DeLong's variance of ROC-AUC and the paired DeLong test, from the saved test predictions.

The AUC is a two-sample U-statistic. DeLong et al. (1988) estimate its variance from the *structural components*:
for positive i, V10_i = the fraction of negatives it outscores; for negative j, V01_j = the fraction of positives
that outscore it (ties count half). Var(AUC) = S10/m + S01/n with S10, S01 their sample (co)variances over the m
positives and n negatives. The components come from midranks (Sun & Xu 2014): V10_i = (rank of X_i among all −
rank among positives)/n, so the cost is a sort, not the m·n comparisons.

Choices a reader should know:

* **Seeds.** The tables report the AUC of each seed averaged over seeds. That mean is itself a U-statistic whose
  kernel is the seeds' mean kernel, so its structural components are the seeds' components averaged: every
  function here accepts (n_seeds, n) scores and gives the variance of exactly that number (not of the AUC of the
  seed-mean score, which is a different, usually higher, number). The variance is over test samples with the
  trained models fixed; seed-to-seed variation is what the tables' ± std shows.
* **Labels and the mean AUC.** Each label's AUC uses its known rows (NaN masked). Labels share test images, so
  their AUCs are correlated; the variance of the mean (of AUCs or of A − B differences) is computed from
  per-image influence values ψ: a positive of label c contributes (V10 − AUC_c)/√(m_c(m_c − 1)), a negative
  (V01 − AUC_c)/√(n_c(n_c − 1)), an unknown 0. Cov(c, c') = Σ_images ψ_c ψ_c', which for c = c' is exactly
  DeLong's S10/m + S01/n, and across labels counts each shared image once per label pair. A label needs at least
  two positives and two negatives for a variance; one with fewer is named in ``skipped``.
* **Clusters.** With ``cluster_ids`` (patient ids) ψ is summed per cluster before the products: the
  cluster-robust form of DeLong's estimator (as Obuchowski 1997 does for clustered ROC data). One image per
  cluster gives DeLong's variance exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import special, stats

from fmcache.errors import FmcacheError
from fmcache.report.resampling import make_clusters

LEVEL = 0.95


def _binary_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise FmcacheError(f"DeLong needs (n,) binary labels, got shape {y.shape}")
    if not np.all(np.isin(y, (0, 1))):
        raise FmcacheError("DeLong needs labels 0/1 (mask unknown labels first); found other values")
    return y.astype(bool)


def _scores_2d(scores: np.ndarray, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    s = s[None] if s.ndim == 1 else s
    if s.ndim != 2 or s.shape[1] != n:
        raise FmcacheError(f"scores must be (n,) or (n_seeds, n) with n = {n} labels, got shape {np.shape(scores)}")
    if not np.all(np.isfinite(s)):
        raise FmcacheError("scores contain NaN or inf; check the model outputs")
    return s


def structural_components(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeLong's components of k score vectors on one label: ``(auc (k,), v10 (k, m), v01 (k, n))``.

    ``scores`` is (k, N) (or (N,)); ``labels`` (N,) 0/1 with both classes. ``auc`` equals the Mann–Whitney AUC
    with ties counting half; ``v10`` follows the order of the positives in ``labels``, ``v01`` that of the negatives.
    """
    y = _binary_labels(labels)
    s = _scores_2d(scores, len(y))
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise FmcacheError(f"AUC is undefined: the labels hold {m} positives and {n} negatives; it needs both classes")
    below_neg, below_pos = zip(*(_below(y, row) for row in s), strict=True)
    v10 = np.stack(below_neg)[:, y] / n
    v01 = 1.0 - np.stack(below_pos)[:, ~y] / m
    return v10.mean(axis=1), v10, v01


def _below(y: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the negatives, and the positives, scored below it, ties counting half.

    This is Sun & Xu's midrank difference (rank among all − rank within its class) from one sort: in a run of
    tied scores holding p positives and q negatives, a positive's midrank among all exceeds its midrank among
    the positives by (negatives before the run) + q/2.
    """
    order = np.argsort(row)
    ranked = row[order]
    new_run = np.r_[True, ranked[1:] != ranked[:-1]]
    run = np.cumsum(new_run) - 1
    pos_in_run = np.bincount(run, weights=y[order])
    neg_in_run = np.bincount(run) - pos_in_run
    below_neg, below_pos = np.empty(len(row)), np.empty(len(row))
    below_neg[order] = (np.cumsum(neg_in_run) - neg_in_run / 2)[run]
    below_pos[order] = (np.cumsum(pos_in_run) - pos_in_run / 2)[run]
    return below_neg, below_pos


def _seed_mean_components(
    labels: np.ndarray, models: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Components of each model's seed-mean AUC (each model (n,) or (n_seeds, n)): averaged over its seeds."""
    stacked = [_scores_2d(s, len(labels)) for s in models]
    _, v10, v01 = structural_components(labels, np.concatenate(stacked))
    cuts = np.cumsum([len(s) for s in stacked])[:-1]
    v10 = np.stack([part.mean(axis=0) for part in np.split(v10, cuts)])
    v01 = np.stack([part.mean(axis=0) for part in np.split(v01, cuts)])
    return v10.mean(axis=1), v10, v01


def influence(labels: np.ndarray, models: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(auc (k,), psi (k, N))``: each model's seed-mean AUC and per-sample influence values.

    Σ_samples ψ_a ψ_b is DeLong's covariance of models a and b (see the module docstring). Needs at least two
    positives and two negatives.
    """
    y = _binary_labels(labels)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise FmcacheError(f"DeLong's variance needs at least 2 positives and 2 negatives; got {m} and {n}")
    auc, v10, v01 = _seed_mean_components(y, models)
    psi = np.zeros((len(auc), len(y)))
    psi[:, y] = (v10 - auc[:, None]) / np.sqrt(m * (m - 1.0))
    psi[:, ~y] = (v01 - auc[:, None]) / np.sqrt(n * (n - 1.0))
    return auc, psi


def _cluster_sums(psi: np.ndarray, cluster_ids: np.ndarray | None, unit: str | None) -> np.ndarray:
    if cluster_ids is None:
        return psi
    row_cluster = make_clusters(psi.shape[1], cluster_ids, unit).row_cluster
    return np.stack([np.bincount(row_cluster, weights=row) for row in psi])


def delong_cov(
    labels: np.ndarray, scores: np.ndarray, cluster_ids: np.ndarray | None = None, unit: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(auc (k,), cov (k, k))`` of k score vectors (k, N) on the same samples (DeLong 1988).

    With ``cluster_ids`` (one per sample; ``unit`` names them, default patient) the cluster-robust form.
    """
    s = np.asarray(scores, dtype=np.float64)
    auc, psi = influence(labels, list(s[None] if s.ndim == 1 else s))
    psi = _cluster_sums(psi, cluster_ids, unit)
    return auc, psi @ psi.T


def _unit(cluster_ids: np.ndarray | None, unit: str | None) -> str:
    return "image" if cluster_ids is None else (unit or "patient")


def auc_se(
    labels: np.ndarray,
    scores: np.ndarray,
    cluster_ids: np.ndarray | None = None,
    unit: str | None = None,
    level: float = LEVEL,
) -> dict:
    """Seed-mean AUC of ``scores`` ((N,) or (n_seeds, N)) with DeLong's standard error and a normal CI clipped
    to [0, 1]: ``{auc, se, low, high, level, n_pos, n_neg, n_seeds, unit}``."""
    y = _binary_labels(labels)
    auc, psi = influence(y, [scores])
    n_seeds = _scores_2d(scores, len(y)).shape[0]
    return {
        **_summary(auc, _cluster_sums(psi, cluster_ids, unit), level),
        "level": level,
        **_counts(y),
        "n_seeds": n_seeds,
        "unit": _unit(cluster_ids, unit),
    }


def _counts(y: np.ndarray) -> dict:
    return {"n_pos": int(np.sum(y == 1)), "n_neg": int(np.sum(y == 0))}


def _z_test(delta: float, variance: float) -> tuple[float, float]:
    """Two-sided z-test of ``delta`` = 0; a zero variance gives z = 0, p = 1 for no difference."""
    if variance <= 0.0:
        return (0.0, 1.0) if delta == 0.0 else (float(np.copysign(np.inf, delta)), 0.0)
    z = delta / np.sqrt(variance)
    return float(z), float(2.0 * special.ndtr(-abs(z)))


def delong_test(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    cluster_ids: np.ndarray | None = None,
    unit: str | None = None,
) -> dict:
    """Paired DeLong test of AUC(A) = AUC(B) on the same samples: ``{auc_a, auc_b, delta, se, z, p_value, …}``.

    ``scores_a``/``scores_b`` are (N,) or (n_seeds, N) (seed-mean AUCs are compared). ``p_value`` is two-sided;
    identical inputs give z = 0 and p = 1.
    """
    y = _binary_labels(labels)
    auc, psi = influence(y, [scores_a, scores_b])
    return {**_summary(auc, _cluster_sums(psi, cluster_ids, unit)), **_counts(y), "unit": _unit(cluster_ids, unit)}


def _per_seed(scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    s = s[None] if s.ndim == 2 else s
    if s.ndim != 3 or s.shape[1:] != shape:
        raise FmcacheError(f"scores must be {shape} or (n_seeds, *{shape}), got shape {np.shape(scores)}")
    return s


def multilabel_delong(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    cluster_ids: np.ndarray | None = None,
    unit: str | None = None,
    level: float = LEVEL,
) -> dict:
    """DeLong per label of (N, C) multi-label data (NaN = unknown, masked per label) and for the mean over labels.

    With ``scores_a`` only: each label's AUC and SE, and the mean AUC's SE. With ``scores_b`` too: the paired test
    per label and of the mean AUC difference. Scores are (N, C) or (n_seeds, N, C). Returns ``{"per_label":
    {name: …}, "mean": {…}, "skipped": {name: reason}}``; the mean is over the labels not skipped.
    """
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 2:
        raise FmcacheError(f"multi-label DeLong needs (N, C) labels, got shape {y.shape}")
    names = list(names) if names is not None else [f"label_{c}" for c in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise FmcacheError(f"got {len(names)} label names for {y.shape[1]} label columns")
    models = [_per_seed(s, y.shape) for s in (scores_a, scores_b) if s is not None]
    per_label, skipped, aucs, psis = {}, {}, [], []
    for c, name in enumerate(names):
        known = ~np.isnan(y[:, c])
        try:
            auc, psi = influence(y[known, c], [s[:, known, c] for s in models])
        except FmcacheError as exc:
            skipped[name] = str(exc)
            continue
        full = np.zeros((len(models), len(y)))
        full[:, known] = psi
        aucs.append(auc)
        psis.append(_cluster_sums(full, cluster_ids, unit))
        per_label[name] = {**_summary(auc, psis[-1], level), **_counts(y[known, c])}
    if not aucs:
        raise FmcacheError(f"no label has 2 positives and 2 negatives for DeLong ({', '.join(skipped)})")
    # the mean over labels: its influence is the mean of the labels' influences, so shared images covary
    mean = _summary(np.mean(aucs, axis=0), np.mean(psis, axis=0), level)
    unit_name = _unit(cluster_ids, unit)
    return {"per_label": per_label, "mean": {**mean, "n_labels": len(aucs), "unit": unit_name}, "skipped": skipped}


def _summary(auc: np.ndarray, psi: np.ndarray, level: float = LEVEL) -> dict:
    """One model: its AUC, SE and normal CI clipped to [0, 1]; two models: the paired test of A − B."""
    if len(auc) == 1:
        se = float(np.sqrt(psi[0] @ psi[0]))
        half = float(stats.norm.ppf(0.5 + level / 2)) * se
        low, high = max(0.0, float(auc[0]) - half), min(1.0, float(auc[0]) + half)
        return {"auc": float(auc[0]), "se": se, "low": low, "high": high}
    diff = psi[0] - psi[1]
    delta = float(auc[0] - auc[1])
    z, p = _z_test(delta, float(diff @ diff))
    return {
        "auc_a": float(auc[0]),
        "auc_b": float(auc[1]),
        "delta": delta,
        "se": float(np.sqrt(diff @ diff)),
        "z": z,
        "p_value": p,
    }
