"""The one reader API of stage two: pooled features, streamed tokens, labels and cross-cache alignment.

Stage two never imports a model backend; it only reads what ``fmcache extract`` wrote.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch

from fmcache.cache.annotations import META, read_annotations
from fmcache.cache.manifest import read_manifest
from fmcache.cache.messages import damaged_shard
from fmcache.cache.shards import token_dataset
from fmcache.cache.verify import is_pixel_manifest, quick_problems
from fmcache.cache.views import no_views_error, views_k
from fmcache.choices import PAPER_TOKENS
from fmcache.errors import FmcacheError
from fmcache.labels import DEFAULT_UNCERTAIN, UNCERTAIN, UNCERTAINTY, apply_uncertainty

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


# A shard's wanted rows are read as one hyperslab from the first to the last of them and masked in memory (one HDF5
# call; h5py's point selection is far slower), unless that span would be larger than this, as for token maps: then
# each run of consecutive rows is read on its own, straight into the output.
_SPAN_BYTES = 64 << 20


def selected_shape(shape: tuple[int, ...], select: tuple) -> tuple[int, ...]:
    """The shape after the row axis of ``ds[(rows, *select)]`` for a dataset of ``shape`` (nothing is allocated)."""
    return np.broadcast_to(np.empty((), np.int8), (1, *shape[1:]))[(slice(None), *select)].shape[1:]


def read_rows(ds: h5py.Dataset, mask: np.ndarray, select: tuple, out: np.ndarray) -> None:
    """``out[...] = ds[mask][(slice(None), *select)]``, reading only the selected part of the wanted rows.

    With ``select`` naming one layer of a (n, L, D) dataset, only that layer's chunks are read where the shard
    stores one layer per chunk; an older shard (chunks of every layer) is read whole but the other layers are
    dropped chunk by chunk inside HDF5, never held.
    """
    rows = np.flatnonzero(mask)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows):
        _read_span(ds, lo, hi, select, out)
        return
    row_bytes = int(np.prod(out.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    if (hi - lo) * row_bytes <= _SPAN_BYTES:
        out[...] = ds[(slice(lo, hi), *select)][rows - lo]
        return
    breaks = np.flatnonzero(np.diff(rows) > 1)
    pos = 0
    for start, stop in zip(rows[np.r_[0, breaks + 1]], rows[np.r_[breaks, len(rows) - 1]] + 1, strict=True):
        _read_span(ds, int(start), int(stop), select, out[pos : pos + stop - start])
        pos += stop - start


def _read_span(ds: h5py.Dataset, lo: int, hi: int, select: tuple, out: np.ndarray) -> None:
    if out.dtype == ds.dtype and out.flags.c_contiguous:
        ds.read_direct(out, source_sel=(slice(lo, hi), *select))  # no temporary copy
    else:
        out[...] = ds[(slice(lo, hi), *select)]  # e.g. fp16 → float32 while copying


class CacheReader:
    """Read-only view of one complete cache directory (``cache/<dataset>/<model>/<key12>/``)."""

    def __init__(self, path: str | Path, allow_partial: bool = False, uncertain: str | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FmcacheError(f"no cache at {self.path}; run `fmcache extract` first or check the path (`fmcache ls`)")
        manifest = read_manifest(self.path)
        if manifest is None:
            raise FmcacheError(f"{self.path} has no manifest.json; it is not an fmcache cache (see `fmcache ls`)")
        if is_pixel_manifest(manifest):  # fmcache pixels: crops for fine-tuning, no features
            raise FmcacheError(f"{self.path} is a pixel cache (finetune --pixels reads it); give a feature cache")
        if manifest.get("status") != "complete" and not allow_partial:
            raise FmcacheError(
                f"cache {self.path} is incomplete ({len(manifest.get('shards', []))} of {manifest.get('num_shards')} "
                "shards); rerun the same `fmcache extract` command to finish it"
            )
        self.manifest = manifest
        self._labels: dict[str, np.ndarray] = {}
        self.uncertain = self._check_policy(uncertain)
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

    def splits(self) -> list[str]:
        """The splits that hold samples, in train, val, test order (an external set's cache: test only)."""
        present = set(np.unique(self._index[0]).tolist())
        return [name for name, code in SPLIT_CODES.items() if code in present]

    def rows(self, split: str) -> np.ndarray:
        """Indices of the concatenated rows that belong to ``split`` (empty split → error)."""
        return np.flatnonzero(self._split_mask(split))

    def _shard_masks(self, split: str) -> list[tuple[Path, np.ndarray]]:
        """(shard path, mask of its rows in ``split``) for every shard holding rows of ``split`` (no shard I/O)."""
        wanted = self._split_mask(split)
        bounds = np.cumsum([0, *np.bincount(self._index[2][:, 0], minlength=len(self.files))])
        masks = [(path, wanted[lo:hi]) for path, lo, hi in zip(self.files, bounds[:-1], bounds[1:], strict=True)]
        return [(path, mask) for path, mask in masks if mask.any()]

    def _fill(
        self, split: str, name: str, selects: list[tuple], dtype: np.dtype | None = None, views: bool = False
    ) -> list[np.ndarray]:
        """``name``'s rows of ``split``, one array per ``select`` (applied after the row axis), each allocated once
        and filled shard by shard: only the selected part of each shard is read, and nothing is concatenated.

        ``views``: ``name`` lives in the ``views/`` group, which holds exactly the shard's train rows. Each shard is
        read inside ``read_shard``, so an HDF5 error names the shard.
        """
        total = int(self._split_mask(split).sum())
        outs: list[np.ndarray] = []
        pos = 0
        for path, mask in self._shard_masks(split):
            m = int(mask.sum())
            with read_shard(path) as fh:
                ds = fh[name]
                if views:
                    if ds.shape[0] != m:
                        raise damaged_shard(path, f"{name} has {ds.shape[0]} rows, the shard {m} train rows")
                    mask = np.ones(m, bool)
                if not outs:
                    outs = [np.empty((total, *selected_shape(ds.shape, s)), dtype or ds.dtype) for s in selects]
                if len(selects) == 1:
                    read_rows(ds, mask, selects[0], outs[0][pos : pos + m])
                else:  # several parts of the same rows (every layer): the shard's rows are read once
                    block = np.empty((m, *ds.shape[1:]), ds.dtype)
                    read_rows(ds, mask, (), block)
                    for out, select in zip(outs, selects, strict=True):
                        out[pos : pos + m] = block[(slice(None), *select)]
            pos += m
        assert pos == total, "every row of the split is read exactly once"
        return outs

    def _gather(self, name: str, split: str, select: tuple = ()) -> np.ndarray:
        """``name``'s rows of ``split`` in the stored dtype, with ``select`` applied after the row axis."""
        return self._fill(split, name, [select])[0]

    def ids(self, split: str) -> np.ndarray:
        return self._index[1][self.rows(split)]  # already read with the split codes; no shard I/O

    def labels(self, split: str) -> np.ndarray:
        """int64 (n,) class labels, or float32 (n, C) multi-label targets with NaN for unknown, under the reader's
        label policy (``uncertain``: from the raw annotations; the stored labels are the seed's U-Zeros).

        Read once per split (stage two asks again for every layer it evaluates); callers must not modify it.
        """
        if split not in self._labels:
            if self.uncertain is not None and self.uncertain != DEFAULT_UNCERTAIN:
                raw = self.annotation(split, "raw_labels")
                self._labels[split] = apply_uncertainty(raw, self.uncertain, self.annotation_facts["raw_label_names"])
            else:
                self._labels[split] = self._gather("labels", split)
        return self._labels[split]

    FINGERPRINTS = ("content_sha256", "content_dhash")

    def fingerprints(self, split: str) -> dict[str, np.ndarray] | None:
        """The inputs' content fingerprints of ``split`` ((n, 32) uint8 each, :mod:`fmcache.data.fingerprint`), or
        None for a cache extracted before they were stored (transfer's leakage check names the fix)."""
        with h5py.File(self.files[0], "r") as fh:
            if not all(name in fh for name in self.FINGERPRINTS):
                return None
        return {name: self._gather(name, split) for name in self.FINGERPRINTS}

    # -- per-sample annotations (fmcache.cache.annotations): raw labels, units, metadata -----------------------
    @property
    def annotation_facts(self) -> dict:
        """The manifest's ``annotations`` entry; empty for a cache written before 0.4 (its labels are fixed)."""
        return self.manifest.get("annotations") or {}

    @cached_property
    def _annotations(self) -> dict[str, np.ndarray]:
        return read_annotations(self.path, self.annotation_facts) if self.annotation_facts else {}

    def annotation(self, split: str, name: str) -> np.ndarray:
        """An annotations array's rows of ``split``, in the order of :meth:`ids` (a cache before 0.4 has none)."""
        arrays = self._annotations
        if name not in arrays:
            raise FmcacheError(f"cache {self.path} has no {name} annotation; rerun its `fmcache extract` (0.4+)")
        ids = self.ids(split)
        order = np.argsort(arrays["ids"], kind="stable")
        rows = order[np.searchsorted(arrays["ids"], ids, sorter=order)]
        return arrays[name][rows]

    @property
    def group_unit(self) -> str | None:
        return self.annotation_facts.get("group_unit")

    def groups(self, split: str) -> np.ndarray | None:
        """Each sample's independent unit (``patient:00012``, ``image:<id>``), or None for a cache before 0.4."""
        return self.annotation(split, "groups") if "groups" in self._annotations else None

    def metadata(self, split: str) -> dict[str, np.ndarray]:
        """Per-sample metadata columns of ``split`` (empty for a cache before 0.4)."""
        return {n[len(META) :]: self.annotation(split, n) for n in self._annotations if n.startswith(META)}

    @property
    def label_policy(self) -> dict | None:
        """What the results record about the labels: the policy and where it was applied; None when the dataset has
        no label policy."""
        if self.annotation_facts.get("label_policy") == UNCERTAINTY:
            return {"uncertain": self.uncertain or DEFAULT_UNCERTAIN, "applied": "stage two"}
        fixed = (self.manifest.get("inputs", {}).get("dataset", {}).get("options") or {}).get("uncertain")
        return None if fixed is None else {"uncertain": fixed, "applied": "fixed at extraction"}

    def _check_policy(self, uncertain: str | None) -> str | None:
        if uncertain is None:
            return None
        if uncertain not in UNCERTAIN:
            raise FmcacheError(f"unknown --uncertain '{uncertain}'; use {', '.join(UNCERTAIN)}")
        if self.annotation_facts.get("label_policy") != UNCERTAINTY:
            fixed = self.label_policy
            if fixed is not None and fixed["uncertain"] == uncertain:
                return None  # what the cache stores already
            what = (
                "was extracted before 0.4: its labels are fixed at extraction" if fixed else "has no uncertain labels"
            )
            raise FmcacheError(f"--uncertain {uncertain}: cache {self.path} {what}; rerun its `fmcache extract`")
        return uncertain

    def pooled(self, split: str, layer: int | str = "last", kind: str = "cls") -> np.ndarray:
        """float32 (n, D) pooled features of one layer; ``kind`` is cls, mean or paper (``paper`` has no layer)."""
        self._check_pool(kind)
        if kind == "paper":
            return self._fill(split, "pooled/paper", [()], np.float32)[0]
        number = self.resolve_layer(layer)
        dim = self.layer_dims[number - 1]
        # only this layer's bytes are read (all of them, in caches written before per-layer chunks), straight
        # into the one float32 output array
        return self._fill(split, f"pooled/{kind}", [(number - 1, slice(0, dim))], np.float32)[0]

    def pooled_all_layers(self, split: str, kind: str = "cls") -> list[np.ndarray]:
        """Every layer's pooled features for one split, reading the shards once."""
        self._check_pool(kind)
        if kind == "paper":
            raise FmcacheError("the 'paper' pooled feature has no per-layer form; use cls or mean with --layer all")
        selects = [(i, slice(0, d)) for i, d in enumerate(self.layer_dims)]
        return self._fill(split, f"pooled/{kind}", selects, np.float32)

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

    def layer_chunked(self, kind: str = "cls") -> bool:
        """True when each stored chunk of ``pooled/<kind>`` holds one layer (caches written since per-layer chunks),
        so one layer reads without the others; False for older caches, whose chunks hold every layer."""
        self._check_pool(kind)
        if kind == "paper" or self.num_layers == 1:
            return True
        for path in self.files:
            with read_shard(path) as fh:
                if "ids" in fh:
                    chunks = fh[f"pooled/{kind}"].chunks
                    return chunks is not None and chunks[1] == 1
        return True

    # -- augmented views (schema 2, ``--views K``; train rows only) ------------------------------------------------
    @property
    def views_k(self) -> int:
        """K augmented views per train sample; 0 for a cache without views (every schema-1 cache)."""
        return views_k(self.manifest)

    def _gather_views(self, name: str, select: tuple = (), dtype: np.dtype | None = None) -> np.ndarray:
        """(n_train, K, ...) of ``views/<name>``, rows in the order of ``ids("train")``."""
        if not self.views_k:
            raise no_views_error(self.path)
        # the group holds exactly the shard's train rows, in row order (fmcache verify checks the ids)
        return self._fill("train", f"views/{name}", [(slice(None), *select)], dtype, views=True)[0]

    def views_pooled(self, layer: int | str = "last", kind: str = "cls") -> np.ndarray:
        """float32 (n_train, K, D) pooled features of the K augmented views of every train sample (one layer)."""
        self._check_pool(kind)
        if kind == "paper":
            return self._gather_views("pooled/paper", (), np.float32)
        number = self.resolve_layer(layer)
        dim = self.layer_dims[number - 1]
        return self._gather_views(f"pooled/{kind}", (number - 1, slice(0, dim)), np.float32)

    @property
    def has_paper_tokens(self) -> bool:
        """Whether the cache holds ``tokens/paper``: what the paper's DeiT head reads (``extract --tokens paper``)."""
        return "paper_token_shape" in self.manifest["model"]

    def view_tokens(self, layer: int | str) -> ViewTokenDataset:
        """Streams the token maps of the train views; item ``i * K + v`` is view v of train sample i."""
        if not self.views_k:
            raise no_views_error(self.path)
        self.tokens("train", layer)  # the same checks: the layer's tokens were cached
        return ViewTokenDataset(self, PAPER_TOKENS if layer == PAPER_TOKENS else self.resolve_layer(layer))

    def tokens(self, split: str, layer: int | str) -> TokenDataset:
        if layer == PAPER_TOKENS:
            if not self.has_paper_tokens:
                raise FmcacheError(
                    f"cache {self.path.name} holds no paper tokens; extract again with --tokens paper (or e.g. last,paper)"
                )
            return TokenDataset(self, split, PAPER_TOKENS)
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
    read of a single sample (one chunk: see :mod:`fmcache.cache.shards`). A list of indices gives the whole batch at
    once, (tokens (B, T, D) float32, labels, ids), read straight into one array: a DataLoader with ``batch_size=None``
    over lists of indices then yields ready batches, several times faster than stacking B items (``batch``).
    """

    def __init__(self, reader: CacheReader, split: str, layer: int | str):
        self.files = [str(f) for f in reader.files]
        self.name = token_dataset(layer)
        rows = reader.rows(split)
        self.where = reader._index[2][rows]
        self.labels = reader.labels(split)
        self.ids = reader.ids(split)
        self._handles: dict[int, h5py.File] = {}
        self._datasets: dict[int, h5py.Dataset] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.where)

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():
            self._handles, self._datasets, self._pid = {}, {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = h5py.File(self.files[shard], "r")
        return self._handles[shard]

    def _source(self, i: int) -> tuple[int, tuple, int]:
        """(shard, selection in its dataset, row of ``labels``/``ids``) of item ``i``."""
        shard, row = self.where[i]
        return int(shard), (int(row),), int(i)

    def _read(self, i: int) -> tuple[np.ndarray, int]:
        shard, select, at = self._source(int(i))
        try:
            if shard not in self._datasets or self._pid != os.getpid():
                self._datasets[shard] = self._file(shard)[self.name]
            return self._datasets[shard][select], at
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise damaged_shard(Path(self.files[shard]), exc) from exc

    def __getitem__(self, i):
        if not isinstance(i, int | np.integer):
            return self.batch(i)
        tokens, at = self._read(i)
        return torch.from_numpy(tokens.astype(np.float32)), torch.as_tensor(self.labels[at]), int(self.ids[at])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (B, T, D) float32, labels (B, ...), ids (B,)) of ``indices``: the values of stacking the items,
        each sample read once and converted while copied into the one output array."""
        indices = [int(i) for i in indices]
        first, at = self._read(indices[0])
        out = np.empty((len(indices), *first.shape), np.float32)
        out[0], rows = first, [at]
        for j, i in enumerate(indices[1:], start=1):
            out[j], at = self._read(i)
            rows.append(at)
        return torch.from_numpy(out), torch.as_tensor(self.labels[rows]), torch.as_tensor(self.ids[rows])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}, "_datasets": {}, "_pid": -1}


class ViewTokenDataset(TokenDataset):
    """Streams (tokens (T, D) float32, label, id) of the train views of one layer; item ``i * K + v`` is view v of
    train sample i (the order of ``ids("train")``), one contiguous read each."""

    def __init__(self, reader: CacheReader, layer: int | str):
        super().__init__(reader, "train", layer)
        self.name, self.k = f"views/{token_dataset(layer)}", reader.views_k
        # a train row's place in its shard's views group: how many train rows of that shard come before it
        shards = self.where[:, 0]
        rank = np.arange(len(shards)) - np.searchsorted(shards, shards, side="left")
        self.where = np.stack([shards, rank], axis=1)

    def __len__(self) -> int:
        return len(self.where) * self.k

    def _source(self, j: int) -> tuple[int, tuple, int]:
        i, view = divmod(int(j), self.k)
        shard, row = self.where[i]
        return int(shard), (int(row), view), i


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
