"""Bootstrap at the right unit: whole patients (or lesions) are resampled, never their images one by one.

Images of one patient are correlated (same anatomy, same scanner, often the same label), so an image-level bootstrap
treats a 22k-image test set from 7k patients as if it held 22k independent draws and its CIs are too narrow. Here a
resample draws *clusters* with replacement and takes all rows of every drawn cluster; a row whose cluster id is not
known is its own cluster, and with no ids at all every image is one (unit ``"image"``).

Stratification: the draw keeps each stratum's cluster count fixed, so a resample holds (about) the test set's class
mix and rare classes are not lost. A single-label cluster's stratum is its majority label (ties to the lowest class);
a multi-label cluster's stratum is "any known positive label or none": no one class describes a CheXpert patient,
and stratifying by 2^14 label combinations would leave most strata with one member.

Two ways to score a resample:

* ``fn(index) -> float`` on the resample's row indices (any statistic; one Python call per resample);
* ``fn_w(weights) -> (r,)`` on a chunk of resamples given as row multiplicities (r, n). Every paper metric has such
  a form (:func:`weighted_metric`): AUCs sort each score column once and then need only cumulative sums, confusion
  matrices are one matrix product, so 1,000 resamples of a 22k-image test set cost seconds, not minutes.

A resample on which the statistic is undefined (an AUC whose resample holds one class) is dropped and counted in
``failed``, never scored 0.5. Every result names its unit, cluster count, resamples and failures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from fmcache import metrics
from fmcache.errors import FmcacheError
from fmcache.report.predictions import LEVEL, RESAMPLES, SEED, Predictions, seed_mean

# what a cluster id names (the results contract's ``group_unit``); "image": every row its own cluster
UNITS = ("patient", "lesion", "exam", "study", "image")
# Resamples are drawn and scored in chunks of about CHUNK_ELEMENTS row weights (16 MB of float64): small enough for
# a 22k-image test set, large enough that numpy's per-call overhead vanishes on small ones. The chunk size depends
# only on the row count, and is part of the random stream's definition: same rows, resamples and seed, same draws.
CHUNK_ELEMENTS = 1 << 21

WeightedFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Clusters:
    """Rows grouped into resampling units, in CSR form: cluster k holds ``rows[offsets[k]:offsets[k + 1]]``."""

    unit: str
    row_cluster: np.ndarray  # (n,) cluster index of each row
    rows: np.ndarray  # (n,) row indices, grouped by cluster
    offsets: np.ndarray  # (n_clusters + 1,)
    strata: np.ndarray  # (n_clusters,) stratum index of each cluster, 0..n_strata-1

    @property
    def n_rows(self) -> int:
        return len(self.row_cluster)

    @property
    def n_clusters(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_strata(self) -> int:
        return int(self.strata.max()) + 1 if len(self.strata) else 0


def make_clusters(
    n_rows: int,
    ids: np.ndarray | None = None,
    unit: str | None = None,
    labels: np.ndarray | None = None,
    stratify: bool = True,
) -> Clusters:
    """The resampling units of ``n_rows`` test rows.

    ``ids`` (one per row: patient or lesion id; None, NaN or "" where unknown) group rows; without ``ids`` each row
    is its own cluster and ``unit`` is ``"image"``. ``unit`` names what an id is (default ``"patient"``).
    ``labels`` ((n,) classes or (n, C) multi-label with NaN) stratify the draw unless ``stratify`` is False.
    """
    unit = _check_unit(unit, ids is not None)
    row_cluster = np.arange(n_rows) if ids is None else _cluster_index(np.asarray(ids), n_rows)
    n_clusters = int(row_cluster.max()) + 1 if n_rows else 0
    rows = np.argsort(row_cluster, kind="stable")
    offsets = np.searchsorted(row_cluster[rows], np.arange(n_clusters + 1))
    if labels is None or not stratify:
        strata = np.zeros(n_clusters, dtype=np.int64)
    else:
        strata = _strata(np.asarray(labels), row_cluster, n_clusters)
    return Clusters(unit, row_cluster, rows, offsets, strata)


def _check_unit(unit: str | None, has_ids: bool) -> str:
    unit = unit or ("patient" if has_ids else "image")
    if unit not in UNITS:
        raise FmcacheError(f"unknown resampling unit {unit!r}; choose one of: {', '.join(UNITS)}")
    if has_ids == (unit == "image"):
        need = "give no cluster ids for unit 'image'" if has_ids else f"unit {unit!r} needs one cluster id per row"
        raise FmcacheError(f"resampling unit {unit!r} does not fit the cluster ids given; {need}")
    return unit


def _missing(ids: np.ndarray) -> np.ndarray:
    if ids.dtype.kind == "f":
        return np.isnan(ids)
    if ids.dtype.kind in "US":
        return ids == ids.dtype.type()
    if ids.dtype.kind == "O":
        return np.array([v is None or v == "" or (isinstance(v, float) and v != v) for v in ids], dtype=bool)
    return np.zeros(len(ids), dtype=bool)


def _cluster_index(ids: np.ndarray, n_rows: int) -> np.ndarray:
    """0..K-1 per row; equal ids share an index, each row with an unknown id gets one of its own."""
    if ids.ndim != 1 or len(ids) != n_rows:
        raise FmcacheError(f"cluster ids have shape {ids.shape} for {n_rows} test rows; give one id per row")
    missing = _missing(ids)
    known = ids[~missing]
    _, inverse = np.unique(known.astype(str) if ids.dtype.kind == "O" else known, return_inverse=True)
    index = np.empty(n_rows, dtype=np.int64)
    index[~missing] = inverse
    n_known = int(inverse.max()) + 1 if len(inverse) else 0
    index[missing] = n_known + np.arange(int(missing.sum()))
    return index


def _strata(labels: np.ndarray, row_cluster: np.ndarray, n_clusters: int) -> np.ndarray:
    if len(labels) != len(row_cluster):
        raise FmcacheError(f"{len(labels)} labels for {len(row_cluster)} test rows; give one label (row) per row")
    if labels.ndim == 2:  # multi-label: does the cluster hold any known positive?
        raw = np.bincount(row_cluster, weights=np.any(labels == 1, axis=1), minlength=n_clusters) > 0
    elif labels.ndim == 1:
        y = np.asarray(labels)
        if (y.dtype.kind == "f" and (not np.all(np.isfinite(y)) or np.any(y != np.round(y)))) or np.any(y < 0):
            raise FmcacheError("single-label strata need class indices 0, 1, ...; found other values")
        y = y.astype(np.int64)
        n_classes = int(y.max()) + 1
        per_class = np.bincount(row_cluster * n_classes + y, minlength=n_clusters * n_classes)
        raw = per_class.reshape(n_clusters, n_classes).argmax(axis=1)  # majority label, ties to the lowest class
    else:
        raise FmcacheError(f"labels must be (n,) or (n, C), got shape {labels.shape}")
    return np.unique(raw, return_inverse=True)[1].astype(np.int64)


def _draws(clusters: Clusters, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of (r, n_clusters) drawn cluster indices; each stratum keeps its cluster count."""
    if resamples < 1:
        raise FmcacheError(f"resamples must be at least 1, got {resamples}")
    if clusters.n_rows == 0:
        raise FmcacheError("no test rows to resample")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(clusters.strata == s) for s in range(clusters.n_strata)]
    chunk = max(8, CHUNK_ELEMENTS // clusters.n_rows)
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        if len(members) == 1:  # one stratum holds every cluster: the draw is the cluster index itself
            yield rng.integers(0, clusters.n_clusters, size=(r, clusters.n_clusters))
        else:
            yield np.concatenate([m[rng.integers(0, len(m), size=(r, len(m)))] for m in members], axis=1)


def resample_weights(clusters: Clusters, resamples: int = RESAMPLES, seed: int = SEED) -> Iterator[np.ndarray]:
    """Chunks of (r, n) float row multiplicities: the same resamples :func:`resample_indices` yields.

    Each chunk is the transpose of a C-contiguous (n, r) array, so per-row gathers stay contiguous copies.
    """
    identity = np.array_equal(clusters.row_cluster, np.arange(clusters.n_rows))  # one image per cluster, in order
    for drawn in _draws(clusters, resamples, seed):
        r = len(drawn)
        # count of draws of (cluster k, resample j) at k * r + j: a (n_clusters, r) table
        counts = np.bincount((drawn * r + np.arange(r)[:, None]).ravel(), minlength=clusters.n_clusters * r)
        counts = counts.reshape(clusters.n_clusters, r).astype(np.float64)
        yield (counts if identity else counts[clusters.row_cluster]).T


def resample_indices(clusters: Clusters, resamples: int = RESAMPLES, seed: int = SEED) -> Iterator[np.ndarray]:
    """Row indices of each resample: all rows of every drawn cluster (so resamples may differ in length)."""
    for drawn in _draws(clusters, resamples, seed):
        for one in drawn:
            yield _expand(clusters, one)


def _expand(clusters: Clusters, drawn: np.ndarray) -> np.ndarray:
    starts = clusters.offsets[drawn]
    lengths = clusters.offsets[drawn + 1] - starts
    ends = np.cumsum(lengths)
    # position p of the output belongs to drawn cluster j with ends[j-1] <= p < ends[j]: its row is starts[j] + p - ends[j-1]
    return clusters.rows[np.arange(ends[-1]) - np.repeat(ends - lengths - starts, lengths)]


def _ci(
    point: float, values: np.ndarray, failed: int, clusters: Clusters, resamples: int, seed: int, level: float
) -> dict:
    if len(values) == 0:
        raise FmcacheError("every bootstrap resample left the statistic undefined; the test split is too small")
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return {
        "point": float(point),
        "low": float(low),
        "high": float(high),
        "level": level,
        "unit": clusters.unit,
        "n": clusters.n_rows,
        "n_clusters": clusters.n_clusters,
        "n_strata": clusters.n_strata,
        "resamples": resamples,
        "failed": failed,
        "seed": seed,
    }


def _split(values: np.ndarray) -> tuple[np.ndarray, int]:
    ok = np.isfinite(values)
    return values[ok], int(np.sum(~ok))


def bootstrap_values(fn: Callable[[np.ndarray], float], clusters: Clusters, resamples: int, seed: int) -> np.ndarray:
    """``fn`` on every resample's row indices; NaN where it raised :class:`FmcacheError` (undefined)."""
    values = np.empty(resamples)
    for r, index in enumerate(resample_indices(clusters, resamples, seed)):
        try:
            values[r] = fn(index)
        except FmcacheError:
            values[r] = np.nan
    return values


def weighted_values(fn_w: WeightedFn, clusters: Clusters, resamples: int, seed: int) -> np.ndarray:
    """``fn_w`` on every chunk of resample weights, concatenated: (resamples,), NaN where undefined."""
    return np.concatenate([np.asarray(fn_w(w), dtype=np.float64) for w in resample_weights(clusters, resamples, seed)])


def bootstrap_ci(
    fn: Callable[[np.ndarray], float],
    clusters: Clusters,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict:
    """Percentile CI of ``fn(row index) -> float`` over cluster resamples.

    Returns ``{point, low, high, level, unit, n, n_clusters, n_strata, resamples, failed, seed}``; a resample where
    ``fn`` raises :class:`FmcacheError` or returns NaN is dropped and counted in ``failed``.
    """
    point = fn(np.arange(clusters.n_rows))
    values, failed = _split(bootstrap_values(fn, clusters, resamples, seed))
    return _ci(point, values, failed, clusters, resamples, seed, level)


def bootstrap_ci_weights(
    fn_w: WeightedFn, clusters: Clusters, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> dict:
    """:func:`bootstrap_ci` for a vectorised statistic ``fn_w((r, n) row weights) -> (r,)``, NaN where undefined.

    The point estimate is ``fn_w`` at weight 1 for every row. Same seed, same resamples as :func:`bootstrap_ci`.
    """
    point = float(np.asarray(fn_w(np.ones((1, clusters.n_rows))))[0])
    if not np.isfinite(point):
        raise FmcacheError("the statistic is undefined on the full test split")
    values, failed = _split(weighted_values(fn_w, clusters, resamples, seed))
    return _ci(point, values, failed, clusters, resamples, seed, level)


def _paired(delta: float, values: np.ndarray, clusters: Clusters, resamples: int, seed: int, level: float) -> dict:
    """CI of a difference and its two-sided bootstrap p-value, as :func:`fmcache.report.stats.paired_bootstrap`."""
    kept, failed = _split(values)
    out = _ci(delta, kept, failed, clusters, resamples, seed, level)
    # p from the bootstrap distribution shifted to zero mean: never 0, and 1 for identical runs
    extreme = int(np.sum(np.abs(kept - delta) >= abs(delta) - 1e-12))
    out["delta"] = out.pop("point")
    out["p_value"] = (1 + extreme) / (len(kept) + 1)
    return out


def paired_bootstrap(
    fn_a: Callable[[np.ndarray], float],
    fn_b: Callable[[np.ndarray], float],
    clusters: Clusters,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict:
    """Paired test of ``fn_a − fn_b`` (two runs scored on the same resampled rows): ``{delta, low, high, p_value, …}``."""
    everything = np.arange(clusters.n_rows)
    delta = fn_a(everything) - fn_b(everything)

    def diff(index: np.ndarray) -> float:
        return fn_a(index) - fn_b(index)

    return _paired(delta, bootstrap_values(diff, clusters, resamples, seed), clusters, resamples, seed, level)


def paired_bootstrap_weights(
    fn_a: WeightedFn,
    fn_b: WeightedFn,
    clusters: Clusters,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict:
    """:func:`paired_bootstrap` for vectorised statistics (see :func:`bootstrap_ci_weights`)."""
    ones = np.ones((1, clusters.n_rows))
    delta = float(np.asarray(fn_a(ones))[0] - np.asarray(fn_b(ones))[0])
    values = weighted_values(lambda w: np.asarray(fn_a(w)) - np.asarray(fn_b(w)), clusters, resamples, seed)
    return _paired(delta, values, clusters, resamples, seed, level)


# ---------------------------------------------------------------------------------------------------------------
# The paper metrics on resample weights


def weighted_auc(labels: np.ndarray, scores: np.ndarray) -> WeightedFn:
    """``fn_w(weights) -> (r,)``: ROC-AUC of ``scores`` ((n,), or (n_seeds, n) for the mean over seeds) against
    0/1 ``labels`` (NaN rows left out), ties counting half; NaN where a resample holds one class.

    The AUC of a weighted resample is Σ w_i w_j [s_i > s_j] (+ ½ at ties) over positive i, negative j, divided by
    W_pos·W_neg. Here the smaller class is sorted once per seed; a call takes its cumulative weights (the weight
    below each score) and collects them at each other-class row with one sparse product. The seeds share the
    denominator, so their AUCs are summed before dividing.
    """
    y = np.asarray(labels, dtype=np.float64)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    small_is_pos = len(pos) <= len(neg)
    small, large = (pos, neg) if small_is_pos else (neg, pos)
    tables = [_BelowTable(small, row[small], row[large]) for row in s]
    starts = np.cumsum([0] + [t.size for t in tables])
    # one 1 per (seed, large-class row), at the table row holding that row's small-class weight below
    rows = np.concatenate([start + t.index for start, t in zip(starts, tables, strict=False)])
    lookup = sparse.csr_matrix(
        (np.ones(len(rows)), (rows, np.tile(np.arange(len(large)), len(s)))), shape=(starts[-1], len(large))
    )

    def auc(w: np.ndarray) -> np.ndarray:
        wt = _rows_first(w)
        w_large = wt[large]
        below = np.empty((starts[-1], wt.shape[1]))
        for start, table in zip(starts, tables, strict=False):
            table.fill(wt, below[start : start + table.size])
        cross = np.einsum("ij,ij->j", lookup @ w_large, below)  # Σ seeds, large rows: w_j × weight below s_j
        pairs = below[len(small)] * w_large.sum(axis=0)  # the first table's last cumulative weight: W_small
        wins = len(s) * pairs - cross if small_is_pos else cross  # positive-over-negative weight, all seeds
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, wins / (len(s) * pairs), np.nan)

    return auc


class _BelowTable:
    """For one seed: the small class's cumulative weights in score order (m + 1 rows: weight below each rank), then
    one row per run of tied small-class scores that some large-class row ties with (the run's midpoint: ties count
    half). ``index`` gives each large-class row its table row."""

    def __init__(self, small: np.ndarray, small_scores: np.ndarray, large_scores: np.ndarray):
        order = np.argsort(small_scores, kind="stable")
        self.rows = small[order]
        ranked = small_scores[order]
        lo = np.searchsorted(ranked, large_scores, side="left")
        hi = np.searchsorted(ranked, large_scores, side="right")
        tied = lo != hi
        runs, run_of = np.unique(np.stack([lo[tied], hi[tied]]), axis=1, return_inverse=True)
        self.run_lo, self.run_hi = runs
        self.index = lo.copy()
        self.index[tied] = len(small) + 1 + run_of.ravel()
        self.size = len(small) + 1 + runs.shape[1]

    def fill(self, wt: np.ndarray, out: np.ndarray) -> None:
        m = len(self.rows)
        out[0] = 0.0
        np.cumsum(wt[self.rows], axis=0, out=out[1 : m + 1])
        out[m + 1 :] = (out[self.run_lo] + out[self.run_hi]) / 2


def _rows_first(w: np.ndarray) -> np.ndarray:
    """(n, r) C-contiguous view of (r, n) weights: gathering rows of it is a fast contiguous copy."""
    wt = np.asarray(w, dtype=np.float64).T
    return wt if wt.flags.c_contiguous else np.ascontiguousarray(wt)


def _weighted_mean_auc(labels: np.ndarray, scores: np.ndarray) -> WeightedFn:
    """Seed-mean of the mean AUC over label columns, skipping a column with one class in the resample (as
    :func:`fmcache.metrics.mean_auc`). Which columns are skipped depends on the labels only, so the seed mean of
    the label mean is the label mean of each column's seed-mean AUC."""
    columns = [weighted_auc(labels[:, c], scores[:, :, c]) for c in range(labels.shape[1])]

    def mean_auc(w: np.ndarray) -> np.ndarray:
        per_label = np.stack([col(w) for col in columns], axis=1)
        scored = np.sum(np.isfinite(per_label), axis=1)
        with np.errstate(invalid="ignore"):
            return np.where(scored > 0, np.nansum(per_label, axis=1) / np.maximum(scored, 1), np.nan)

    return mean_auc


def _one_hot(index: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((len(index), width))
    out[np.arange(len(index)), index] = 1.0
    return out


def _weighted_single_label(metric: str, y: np.ndarray, scores: np.ndarray) -> WeightedFn:
    """One seed's single-label metric on weights; the per-resample counts come from one matrix product."""
    n_classes = scores.shape[1]
    predicted = np.argmax(scores, axis=1)
    truth = _one_hot(y, n_classes)
    if metric == "accuracy":
        correct = (predicted == y).astype(np.float64)
        return lambda w: (w @ correct) / w.sum(axis=1)
    if metric == "macro_recall":
        columns = np.concatenate([truth, truth * (predicted == y)[:, None]], axis=1)
        return lambda w: _macro_recall(w @ columns, n_classes)
    if metric == "qwk":
        cells = _one_hot(y * n_classes + predicted, n_classes * n_classes)
        return lambda w: _kappa((w @ cells).reshape(len(w), n_classes, n_classes))
    raise FmcacheError(f"metric {metric!r} has no single-label form; use one of qwk, auc, macro_recall, accuracy")


def _macro_recall(counts: np.ndarray, n_classes: int) -> np.ndarray:
    support, hits = counts[:, :n_classes], counts[:, n_classes:]
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, 0.0)
    return recall.sum(axis=1) / np.sum(support > 0, axis=1)


def _kappa(observed: np.ndarray) -> np.ndarray:
    """Quadratic-weighted kappa of each (C, C) confusion matrix in ``observed``; NaN where undefined."""
    n_classes = observed.shape[1]
    grade = np.arange(n_classes, dtype=np.float64)
    cost = (grade[:, None] - grade[None, :]) ** 2
    expected = (
        observed.sum(axis=2)[:, :, None] * observed.sum(axis=1)[:, None, :] / observed.sum(axis=(1, 2))[:, None, None]
    )
    denominator = np.einsum("rij,ij->r", expected, cost)
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = 1.0 - np.einsum("rij,ij->r", observed, cost) / denominator
    return np.where(denominator > 0, kappa, np.nan)


def weighted_metric(metric: str, pred: Predictions) -> WeightedFn:
    """``fn_w(weights) -> (r,)``: the seed-mean paper ``metric`` on each weighted resample, NaN where undefined.

    Equals :func:`fmcache.report.stats.seed_mean` on the expanded resample (a resample where any seed's metric is
    undefined is NaN, as ``seed_mean`` raises). Inputs are checked once by :func:`fmcache.metrics.evaluate`.
    """
    metric = metrics.check_metric(metric)
    scores = np.asarray(pred.scores, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[1] != len(pred.labels):
        raise FmcacheError(f"scores must be (n_seeds, {len(pred.labels)}, C), got shape {scores.shape}")
    metrics.evaluate(metric, pred.labels, scores[0], pred.multilabel)  # raises one clear line on bad input
    if pred.multilabel:
        return _weighted_mean_auc(np.asarray(pred.labels, dtype=np.float64), scores)
    y = np.asarray(pred.labels).astype(np.int64)
    if metric == "auc":  # evaluate checked that there are 2 classes
        return weighted_auc(y, scores[:, :, 1])
    per_seed = [_weighted_single_label(metric, y, s) for s in scores]

    def seed_mean_w(w: np.ndarray) -> np.ndarray:
        return np.mean(np.stack([fn(w) for fn in per_seed]), axis=0)  # NaN in any seed stays NaN

    return seed_mean_w


def metric_ci(
    metric: str,
    pred: Predictions,
    clusters: Clusters | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict:
    """Percentile CI of the seed-mean test ``metric`` (the table's number) over cluster resamples.

    ``clusters`` default to one per image. The point is :func:`fmcache.report.stats.seed_mean`; the result is that
    of :func:`bootstrap_ci` plus ``metric``.
    """
    clusters = make_clusters(len(pred.labels), labels=pred.labels) if clusters is None else clusters
    check_rows(clusters, pred)
    point = seed_mean(metric, pred)
    values, failed = _split(weighted_values(weighted_metric(metric, pred), clusters, resamples, seed))
    return {**_ci(point, values, failed, clusters, resamples, seed, level), "metric": metric}


def paired_metric_test(
    metric: str,
    a: Predictions,
    b: Predictions,
    clusters: Clusters | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict:
    """Paired cluster bootstrap of seed-mean ``metric`` A − B on the same test rows: ``{delta, low, high, p_value, …}``.

    ``a`` and ``b`` must hold the same ids in the same order (:func:`fmcache.report.stats.align` them first, and
    give the cluster ids in that order).
    """
    if not np.array_equal(a.ids, b.ids):
        raise FmcacheError("the two runs' test ids differ or are in another order; align them first (stats.align)")
    if not np.array_equal(np.asarray(a.labels, float), np.asarray(b.labels, float), equal_nan=True):
        raise FmcacheError("the two runs disagree on the labels of the same test ids; they are not the same split")
    clusters = make_clusters(len(a.labels), labels=a.labels) if clusters is None else clusters
    check_rows(clusters, a)
    delta = seed_mean(metric, a) - seed_mean(metric, b)
    fa, fb = weighted_metric(metric, a), weighted_metric(metric, b)
    values = weighted_values(lambda w: fa(w) - fb(w), clusters, resamples, seed)
    return {**_paired(delta, values, clusters, resamples, seed, level), "metric": metric}


def per_seed_values(
    metric: str, pred: Predictions, clusters: Clusters, resamples: int = RESAMPLES, seed: int = SEED
) -> np.ndarray:
    """(resamples, n_seeds): each seed's ``metric`` on the cluster resamples (NaN where undefined), every seed on
    the same resamples, drawn once. A row's seed mean is the value :func:`metric_ci` bootstraps (equal up to
    rounding), so one draw serves a result's CI, its paired tests (:func:`paired_from_values`) and its rank
    interval (:func:`fmcache.report.ranking.ranking_from_values`)."""
    check_rows(clusters, pred)
    fns = [weighted_metric(metric, Predictions(pred.ids, pred.labels, s[None])) for s in pred.scores]
    chunks = [
        np.stack([np.asarray(fn(w), dtype=np.float64) for fn in fns], axis=1)
        for w in resample_weights(clusters, resamples, seed)
    ]
    return np.concatenate(chunks)


def ci_from_values(
    point: float,
    values: np.ndarray,
    clusters: Clusters,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict:
    """The CI of :func:`bootstrap_ci` from bootstrap ``values`` (resamples,) drawn on ``clusters`` with
    ``resamples`` and ``seed`` (NaN = undefined: dropped and counted in ``failed``)."""
    kept, failed = _split(np.asarray(values, dtype=np.float64))
    return _ci(point, kept, failed, clusters, resamples, seed, level)


def paired_from_values(
    delta: float,
    values: np.ndarray,
    clusters: Clusters,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict:
    """The paired test of :func:`paired_bootstrap` from the bootstrap differences ``values`` (A − B on the same
    resamples of ``clusters``) and the full-sample difference ``delta``."""
    return _paired(float(delta), np.asarray(values, dtype=np.float64), clusters, resamples, seed, level)


def check_rows(clusters: Clusters, pred: Predictions) -> None:
    """Raise unless ``clusters`` cover exactly the rows of ``pred``."""
    if clusters.n_rows != len(pred.labels):
        raise FmcacheError(f"the clusters cover {clusters.n_rows} rows but the predictions hold {len(pred.labels)}")
