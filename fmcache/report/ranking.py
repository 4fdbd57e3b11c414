"""Ranking models: across datasets (Friedman test, Nemenyi critical difference) and within one dataset (bootstrap
rank intervals and the tier of models tied with the best).

Across datasets (Demšar 2006, JMLR 7:1–30): each dataset ranks the k models (rank 1 = best, ties share their mean
rank); the Friedman statistic tests whether the average ranks differ, Iman and Davenport's F_F is its less
conservative form, and two models differ (Nemenyi, all pairs, α) when their average ranks differ by at least
CD = q_α √(k(k + 1) / (6N)). χ²_F is Demšar's formula, without a correction for ties.

Within one dataset the test set is the only sample: each bootstrap resample (at the patient level, see
:mod:`fmcache.report.resampling`) scores every model on the same rows, and by default also draws each resample's
seeds with replacement, so a model's spread includes seed-to-seed variation. Seed draws are shared by all models
(seed s of every model is drawn together), as fmcache runs every model with the same seed list and the same seed
gives the same data order. A model is *tied with the best* when the percentile CI of (best model − it) reaches 0,
i.e. it is not significantly worse than the model with the best point estimate (the best is tied with itself).
This tier is chosen over "rank interval contains 1" because it asks one paired question per model, while a rank
interval depends on every other model's noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from fmcache.errors import FmcacheError
from fmcache.report.predictions import LEVEL, RESAMPLES, SEED, Predictions, seed_mean
from fmcache.report.resampling import Clusters, check_rows, make_clusters, per_seed_values

# Demšar (2006), Table 5(a): critical values of the two-tailed Nemenyi test for k = 2..10 models.
NEMENYI_Q = {
    0.05: (1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164),
    0.10: (1.645, 2.052, 2.291, 2.459, 2.589, 2.693, 2.780, 2.855, 2.920),
}


def _ranks(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Midranks along the last axis, rank 1 = best."""
    return stats.rankdata(-values if higher_is_better else values, axis=-1)


