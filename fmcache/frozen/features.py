"""Stage two's feature selection: which layers, which pooled kind, read once per split from the cache.

Every protocol in :mod:`fmcache.frozen` resolves ``--layer`` and ``--pool`` here, so they mean the same in each.
"""

from __future__ import annotations

import numpy as np

from fmcache.cache.reader import CacheReader
from fmcache.errors import FmcacheError


def resolve_layers(reader: CacheReader, layer: str | int) -> list[int]:
    if str(layer) == "all":
        return list(range(1, reader.num_layers + 1))
    return [reader.resolve_layer(layer)]


def resolve_pool(reader: CacheReader, pool: str, layers: list[int]) -> list[str]:
    """Pooled kinds to read; ``cls+mean`` concatenates both.

    ``auto`` is the model's paper feature. For a model whose paper feature is the backend's own pooled output
    (CLIP's projection, CoCa's pooler), that exists at the last layer only, so a per-layer request uses the CLS
    token (or the mean where there is none) at every layer, keeping the curve one kind of feature.
    """
    last_only = layers == [reader.num_layers]
    if pool == "auto":
        kind = reader.manifest["model"]["pooled_kind"]
        if kind in ("cls", "mean"):
            return [kind]
        if kind == "pooled":
            return ["paper"] if last_only else ["cls" if "cls" in reader.pools else "mean"]
        raise FmcacheError(f"cache {reader.path} records an unknown pooled kind '{kind}'; extract it again")
    parts = pool.split("+")
    for part in parts:
        if part not in ("cls", "mean", "paper"):
            raise FmcacheError(f"unknown --pool '{pool}'; use auto, cls, mean, paper or cls+mean")
    if "paper" in parts and not last_only:
        raise FmcacheError(
            f"the paper pooled feature exists for the last layer ({reader.num_layers}) only; "
            "use --pool cls or mean for other layers"
        )
    return parts


class FeatureSource:
    """Pooled features per (split, layer) for the requested kinds.

    With several layers, each split's (n, L, D) stack is read once and kept in its stored dtype when it fits in
    a quarter of the available memory; otherwise each layer is read on its own (bounded memory, more I/O).
    """

    def __init__(self, reader: CacheReader, layers: list[int], pools: list[str]):
        import psutil

        self.reader, self.layers, self.pools = reader, layers, pools
        needed = sum(reader.pooled_nbytes(k) for k in pools if k != "paper")
        self.keep = len(layers) > 1 and needed < psutil.virtual_memory().available / 4
        self._stacks: dict[tuple[str, str], np.ndarray] = {}

    def _layer(self, split: str, layer: int, kind: str) -> np.ndarray:
        if kind == "paper" or not self.keep:
            return self.reader.pooled(split, layer, kind)
        if (split, kind) not in self._stacks:
            self._stacks[(split, kind)] = self.reader.pooled_stack(split, kind)
        return self._stacks[(split, kind)][:, layer - 1, : self.reader.layer_dims[layer - 1]].astype(np.float32)

    def get(self, split: str, layer: int) -> np.ndarray:
        parts = [self._layer(split, layer, kind) for kind in self.pools]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def train_stats(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float64) of the train split's features, for z-scoring every split alike."""
    train = train.astype(np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std < 1e-12] = 1.0  # constant features (e.g. zero padding) stay constant rather than blow up
    return mean, std


def standardize_splits(data: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Z-score every split with the first (train) split's mean and std, computed in float64."""
    mean, std = train_stats(data[0][0])
    return [(((x - mean) / std).astype(np.float32), y) for x, y in data]
