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
    """Pooled features per (split, layer) for the requested kinds, read one layer at a time.

    A cache whose pooled datasets are chunked per layer (:mod:`fmcache.cache.shards`) reads each layer on its own,
    so memory holds one layer, whatever the number of layers. An older cache (chunks of every layer) would read
    every layer's bytes for each one, so with several layers its (n, L, D) stack is read once per split and kept in
    the stored dtype when it fits in a quarter of the available memory (else each layer is read on its own:
    bounded memory, more I/O).
    """

    def __init__(self, reader: CacheReader, layers: list[int], pools: list[str]):
        import psutil

        self.reader, self.layers, self.pools = reader, layers, pools
        self.stacked = [k for k in pools if k != "paper" and not reader.layer_chunked(k)]
        needed = sum(reader.pooled_nbytes(k) for k in self.stacked)
        self.keep = len(layers) > 1 and bool(self.stacked) and needed < psutil.virtual_memory().available / 4
        self._stacks: dict[tuple[str, str], np.ndarray] = {}

    def _layer(self, split: str, layer: int, kind: str) -> np.ndarray:
        if not self.keep or kind not in self.stacked:
            return self.reader.pooled(split, layer, kind)
        if (split, kind) not in self._stacks:
            self._stacks[(split, kind)] = self.reader.pooled_stack(split, kind)
        return self._stacks[(split, kind)][:, layer - 1, : self.reader.layer_dims[layer - 1]].astype(np.float32)

    def get(self, split: str, layer: int) -> np.ndarray:
        parts = [self._layer(split, layer, kind) for kind in self.pools]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


# Rows per block when computing statistics and z-scores: one float64 temporary of a block (64 MB at 1,024-d), not
# float64 copies of a whole split (1.5 GB each for CheXpert's train split at 1,024-d).
_BLOCK_ROWS = 1 << 13


def train_stats(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float64) of the train split's features, for z-scoring every split alike.

    Summed in float64 over blocks of rows (two passes: the mean, then squared deviations from it), so memory holds
    one float64 block; for a split of at most one block the result is bit-identical to numpy's mean and std.
    """
    n = len(train)
    total = np.zeros(train.shape[1:], np.float64)
    for start in range(0, n, _BLOCK_ROWS):
        total += train[start : start + _BLOCK_ROWS].astype(np.float64).sum(axis=0)
    mean = total / n
    squares = np.zeros_like(total)
    for start in range(0, n, _BLOCK_ROWS):
        dev = train[start : start + _BLOCK_ROWS].astype(np.float64)
        dev -= mean
        squares += np.multiply(dev, dev, out=dev).sum(axis=0)
    std = np.sqrt(squares / n)
    std[std < 1e-12] = 1.0  # constant features (e.g. zero padding) stay constant rather than blow up
    return mean, std


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """float32 ``(x - mean) / std`` computed in float64 block by block (the same values as in one go)."""
    out = np.empty(x.shape, np.float32)
    for start in range(0, len(x), _BLOCK_ROWS):
        block = x[start : start + _BLOCK_ROWS].astype(np.float64)
        block -= mean
        block /= std
        out[start : start + _BLOCK_ROWS] = block
    return out


def standardize_splits(data: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Z-score every split with the first (train) split's mean and std, computed in float64."""
    mean, std = train_stats(data[0][0])
    return [(standardize(x, mean, std), y) for x, y in data]
