"""Sanity reference for the linear probe (``fmcache probe --sklearn``): scikit-learn's ``LogisticRegression``.

A different model from the batched grid of :mod:`fmcache.frozen.linear` (lbfgs on the whole train split, C instead
of an LR), fitted beside it so a user can see that the probe's numbers are in the expected range.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fmcache import metrics
from fmcache.errors import FmcacheError


def fit_sklearn_reference(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    metric: str = "accuracy",
    num_classes: int | None = None,
    Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    max_iter: int = 5000,
) -> dict:
    """Sanity reference: scikit-learn ``LogisticRegression`` (lbfgs, no feature scaling) over ``Cs``.

    Single-label only (a multi-label reference would be a different model, one-vs-rest, so it is
    refused). The best C maximises the val ``metric``. Returns ``{"metric", "best_C", "val_by_C": {C:
    value}, "val": best val value, "test": metrics.evaluate dict at best C, "value": test value}``.
    """
    from sklearn.linear_model import LogisticRegression

    metrics.check_metric(metric)
    train_y = np.asarray(train_y)
    if train_y.ndim != 1:
        raise FmcacheError("the scikit-learn reference is single-label only; use the probe for multi-label data")
    num_classes = int(num_classes or max(np.max(train_y), np.max(val_y), np.max(test_y)) + 1)
    val_by_c, models = {}, {}
    for c in Cs:
        model = LogisticRegression(C=c, max_iter=max_iter).fit(train_x, train_y)
        models[c] = model
        val_by_c[c] = metrics.evaluate(metric, val_y, _full_proba(model, val_x, num_classes), False)["value"]
    best_c = max(Cs, key=lambda c: val_by_c[c])  # first C on ties
    test = metrics.evaluate(metric, test_y, _full_proba(models[best_c], test_x, num_classes), False)
    return {
        "metric": metric,
        "best_C": best_c,
        "val_by_C": val_by_c,
        "val": val_by_c[best_c],
        "test": test,
        "value": test["value"],
    }


def _full_proba(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    # Classes absent from train get probability 0, so columns stay aligned with class indices.
    proba = np.zeros((len(x), num_classes))
    proba[:, model.classes_.astype(np.int64)] = model.predict_proba(x)
    return proba