def average_ranks(table: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Average rank of each model (column) over datasets (rows) of ``table``; rank 1 = best, ties share ranks."""
    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 2:
        raise FmcacheError(f"ranking needs a (datasets, models) table with at least 2 models, got shape {t.shape}")
    missing = np.argwhere(np.isnan(t))
    if len(missing):
        row, col = missing[0]
        raise FmcacheError(f"the ranking table has no value for dataset {row}, model {col}; rank complete rows only")
    return _ranks(t, higher_is_better).mean(axis=0)


def friedman(table: np.ndarray, higher_is_better: bool = True) -> dict:
    """Friedman test over a (datasets, models) table: ``{avg_ranks, chi2, chi2_p, ff, ff_p, df1, df2, n_datasets,
    n_models}``. ``chi2`` is Friedman's χ²_F (k − 1 df), ``ff`` Iman–Davenport's F_F (k − 1, (k − 1)(N − 1) df)."""
    ranks = average_ranks(table, higher_is_better)
    n, k = np.shape(table)
    chi2 = 12.0 * n / (k * (k + 1)) * (np.sum(ranks**2) - k * (k + 1) ** 2 / 4.0)
    df1, df2 = k - 1, (k - 1) * (n - 1)
    room = n * (k - 1) - chi2  # 0 when every dataset ranks the models alike
    ff = (n - 1) * chi2 / room if room > 0 else np.inf
    ff_p = float(stats.f.sf(ff, df1, df2)) if df2 > 0 else float("nan")
    return {
        "avg_ranks": ranks.tolist(),
        "chi2": float(chi2),
        "chi2_p": float(stats.chi2.sf(chi2, df1)),
        "ff": float(ff),
        "ff_p": ff_p,
        "df1": df1,
        "df2": df2,
        "n_datasets": n,
        "n_models": k,
    }


def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """q_α of the Nemenyi test for ``k`` models: Demšar's table for k ≤ 10, beyond it the Studentized range
    quantile with infinite df divided by √2 (what the table tabulates)."""
    if alpha not in NEMENYI_Q:
        raise FmcacheError(f"Nemenyi critical values exist for alpha 0.05 and 0.10, not {alpha}")
    if k < 2:
        raise FmcacheError(f"the Nemenyi test compares at least 2 models, got {k}")
    if k <= 10:
        return NEMENYI_Q[alpha][k - 2]
    return float(stats.studentized_range.ppf(1.0 - alpha, k, np.inf) / np.sqrt(2.0))


def critical_difference(k: int, n_datasets: int, alpha: float = 0.05) -> float:
    """Nemenyi's CD = q_α √(k(k + 1) / (6N)) for ``k`` models on ``n_datasets`` datasets."""
    if n_datasets < 1:
        raise FmcacheError(f"the critical difference needs at least one dataset, got {n_datasets}")
    return nemenyi_q(k, alpha) * float(np.sqrt(k * (k + 1) / (6.0 * n_datasets)))


def cd_groups(avg_ranks: Sequence[float], cd: float) -> list[list[int]]:
    """Maximal groups of models (indices, best first) whose average ranks all lie within less than ``cd``:
    the bars of a CD diagram. A model significantly different from all others is a group of its own."""
    order = np.argsort(np.asarray(avg_ranks, dtype=np.float64), kind="stable")
    r = np.asarray(avg_ranks, dtype=np.float64)[order]
    groups, last_end = [], -1
    for start in range(len(r)):
        end = int(np.searchsorted(r, r[start] + cd, side="left"))  # first model at least cd worse
        if end - 1 > last_end:  # not inside the previous group
            groups.append([int(i) for i in order[start:end]])
            last_end = end - 1
    return groups


def compare_models(table: np.ndarray, names: Sequence[str], alpha: float = 0.05, higher_is_better: bool = True) -> dict:
    """Friedman test, Nemenyi CD at ``alpha`` and the CD groups (by name) for a (datasets, models) table."""
    if len(names) != np.shape(table)[1]:
        raise FmcacheError(f"got {len(names)} model names for {np.shape(table)[1]} table columns")
    out = friedman(table, higher_is_better)
    cd = critical_difference(out["n_models"], out["n_datasets"], alpha)
    groups = [[names[i] for i in g] for g in cd_groups(out["avg_ranks"], cd)]
    return {**out, "names": list(names), "alpha": alpha, "cd": cd, "groups": groups}


# ---------------------------------------------------------------------------------------------------------------
# within one dataset


def rank_intervals(
    values: np.ndarray,
    point: Sequence[float],
    names: Sequence[str],
    level: float = LEVEL,
    higher_is_better: bool = True,
) -> dict:
    """Rank intervals and the best tier from bootstrap ``values`` (resamples, models), every column scored on the
    same resamples, and the models' ``point`` estimates.

    Returns ``{"best": name, "models": {name: {point, rank, rank_low, rank_high, diff_low, diff_high,
    tied_with_best}}}``: ``rank`` is the rank of the point estimates, the rank interval the percentile interval of
    the resample ranks, ``diff_*`` the CI of (best − model) in the metric's direction.
    """
    v = np.asarray(values, dtype=np.float64)
    p = np.asarray(point, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != len(p) or len(names) != len(p):
        raise FmcacheError(f"values {v.shape}, {len(p)} points and {len(names)} names do not describe one model set")
    if len(v) == 0:
        raise FmcacheError("no bootstrap resample left every model's metric defined; the test split is too small")
    sign = 1.0 if higher_is_better else -1.0
    best = int(np.argmax(sign * p))
    alpha = (1.0 - level) / 2.0
    rank_low, rank_high = np.quantile(_ranks(v, higher_is_better), [alpha, 1.0 - alpha], axis=0)
    diff_low, diff_high = np.quantile(sign * (v[:, [best]] - v), [alpha, 1.0 - alpha], axis=0)
    rank = _ranks(p, higher_is_better)
    models = {
        name: {
            "point": float(p[i]),
            "rank": float(rank[i]),
            "rank_low": float(rank_low[i]),
            "rank_high": float(rank_high[i]),
            "diff_low": float(diff_low[i]),
            "diff_high": float(diff_high[i]),
            "tied_with_best": bool(diff_low[i] <= 0.0),
        }
        for i, name in enumerate(names)
    }
    return {"best": names[best], "models": models, "level": level, "resamples_used": len(v)}


def _seed_draws(per_seed: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Each model's mean over seeds drawn with replacement; one uniform draw is shared so seed s pairs across models."""
    resamples, most = len(per_seed[0]), max(v.shape[1] for v in per_seed)
    u = np.random.default_rng((seed, 1)).random((resamples, most))
    out = []
    for v in per_seed:
        pick = np.minimum((u[:, : v.shape[1]] * v.shape[1]).astype(np.int64), v.shape[1] - 1)
        out.append(np.take_along_axis(v, pick, axis=1).mean(axis=1))
    return out


def within_dataset_ranking(
    metric: str,
    preds: Mapping[str, Predictions],
    clusters: Clusters | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
    resample_seeds: bool = True,
) -> dict:
    """Rank intervals and the tier tied with the best for models scored on one test set (:func:`rank_intervals`).

    ``preds`` ({model: test predictions}) must share ids (in one order) and labels; ``clusters`` default to one
    per image. Each resample draws clusters and, with ``resample_seeds``, the seeds. A resample where some
    model's metric is undefined is dropped and counted in ``failed``.
    """
    names = list(preds)
    if len(names) < 2:
        raise FmcacheError(f"ranking needs at least 2 models, got {len(names)}")
    first = preds[names[0]]
    for name in names[1:]:
        if not np.array_equal(preds[name].ids, first.ids):
            raise FmcacheError(f"model {name!r} was scored on other test ids than {names[0]!r}; align them first")
        if not np.array_equal(np.asarray(preds[name].labels, float), np.asarray(first.labels, float), equal_nan=True):
            raise FmcacheError(f"model {name!r} has other labels than {names[0]!r} for the same test ids")
    clusters = make_clusters(len(first.labels), labels=first.labels) if clusters is None else clusters
    check_rows(clusters, first)
    per_seed = [per_seed_values(metric, preds[n], clusters, resamples, seed) for n in names]
    points = [seed_mean(metric, preds[n]) for n in names]
    return ranking_from_values(metric, names, per_seed, points, clusters, resamples, seed, level, resample_seeds)


def ranking_from_values(
    metric: str,
    names: Sequence[str],
    per_seed: Sequence[np.ndarray],
    points: Sequence[float],
    clusters: Clusters,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
    resample_seeds: bool = True,
) -> dict:
    """:func:`within_dataset_ranking` from each model's per-seed bootstrap values ((resamples, n_seeds), drawn on
    the same ``clusters``, ``resamples`` and ``seed``: :func:`fmcache.report.resampling.per_seed_values`) and its
    point estimate, so a report that has drawn them for the CIs ranks without drawing again."""
    names = list(names)
    columns = _seed_draws(list(per_seed), seed) if resample_seeds else [v.mean(axis=1) for v in per_seed]
    values = np.stack(columns, axis=1)
    ok = np.all(np.isfinite(values), axis=1)
    out = rank_intervals(values[ok], points, names, level)
    return {
        **out,
        "metric": metric,
        "unit": clusters.unit,
        "n": clusters.n_rows,
        "n_clusters": clusters.n_clusters,
        "resamples": resamples,
        "failed": int(np.sum(~ok)),
        "seed": seed,
        "resample_seeds": resample_seeds,
    }
