"""The one reader API of stage two: pooled features, streamed tokens, labels and cross-cache alignment.

Stage two never imports a model backend; it only reads what ``fmcache extract`` wrote.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch

from fmcache.cache.manifest import read_manifest
from fmcache.cache.messages import damaged_shard
from fmcache.cache.verify import quick_problems
from fmcache.cache.views import no_views_error, views_k
from fmcache.errors import FmcacheError

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@contextlib.contextmanager
def read_shard(path: Path) -> Iterator[h5py.File]:
    """Open a shard for reading; any HDF5 or OS error inside becomes one line naming the shard and the fix.

    Errors raised by the body that are not about the file (FmcacheError, bugs) pass through unchanged.
    """
    try:
        fh = h5py.File(path, "r")
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise damaged_shard(path, exc) from exc
    try:
        with fh:
            yield fh
    except (OSError, KeyError, RuntimeError) as exc:  # truncated data, a failed checksum, a missing dataset
        raise damaged_shard(path, exc) from exc


def split_code(split: str) -> int:
    if split not in SPLIT_CODES:
        raise FmcacheError(f"unknown split '{split}'; use one of {', '.join(SPLIT_CODES)}")
    return SPLIT_CODES[split]


class CacheReader:
    """Read-only view of one complete cache directory (``cache/<dataset>/<model>/<key12>/``)."""

    def __init__(self, path: str | Path, allow_partial: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FmcacheError(f"no cache at {self.path}; run `fmcache extract` first or check the path (`fmcache ls`)")
        manifest = read_manifest(self.path)
        if manifest is None:
            raise FmcacheError(f"{self.path} has no manifest.json; it is not an fmcache cache (see `fmcache ls`)")
        if manifest.get("status") != "complete" and not allow_partial:
            raise FmcacheError(
                f"cache {self.path} is incomplete ({len(manifest.get('shards', []))} of {manifest.get('num_shards')} "
                "shards); rerun the same `fmcache extract` command to finish it"
            )
        self.manifest = manifest
        self._labels: dict[str, np.ndarray] = {}
        self.files = [self.path / s["file"] for s in manifest["shards"]]
        # one stat per shard: a deleted or truncated file is named now, not deep inside an evaluation
        for file, problem in quick_problems(self.path, manifest):
            raise damaged_shard(self.path / file, problem)

    # -- metadata -------------------------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]["name"]

    @property
    def model(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def multilabel(self) -> bool:
        return bool(self.manifest["dataset"]["multilabel"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["dataset"]["class_names"])

    @property
    def num_layers(self) -> int:
        return int(self.manifest["model"]["num_layers"])

    @property
    def layer_dims(self) -> list[int]:
        return list(self.manifest["model"]["layer_dims"])

    @property
    def pools(self) -> list[str]:
        return list(self.manifest["model"]["pools"])

    @property
    def token_layers(self) -> list[int]:
        return list(self.manifest["model"]["token_layers"])

    def resolve_layer(self, layer: int | str) -> int:
        """1-based layer number from ``last``, ``-1`` style or a number; errors name the valid range."""
        if layer in ("last", -1, "-1"):
            return self.num_layers
        try:
            number = int(layer)
        except (TypeError, ValueError):
            raise FmcacheError(f"bad layer '{layer}'; use last, all or a number 1..{self.num_layers}") from None
        if not 1 <= number <= self.num_layers:
            raise FmcacheError(f"cache {self.path.name} has layers 1..{self.num_layers}; layer {number} does not exist")
        return number

    def _check_pool(self, kind: str) -> None:
        if kind not in self.pools:
            raise FmcacheError(
                f"cache {self.path.name} ({self.model}) has no '{kind}' pooled features; "
                f"available: {', '.join(self.pools)}"
            )

    # -- arrays ---------------------------------------------------------------------------------------------------
    @cached_property
    def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row of the concatenated shards: split code, global id, shard number and row within the shard."""
        splits, ids, where = [], [], []
        for s, path in enumerate(self.files):
            with read_shard(path) as fh:
                # a shard whose every image was skipped (--on-bad-image skip) holds no arrays at all
                splits.append(fh["split"][:] if "ids" in fh else np.zeros(0, np.int8))
                ids.append(fh["ids"][:] if "ids" in fh else np.zeros(0, np.int64))
            where.append(np.stack([np.full(len(ids[-1]), s), np.arange(len(ids[-1]))], axis=1))
        return np.concatenate(splits), np.concatenate(ids), np.concatenate(where)

    def _split_mask(self, split: str) -> np.ndarray:
        """Per concatenated row: does it belong to ``split`` (empty split → error)."""
        wanted = self._index[0] == split_code(split)
        if not wanted.any():
            raise FmcacheError(f"split '{split}' of cache {self.path.name} is empty; check the dataset split / --limit")
        return wanted

    def rows(self, split: str) -> np.ndarray:
        """Indices of the concatenated rows that belong to ``split`` (empty split → error)."""
        return np.flatnonzero(self._split_mask(split))

    def _per_shard(self, split: str, read: Callable[[Path, h5py.File, np.ndarray], np.ndarray]) -> np.ndarray:
        """``read(path, open shard, mask of its rows in split)`` for every shard holding rows of ``split``, joined.

        ``read`` runs with the shard open, so an HDF5 error while reading names the shard (see ``read_shard``).
        """
        wanted = self._split_mask(split)
        parts, start = [], 0
        for path in self.files:
            with read_shard(path) as fh:
                n = fh["ids"].shape[0] if "ids" in fh else 0
                mask = wanted[start : start + n]
                start += n
                if mask.any():
                    parts.append(read(path, fh, mask))
        return np.concatenate(parts)

    def _gather(self, name: str, split: str, select: tuple = ()) -> np.ndarray:
        # read the shard's whole array contiguously, then select: far faster than fancy indexing
        return self._per_shard(split, lambda _path, fh, mask: fh[name][...][mask][(slice(None), *select)])

    def ids(self, split: str) -> np.ndarray:
        return self._index[1][self.rows(split)]  # already read with the split codes; no shard I/O

    def labels(self, split: str) -> np.ndarray:
        """int64 (n,) class labels, or float32 (n, C) multi-label targets with NaN for unknown.

        Read once per split (stage two asks again for every layer it evaluates); callers must not modify it.
        """
        if split not in self._labels:
            self._labels[split] = self._gather("labels", split)
        return self._labels[split]

    def pooled(self, split: str, layer: int | str = "last", kind: str = "cls") -> np.ndarray:
        """float32 (n, D) pooled features of one layer; ``kind`` is cls, mean or paper (``paper`` has no layer)."""
        self._check_pool(kind)
        if kind == "paper":
            return self._gather("pooled/paper", split).astype(np.float32)
        number = self.resolve_layer(layer)
        dim = self.layer_dims[number - 1]
        return self._gather(f"pooled/{kind}", split, (number - 1, slice(0, dim))).astype(np.float32)

    def pooled_all_layers(self, split: str, kind: str = "cls") -> list[np.ndarray]:
        """Every layer's pooled features for one split, reading the shards once."""
        self._check_pool(kind)
        if kind == "paper":
            raise FmcacheError("the 'paper' pooled feature has no per-layer form; use cls or mean with --layer all")
        stacked = self.pooled_stack(split, kind)
        return [stacked[:, i, :d].astype(np.float32) for i, d in enumerate(self.layer_dims)]

    def pooled_stack(self, split: str, kind: str = "cls") -> np.ndarray:
        """(n, L, D_max) pooled features of every layer in the stored dtype (zero-padded; see ``layer_dims``)."""
        self._check_pool(kind)
        if kind == "paper":
            raise FmcacheError("the 'paper' pooled feature has no per-layer form; use cls or mean with --layer all")
        return self._gather(f"pooled/{kind}", split)

    def pooled_nbytes(self, kind: str = "cls") -> int:
        """Bytes of one pooled kind over all splits, as stored (for memory planning)."""
        rows = len(self._index[0])
        itemsize = 2 if self.manifest.get("dtype") == "fp16" else 4
        return rows * self.num_layers * max(self.layer_dims) * itemsize

    # -- augmented views (schema 2, ``--views K``; train rows only) ------------------------------------------------
    @property
    def views_k(self) -> int:
        """K augmented views per train sample; 0 for a cache without views (every schema-1 cache)."""
        return views_k(self.manifest)

    def _gather_views(self, name: str, select: tuple = ()) -> np.ndarray:
        """(n_train, K, ...) of ``views/<name>``, rows in the order of ``ids("train")``."""
        if not self.views_k:
            raise no_views_error(self.path)

        def read(path: Path, fh: h5py.File, mask: np.ndarray) -> np.ndarray:
            # the group holds exactly the shard's train rows, in row order (fmcache verify checks the ids)
            data, m = fh[f"views/{name}"][...], int(mask.sum())
            if len(data) != m:
                raise damaged_shard(path, f"views/{name} has {len(data)} rows, the shard {m} train rows")
            return data[(slice(None), slice(None), *select)]

        return self._per_shard("train", read)

    def views_pooled(self, layer: int | str = "last", kind: str = "cls") -> np.ndarray:
        """float32 (n_train, K, D) pooled features of the K augmented views of every train sample (one layer)."""
        self._check_pool(kind)
        if kind == "paper":
            return self._gather_views("pooled/paper").astype(np.float32)
        number = self.resolve_layer(layer)
        dim = self.layer_dims[number - 1]
        return self._gather_views(f"pooled/{kind}", (number - 1, slice(0, dim))).astype(np.float32)

    def view_tokens(self, layer: int | str) -> ViewTokenDataset:
        """Streams the token maps of the train views; item ``i * K + v`` is view v of train sample i."""
        number = self.resolve_layer(layer)
        if not self.views_k:
            raise no_views_error(self.path)
        self.tokens("train", number)  # the same checks: the layer's tokens were cached
        return ViewTokenDataset(self, number)

    def tokens(self, split: str, layer: int | str) -> TokenDataset:
        number = self.resolve_layer(layer)
        if number not in self.token_layers:
            raise FmcacheError(
                f"cache {self.path.name} holds tokens for layers {self.token_layers or 'none'}, not {number}; "
                "extract again with --tokens including it"
            )
        return TokenDataset(self, split, number)


