"""Bootstrap confidence intervals and paired bootstrap tests of the table cells, from the saved test predictions.

One bootstrap serves the package: these are :mod:`fmcache.report.resampling`'s (clustered, stratified by class,
vectorised), here at the image level unless the caller gives cluster ids. The statistic is the one the tables
report: the dataset's metric on the test split, averaged over the seeds that were run (a resample draws the same
test samples for every seed). A resample on which the metric is undefined (an AUC whose resample holds one class)
is dropped and counted, never scored 0.5. :mod:`fmcache.report.evidence` computes the report's CIs at each
result's unit (patient, lesion, ... from ``test_groups``).

``Predictions``, ``load_predictions``, ``seed_mean`` and ``align`` live in :mod:`fmcache.report.predictions` and are
named here too.
"""

from __future__ import annotations

import numpy as np

from fmcache.errors import FmcacheError
from fmcache.report.predictions import (
    LEVEL,
    RESAMPLES,
    SEED,
    Predictions,
    align,
    load_predictions,
    load_splits,
    seed_mean,
)
from fmcache.report.resampling import make_clusters, metric_ci, paired_metric_test

__all__ = [
    "LEVEL",
    "RESAMPLES",
    "SEED",
    "Predictions",
    "align",
    "bootstrap_ci",
    "load_predictions",
    "load_splits",
    "paired_bootstrap",
    "seed_mean",
]


def bootstrap_ci(
    metric: str,
    pred: Predictions,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
    cluster_ids: np.ndarray | None = None,
    unit: str | None = None,
) -> dict:
    """Percentile bootstrap CI of the seed-mean test metric (:func:`fmcache.report.resampling.metric_ci`):
    ``{point, low, high, unit, n, n_clusters, resamples, failed, ...}``; image level without ``cluster_ids``."""
    if len(pred.ids) == 0:
        raise FmcacheError("no test predictions to bootstrap")
    clusters = make_clusters(len(pred.labels), cluster_ids, unit, labels=pred.labels)
    return metric_ci(metric, pred, clusters, resamples, seed, level)


def paired_bootstrap(
    metric: str, a: Predictions, b: Predictions, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> dict:
    """Paired bootstrap test of A against B on their common test ids, image level
    (:func:`fmcache.report.resampling.paired_metric_test`; :mod:`fmcache.report.evidence` pairs at the unit).

    Each resample draws test ids once and scores both runs on them, so the difference keeps the pairing. The
    p-value is two-sided for "no difference", from the bootstrap distribution of the difference shifted to zero
    mean: p = (1 + #{|d_b − d| ≥ |d|}) / (B + 1), which is never 0 and is 1 for identical runs.
    """
    a, b = align(a, b)
    return paired_metric_test(metric, a, b, None, resamples, seed, level)
