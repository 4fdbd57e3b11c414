"""What CKA reads: the layers and pool of one cache, and its samples streamed shard by shard in canonical order.

Two caches are compared sample by sample, so their ids must agree (:func:`aligned_ids`); :func:`paired_blocks` cuts
both caches' shards to row-aligned blocks, and :func:`rebatch` regroups them into the minibatch estimator's batches.
The estimators themselves are :mod:`fmcache.frozen.cka`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np

from fmcache.cache.reader import SPLIT_CODES, CacheReader
from fmcache.cache.shards import token_dataset
from fmcache.choices import CKA_SPLITS
from fmcache.errors import FmcacheError
from fmcache.frozen.features import resolve_pool

POOLS = ("auto", "cls", "mean", "paper", "tokens")
MIN_SAMPLES = 4  # unbiased HSIC divides by n(n-3)


# -- what to read ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The features CKA reads from one cache: 1-based ``layers``, one ``pool`` kind, each layer's true ``widths``."""

    reader: CacheReader
    layers: list[int]
    pool: str
    widths: list[int]

    @property
    def labels(self) -> list[int]:
        return list(self.layers)


def parse_layers(reader: CacheReader, spec: str) -> list[int]:
    """``all``, ``last`` or comma-separated 1-based numbers; errors name the cache's layer range."""
    text = str(spec).strip()
    if text == "all":
        return list(range(1, reader.num_layers + 1))
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise FmcacheError(f"bad --layers '{spec}'; use all, last or numbers such as 4,8,12")
    layers = [reader.resolve_layer(p) for p in parts]
    if len(set(layers)) != len(layers):
        raise FmcacheError(f"--layers '{spec}' repeats a layer")
    return layers


def select(reader: CacheReader, layers_spec: str, pool: str) -> Selection:
    """Resolve ``--layers`` and ``--pool`` for one cache, checking that it holds what is asked for."""
    if pool not in POOLS:
        raise FmcacheError(f"unknown --pool '{pool}'; use {', '.join(POOLS)}")
    layers = parse_layers(reader, layers_spec)
    if pool == "tokens":
        return _select_tokens(reader, layers)
    (kind,) = resolve_pool(reader, pool, layers)
    if kind not in reader.pools:
        raise FmcacheError(
            f"cache {reader.path.name} ({reader.model}) has no '{kind}' pooled features; "
            f"available: {', '.join(reader.pools)}"
        )
    if kind == "paper":
        return Selection(reader, layers, kind, [_stored_shape(reader, "pooled/paper")[-1]])
    # hierarchical models pad narrower stages with zeros up to the widest; CKA must see each stage's own width
    stored = _stored_shape(reader, f"pooled/{kind}")[-1]
    dims = reader.manifest["model"].get("layer_dims") or [stored] * reader.num_layers
    return Selection(reader, layers, kind, [int(dims[n - 1]) for n in layers])


def _select_tokens(reader: CacheReader, layers: list[int]) -> Selection:
    missing = [n for n in layers if n not in reader.token_layers]
    if missing:
        have = ",".join(map(str, reader.token_layers)) or "none"
        want = ",".join(map(str, layers))
        raise FmcacheError(
            f"cache {reader.path.name} holds tokens for layers {have}, not {','.join(map(str, missing))}; "
            f"extract again with `fmcache extract ... --tokens {want}`"
        )
    widths = [int(np.prod(_stored_shape(reader, token_dataset(n))[1:])) for n in layers]
    return Selection(reader, layers, "tokens", widths)


def _stored_shape(reader: CacheReader, name: str) -> tuple[int, ...]:
    for path in reader.files:
        with _open(path) as fh:
            if name in fh:
                return tuple(fh[name].shape)
    raise FmcacheError(f"cache {reader.path.name} stores no '{name}' in any shard; extract it again")