class TokenDataset(torch.utils.data.Dataset):
    """Streams (tokens (T, D) float32, label, id) for one split and layer.

    HDF5 handles are opened lazily per process (h5py handles are not fork-safe), and each item is one contiguous
    read of a single sample.
    """

    def __init__(self, reader: CacheReader, split: str, layer: int):
        self.files = [str(f) for f in reader.files]
        self.name = f"tokens/layer_{layer:02d}"
        rows = reader.rows(split)
        self.where = reader._index[2][rows]
        self.labels = reader.labels(split)
        self.ids = reader.ids(split)
        self._handles: dict[int, h5py.File] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.where)

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = h5py.File(self.files[shard], "r")
        return self._handles[shard]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        shard, row = self.where[i]
        try:
            tokens = self._file(int(shard))[self.name][int(row)]
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise damaged_shard(Path(self.files[int(shard)]), exc) from exc
        return torch.from_numpy(tokens.astype(np.float32)), torch.as_tensor(self.labels[i]), int(self.ids[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}, "_pid": -1}


class ViewTokenDataset(TokenDataset):
    """Streams (tokens (T, D) float32, label, id) of the train views of one layer; item ``i * K + v`` is view v of
    train sample i (the order of ``ids("train")``), one contiguous read each."""

    def __init__(self, reader: CacheReader, layer: int):
        super().__init__(reader, "train", layer)
        self.name, self.k = f"views/tokens/layer_{layer:02d}", reader.views_k
        # a train row's place in its shard's views group: how many train rows of that shard come before it
        shards = self.where[:, 0]
        rank = np.arange(len(shards)) - np.searchsorted(shards, shards, side="left")
        self.where = np.stack([shards, rank], axis=1)

    def __len__(self) -> int:
        return len(self.where) * self.k

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        i, view = divmod(int(j), self.k)
        shard, row = self.where[i]
        try:
            tokens = self._file(int(shard))[self.name][int(row), view]
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise damaged_shard(Path(self.files[int(shard)]), exc) from exc
        return torch.from_numpy(tokens.astype(np.float32)), torch.as_tensor(self.labels[i]), int(self.ids[i])


def align(a: CacheReader, b: CacheReader, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``a.ids(split)`` and ``b.ids(split)`` of the samples both caches hold, in the same order."""
    if a.dataset != b.dataset or a.manifest["dataset"]["fingerprint"] != b.manifest["dataset"]["fingerprint"]:
        raise FmcacheError(
            f"caches {a.path} and {b.path} were extracted from different datasets/files; they cannot be aligned"
        )
    ids_a, ids_b = a.ids(split), b.ids(split)
    common, pos_a, pos_b = np.intersect1d(ids_a, ids_b, assume_unique=True, return_indices=True)
    if common.size == 0:
        raise FmcacheError(f"caches {a.path.name} and {b.path.name} share no samples in split '{split}'")
    return pos_a, pos_b
