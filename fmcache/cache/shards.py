"""HDF5 shard files: written under a temporary name, renamed only when complete.

One shard holds a fixed slice of the dataset's canonical order. Arrays:
``ids`` (n,) int64 global sample index, ``split`` (n,) int8, ``labels`` (n,) int64 or (n, C) float32 with NaN,
``pooled/cls`` and ``pooled/mean`` (n, L, D) and ``pooled/paper`` (n, D_p), ``tokens/layer_XX`` (n, T, D),
and with ``--views`` the ``views/`` group of train rows only (see :mod:`fmcache.cache.views`).

Chunk layout (every dataset has a fletcher32 checksum per chunk; the reader assumes no layout):

- ``pooled/cls`` and ``pooled/mean`` are chunked one layer at a time, ``(rows, 1, D)`` with rows chosen so a chunk
  is about 512 KiB (256 rows of a 1,024-d fp16 layer), so stage two reads one layer without the others' bytes
  (knn and probe on one layer of a 24-layer cache read 1/24 of it). ``views/pooled/*`` likewise: ``(rows, K, 1, D)``.
  Caches written before this layout chunk (256, L, D): every layer's bytes are read for one, but still only the
  asked layer is held in memory.
- ``tokens/layer_XX``: one sample per chunk, ``(1, T, D)``, and one view per chunk in ``views/tokens``. Token heads
  read samples in a shuffled order, so a chunk of several samples is read (and checksummed) whole for each one:
  measured with 4,096 samples, 2 cores, warm page cache, item by item in a shuffled order, ViT-B (197 × 768 fp16)
  reads 2,224 samples/s (0.67 GB/s) with 1 sample per chunk, 756/s with 8 and 236/s with 32; ViT-L (257 × 1,024)
  1,180/s, 537/s and 139/s (cold: 1,142/s vs 588/s for ViT-B, 441/s vs 276/s for ViT-L). A whole-shard
  sequential read is about as fast with any of them (0.9-1 GB/s cold, 2-2.8 GB/s warm). Through a DataLoader,
  stacking single items costs more than reading them; ``TokenDataset.batch`` (an index list) reads a batch into
  one array: ViT-L 1,240 samples/s warm, 691/s cold, vs 586/s and 390/s item by item (``bench_scale.py``).
- ``pixels`` (a pixel cache, :mod:`fmcache.cache.pixels`): one sample per chunk, as token maps, for the same reason.
- everything else: up to 256 rows per chunk (K times fewer for a sample's K views).
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from fmcache.choices import PAPER_TOKENS
from fmcache.files import disk_error, sha256_file

SHARD_RE = re.compile(r"^shard-(\d{5})\.h5$")
PIXELS = "pixels"  # a pixel cache's (n, H, W, C) uint8 crops (fmcache.cache.pixels)


def token_dataset(layer: int | str) -> str:
    """The shard dataset of a token layer: ``tokens/layer_XX``, or ``tokens/paper``."""
    return "tokens/paper" if layer == PAPER_TOKENS else f"tokens/layer_{int(layer):02d}"


def feature_datasets(model: dict) -> dict[str, tuple[int, ...]]:
    """Name → shape after the row axis of every feature dataset a shard holds, from the manifest's ``model`` entry
    (the ``views/`` group holds the same names with a K axis first)."""
    width = max(int(d) for d in model["layer_dims"])
    out: dict[str, tuple[int, ...]] = {}
    for pool in model["pools"]:
        if pool == "paper":
            if "paper_dim" in model:
                out["pooled/paper"] = (int(model["paper_dim"]),)
        else:
            out[f"pooled/{pool}"] = (int(model["num_layers"]), width)
    for layer in model.get("token_layers", []):
        shape = model.get("token_shapes", {}).get(str(layer))
        if shape is not None:
            out[token_dataset(layer)] = tuple(int(d) for d in shape)
    if "paper_token_shape" in model:
        out[token_dataset(PAPER_TOKENS)] = tuple(int(d) for d in model["paper_token_shape"])
    return out


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def tmp_name(index: int) -> str:
    return f".shard-{index:05d}.h5.tmp-{os.getpid()}"


def remove_orphans(folder: Path) -> list[str]:
    """Delete temporary shard files left by a crashed writer (the caller holds the cache lock)."""
    removed = []
    for path in [*folder.glob(".shard-*.h5.tmp-*"), *folder.glob(".manifest.json.tmp-*")]:
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def finished_shards(folder: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in folder.iterdir() if (m := SHARD_RE.match(p.name))}


# Bytes of one chunk of a per-layer pooled dataset (see the module doc).
LAYER_CHUNK_BYTES = 512 << 10
_SMALL_ROWS = 256


def per_layer(name: str, sample_shape: tuple[int, ...]) -> bool:
    """Is ``name`` a pooled (…, L, D) dataset (``pooled/cls``, ``pooled/mean`` and their ``views/`` twins)?"""
    return name.rsplit("/", 2)[-2:] in (["pooled", "cls"], ["pooled", "mean"]) and len(sample_shape) >= 2


def chunk_shape(name: str, sample_shape: tuple[int, ...], itemsize: int, planned: int) -> tuple[int, ...]:
    """The chunk of a shard dataset (module doc): one sample (one view) of a token map, one layer of a pooled
    stack, and a few hundred rows of anything else."""
    planned = max(planned, 1)
    if name == PIXELS:  # a pixel cache's crops: one sample per chunk, read one by one in a shuffled order
        return (1, *sample_shape)
    if "tokens/" in name and len(sample_shape) >= 2:
        return (1, *[1] * (len(sample_shape) - 2), *sample_shape[-2:])
    if per_layer(name, sample_shape):
        inner = (*sample_shape[:-2], 1, sample_shape[-1])  # (K,) 1, D
        rows = LAYER_CHUNK_BYTES // max(1, int(np.prod(inner)) * itemsize)
        return (min(planned, max(rows, 1)), *inner)
    rows = min(planned, _SMALL_ROWS)
    if name.startswith("views/") and sample_shape:
        rows = max(1, rows // sample_shape[0])
    return (rows, *sample_shape)


def _band_cache(sample_shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int) -> dict:
    """Chunk-cache settings that hold every chunk of one band of rows (twice over), when that is over the default."""
    band = int(np.prod([-(-size // chunk) for size, chunk in zip(sample_shape, chunks[1:], strict=True)]))
    nbytes = 2 * band * int(np.prod(chunks)) * itemsize
    if nbytes <= 1 << 20:  # HDF5's default cache
        return {}
    return {"rdcc_nbytes": nbytes, "rdcc_nslots": 10007, "rdcc_w0": 1.0}


class ShardWriter:
    """Appends batches to one shard's temporary file; ``commit`` closes and renames it into place."""

    def __init__(self, folder: Path, index: int, planned: int, attrs: dict, compression: str | None):
        self.final = folder / shard_name(index)
        self.tmp = folder / tmp_name(index)
        self.planned = planned
        self.rows = 0
        self.compression = compression
        self.attrs = attrs
        try:
            self.file = h5py.File(self.tmp, "w", libver="latest")
        except OSError as exc:
            raise disk_error(exc, self.tmp) from exc

    def _dataset(self, name: str, sample_shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
        if name in self.file:
            return self.file[name]
        chunks = chunk_shape(name, sample_shape, np.dtype(dtype).itemsize, self.planned)
        return self.file.create_dataset(
            name,
            shape=(0, *sample_shape),
            maxshape=(self.planned, *sample_shape),
            dtype=dtype,
            chunks=chunks,
            compression=self.compression,
            # a per-chunk checksum: a flipped bit in the data fails the read of that chunk instead of returning
            # wrong numbers (HDF5's own metadata is checksummed under libver="latest")
            fletcher32=True,
            # a batch appended to per-layer chunks touches one chunk of every layer: the cache holds that band so
            # a partly filled chunk is not written, read back and checksummed again by the next batch
            **_band_cache(sample_shape, chunks, np.dtype(dtype).itemsize),
        )

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        n = len(arrays["ids"])
        if n == 0:
            return
        try:
            for name, value in arrays.items():
                ds = self._dataset(name, value.shape[1:], value.dtype)
                # each dataset's own length: the views/ group holds train rows only, so it may grow by fewer rows
                start = ds.shape[0]
                if len(value):
                    ds.resize(start + len(value), axis=0)
                    ds[start : start + len(value)] = value
        except OSError as exc:
            raise disk_error(exc, self.tmp) from exc
        self.rows += n

    def commit(self, extra_attrs: dict) -> dict:
        """Finish the shard; returns its manifest entry."""
        try:
            for key, value in {**self.attrs, **extra_attrs, "n": self.rows}.items():
                self.file.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
            self.file.flush()
            self.file.close()
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())
            digest = sha256_file(self.tmp)
            size = self.tmp.stat().st_size
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.abort()
            raise disk_error(exc, self.final) from exc
        # the size lets every later run spot a truncated or swapped shard with one stat, without hashing it
        return {"file": self.final.name, "n": self.rows, "size": size, "sha256": digest}

    def abort(self) -> None:
        try:
            if self.file.id.valid:
                self.file.close()
        except Exception:  # the file may already be broken; deleting it is all that matters
            pass
        self.tmp.unlink(missing_ok=True)


class BackgroundWriter:
    """Runs write jobs in order on one thread so that compute overlaps with HDF5 I/O.

    An exception in a job is re-raised in the caller at the next ``submit`` or at ``drain``.
    """

    def __init__(self, depth: int = 4):
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="fmcache-writer")
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as exc:
                    self.error = exc
            self.jobs.task_done()
        self.jobs.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self.jobs.put(job)

    def drain(self) -> None:
        self.jobs.join()
        self._raise()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