def _open(path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise FmcacheError(f"cannot read shard {path}: {exc}; run `fmcache verify` on the cache") from exc


# -- streaming ------------------------------------------------------------------------------------------------------


def _split_codes(split: str) -> list[int]:
    if split == "all":
        return sorted(SPLIT_CODES.values())
    if split not in SPLIT_CODES:
        raise FmcacheError(f"unknown --split '{split}'; use {', '.join(CKA_SPLITS)}")
    return [SPLIT_CODES[split]]


def _shard_masks(reader: CacheReader, split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ids of ``split`` in the cache's canonical order, and each shard's row mask for it."""
    codes = _split_codes(split)
    ids, masks = [], []
    for path in reader.files:
        with _open(path) as fh:
            if "ids" not in fh:  # every image of this shard was skipped at extraction
                masks.append(np.zeros(0, bool))
                continue
            mask = np.isin(fh["split"][...], codes)
            masks.append(mask)
            ids.append(fh["ids"][...][mask])
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), masks


def _blocks(selection: Selection, masks: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
    """Per shard, one (rows, width) array per selected layer in the stored dtype; shards without rows are skipped."""
    for path, mask in zip(selection.reader.files, masks, strict=True):
        if not mask.any():
            continue
        with _open(path) as fh:
            if selection.pool == "tokens":
                # one layer at a time: a shard of token maps is large, and each is flattened per sample
                yield [fh[token_dataset(n)][...][mask].reshape(int(mask.sum()), -1) for n in selection.layers]
            elif selection.pool == "paper":
                yield [fh["pooled/paper"][...][mask]]
            else:
                ds = fh[f"pooled/{selection.pool}"]
                pairs = list(zip(selection.layers, selection.widths, strict=True))
                if ds.chunks is not None and ds.chunks[1] == 1 and len(pairs) < ds.shape[1]:
                    # chunks of one layer each: read only the selected layers
                    yield [ds[:, n - 1, :w] if mask.all() else ds[:, n - 1, :w][mask] for n, w in pairs]
                    continue
                stack = ds[...]  # one contiguous read of (rows, L, D_max)
                stack = stack if mask.all() else stack[mask]
                yield [stack[:, n - 1, :w] for n, w in pairs]


def check_alignment(a: CacheReader, b: CacheReader) -> None:
    """Two caches can be compared sample by sample only if they hold the same dataset files and split."""
    if a.dataset != b.dataset:
        raise FmcacheError(
            f"the caches hold different datasets ({a.dataset} vs {b.dataset}); CKA needs the same samples"
        )
    inputs_a, inputs_b = (r.manifest.get("inputs", {}).get("dataset", {}) for r in (a, b))
    if a.manifest["dataset"].get("fingerprint") != b.manifest["dataset"].get("fingerprint"):
        raise FmcacheError(
            f"the caches were extracted from different files of {a.dataset} (the dataset fingerprints differ)"
        )
    if "split" in inputs_a and "split" in inputs_b and inputs_a["split"] != inputs_b["split"]:
        raise FmcacheError(
            f"the caches use different splits of {a.dataset} ({inputs_a['split']} vs {inputs_b['split']}); "
            "extract both with the same split"
        )


def _check_same_ids(ids_a: np.ndarray, ids_b: np.ndarray, split: str, a: CacheReader, b: CacheReader) -> None:
    if np.array_equal(ids_a, ids_b):
        return
    for x, y, rx, ry in ((ids_a, ids_b, a, b), (ids_b, ids_a, b, a)):
        lacking = np.setdiff1d(x, y)
        if lacking.size:
            shown = ", ".join(map(str, lacking[:5])) + (", …" if lacking.size > 5 else "")
            raise FmcacheError(
                f"cache {ry.path} lacks {lacking.size} of the {x.size} '{split}' samples of cache {rx.path} "
                f"(ids {shown}); extract both from the same samples (same --limit and split)"
            )
    raise FmcacheError(f"the caches hold the same '{split}' samples in a different order; extract them again")


def aligned_ids(a: Selection, b: Selection | None, split: str) -> tuple[np.ndarray, list, list | None]:
    """The ids CKA compares, and each cache's per-shard masks; refuses misaligned caches and tiny splits."""
    ids_a, masks_a = _shard_masks(a.reader, split)
    masks_b = None
    if b is not None:
        check_alignment(a.reader, b.reader)
        ids_b, masks_b = _shard_masks(b.reader, split)
        _check_same_ids(ids_a, ids_b, split, a.reader, b.reader)
    if ids_a.size < MIN_SAMPLES:
        raise FmcacheError(
            f"split '{split}' of cache {a.reader.path.name} has {ids_a.size} samples; CKA needs at least {MIN_SAMPLES}"
        )
    return ids_a, masks_a, masks_b


def paired_blocks(
    a: Selection, b: Selection | None, masks_a: list, masks_b: list | None
) -> Iterator[tuple[list[np.ndarray], list[np.ndarray] | None]]:
    """Row-aligned blocks of both caches (their shards may differ in size), in canonical order; B is None for self-CKA."""
    stream_a = _blocks(a, masks_a)
    if b is None:
        for block in stream_a:
            yield block, None
        return
    stream_b = _blocks(b, masks_b)
    block_a, block_b = next(stream_a, None), next(stream_b, None)
    while block_a is not None and block_b is not None:
        rows = min(len(block_a[0]), len(block_b[0]))
        yield [x[:rows] for x in block_a], [y[:rows] for y in block_b]
        # the longer block keeps its unused tail for the next round
        block_a = [x[rows:] for x in block_a] if len(block_a[0]) > rows else next(stream_a, None)
        block_b = [y[rows:] for y in block_b] if len(block_b[0]) > rows else next(stream_b, None)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Minibatch boundaries over n samples; a last batch under 4 samples joins the one before it."""
    if batch_size < MIN_SAMPLES:
        raise FmcacheError(f"--batch-size must be at least {MIN_SAMPLES} (unbiased HSIC needs n ≥ 4), got {batch_size}")
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_SAMPLES:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def rebatch(
    stream: Iterator[tuple[list[np.ndarray], list[np.ndarray] | None]], n: int, batch_size: int
) -> Iterator[tuple[list[np.ndarray], list[np.ndarray] | None]]:
    """Regroup row-aligned blocks into the minibatches of :func:`batch_bounds`."""
    bounds = iter(batch_bounds(n, batch_size))
    start, stop = next(bounds)
    pending: list[tuple[list[np.ndarray], list[np.ndarray] | None]] = []
    have = 0
    for block_a, block_b in stream:
        pending.append((block_a, block_b))
        have += len(block_a[0])
        while have >= stop - start:
            size = stop - start
            yield _take(pending, size)
            have -= size
            if stop == n:
                return
            start, stop = next(bounds)


def _take(pending: list, size: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Pop the first ``size`` rows off the pending blocks (in place), joined per layer."""
    parts_a, parts_b, need = [], [], size
    while need:
        block_a, block_b = pending[0]
        rows = len(block_a[0])
        take = min(rows, need)
        parts_a.append([x[:take] for x in block_a])
        parts_b.append(None if block_b is None else [y[:take] for y in block_b])
        if take == rows:
            pending.pop(0)
        else:
            pending[0] = ([x[take:] for x in block_a], None if block_b is None else [y[take:] for y in block_b])
        need -= take
    joined_a = [np.concatenate(layer) for layer in zip(*parts_a, strict=True)]
    joined_b = None if parts_b[0] is None else [np.concatenate(layer) for layer in zip(*parts_b, strict=True)]
    return joined_a, joined_b
