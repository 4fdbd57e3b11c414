"""Training frozen heads on cached augmented views (``extract --views K``).

Every epoch, every train sample uses one of its K cached views, drawn by a generator seeded per (head seed, epoch):
over E epochs a head sees each view about E / K times, as the seed's frozen runs see E fresh augmentations. Val and
test stay center crops. The choice depends on nothing else (not the LR, the batch or the other heads), so the heads
of one seed see the same views, as they see the same data order.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fmcache.cache.reader import CacheReader
from fmcache.cache.views import no_views_error
from fmcache.choices import VIEW_MODES
from fmcache.errors import FmcacheError


def use_views(reader: CacheReader, mode: str | None) -> bool:
    """``--views``: None (default) is on when the cache has views; ``on`` without views is an error."""
    if mode is None or mode == "auto":
        return reader.views_k > 0
    if mode not in VIEW_MODES:
        raise FmcacheError(f"unknown --views '{mode}'; use on or off")
    if mode == "on" and not reader.views_k:
        raise no_views_error(reader.path)
    return mode == "on"


def epoch_views(seed: int, epoch: int, n: int, k: int) -> torch.Tensor:
    """(n,) int64 view index in 0..k-1 of each train sample for the heads of ``seed`` in 0-based ``epoch``."""
    # hashed rather than ``seed + epoch``: seed 0 at epoch 1 and seed 1 at epoch 0 must not draw the same views
    digest = hashlib.sha256(f"fmcache-probe-views:{int(seed)}:{int(epoch)}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randint(k, (n,), generator=generator)


def pooled_views(reader: CacheReader, layer: int, pools: list[str]) -> np.ndarray:
    """float32 (n_train, K, D) views of one layer for the requested kinds (``cls+mean`` concatenates, as centers)."""
    parts = [reader.views_pooled(layer, kind) for kind in pools]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
