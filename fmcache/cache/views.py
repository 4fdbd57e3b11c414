"""Cached augmented views: the ``views/`` group of a shard (schema 2).

A cache extracted with ``--views K`` holds, besides every sample's center crop, K augmented views of every TRAIN
sample. Only train rows have views, so the group has its own row count m (the shard's train rows, in row order):

- ``views/ids`` (m,) int64: the global ids of those rows (equal to ``ids[split == 0]``);
- ``views/pooled/<kind>`` (m, K, L, D) for cls and mean, ``views/pooled/paper`` (m, K, D_p);
- ``views/tokens/layer_XX`` (m, K, T, D) for every ``--tokens`` layer, and ``views/tokens/paper`` with
  ``--tokens paper``.

Val and test rows have no views at all (no zero padding to store or mistake for features).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fmcache.cache.shards import feature_datasets
from fmcache.errors import FmcacheError

GROUP = "views"
IDS = "views/ids"
SEED = 0  # the views seed recorded in the key; view v of sample i is drawn from hash(i, v, SEED)


def views_k(manifest: dict) -> int:
    """K of a cache (0 for a cache without views, including every schema-1 cache)."""
    return int((manifest.get("views") or {}).get("k", 0))


def views_datasets(model: dict, k: int) -> dict[str, tuple[int, ...]]:
    """Name → shape after the row axis of every ``views/`` feature dataset, from the manifest's ``model`` entry."""
    return {f"{GROUP}/{name}": (k, *shape) for name, shape in feature_datasets(model).items()}


def views_batch_arrays(
    parts: list[dict[str, np.ndarray]], ids: list[int], model: dict, k: int, dtype: type
) -> dict[str, np.ndarray]:
    """The ``views/`` arrays of one batch: its view forwards' outputs (rows sample by sample, K each) concatenated
    and reshaped to (m, K, ...). A batch without train images gives zero rows of every dataset, so every shard
    holds every views dataset."""
    out = {IDS: np.asarray(ids, dtype=np.int64)}
    if not parts:
        out.update({name: np.zeros((0, *shape), dtype) for name, shape in views_datasets(model, k).items()})
        return out
    for name in parts[0]:
        joined = np.concatenate([p[name] for p in parts])
        out[f"{GROUP}/{name}"] = joined.reshape(len(ids), k, *joined.shape[1:])
    return out


def no_views_error(path: object) -> FmcacheError:
    return FmcacheError(
        f"cache {path} has no augmented views; extract them with the same `fmcache extract` command plus "
        "--views K (e.g. --views 10), or pass --views off"
    )


def views_nbytes(folder: Path, manifest: dict) -> int | None:
    """Bytes the ``views/`` datasets take on disk over all listed shards; None when a shard cannot be read."""
    import h5py

    total = 0
    for entry in manifest.get("shards", []):
        try:
            with h5py.File(Path(folder) / entry["file"], "r") as fh:
                if GROUP in fh:
                    group = fh[GROUP]
                    sizes: list[int] = []
                    group.visititems(
                        lambda _n, obj, out=sizes: (
                            out.append(obj.id.get_storage_size()) if isinstance(obj, h5py.Dataset) else None
                        )
                    )
                    total += sum(sizes)
        except (OSError, KeyError, RuntimeError, ValueError):  # info must work on a damaged cache too
            return None
    return total
