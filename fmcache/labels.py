"""Label policies: how a release's raw annotations become the labels a task trains on.

One home for stage one (the loaders apply the default when they build an index) and stage two (a cache keeps the raw
annotations, so ``knn``/``probe``/``finetune --uncertain`` choose the policy without extracting again).

CheXpert-style uncertain observations (CheXpert, MIMIC-CXR: 1 positive, 0 negative, -1 uncertain, blank unmentioned):
- ``zeros`` (U-Zeros, the seed's): -1 and blank → 0, and a row left all zero gets No Finding = 1;
- ``ones`` (U-Ones): -1 → 1, blank → 0;
- ``ignore`` (U-Ignore): -1 → NaN, left out of the loss and the metric; blank → 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fmcache.errors import FmcacheError

UNCERTAIN = ("zeros", "ones", "ignore")
DEFAULT_UNCERTAIN = "zeros"  # the seed's
UNCERTAINTY = "uncertainty"  # the policy kind a cache's annotations name (CheXpert's 14 observations)
NO_FINDING = "No Finding"


def apply_uncertainty(raw: np.ndarray, policy: str, class_names: Sequence[str]) -> np.ndarray:
    """float32 (N, C) labels from raw (N, C) values (1, 0, -1, NaN = blank) under ``policy`` (see the module doc)."""
    if policy not in UNCERTAIN:
        raise FmcacheError(f"unknown --uncertain '{policy}'; use {', '.join(UNCERTAIN)}")
    labels = np.where(np.isnan(raw), 0.0, raw).astype(np.float32)
    if policy == "zeros":
        labels[labels == -1] = 0.0
        if NO_FINDING in class_names:
            labels[(labels == 0).all(axis=1), list(class_names).index(NO_FINDING)] = 1.0
    elif policy == "ones":
        labels[labels == -1] = 1.0
    else:
        labels[labels == -1] = np.nan
    return labels
