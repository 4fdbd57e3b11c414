"""HDF5 shard files: written under a temporary name, renamed only when complete.

One shard holds a fixed slice of the dataset's canonical order. Arrays:
``ids`` (n,) int64 global sample index, ``split`` (n,) int8, ``labels`` (n,) int64 or (n, C) float32 with NaN,
``pooled/cls`` and ``pooled/mean`` (n, L, D) and ``pooled/paper`` (n, D_p), ``tokens/layer_XX`` (n, T, D),
and with ``--views`` the ``views/`` group of train rows only (see :mod:`fmcache.cache.views`).
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

from fmcache.files import disk_error, sha256_file

SHARD_RE = re.compile(r"^shard-(\d{5})\.h5$")


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
        # one sample per chunk for token maps (whole-sample reads); a few hundred rows for small arrays, and
        # K times fewer for a sample's K augmented views, so a chunk stays as large as a center-crop one
        rows = 1 if len(sample_shape) >= 2 and "tokens/" in name else min(self.planned, 256)
        if name.startswith("views/") and sample_shape:
            rows = max(1, rows // sample_shape[0])
        return self.file.create_dataset(
            name,
            shape=(0, *sample_shape),
            maxshape=(self.planned, *sample_shape),
            dtype=dtype,
            chunks=(max(rows, 1), *sample_shape),
            compression=self.compression,
            # a per-chunk checksum: a flipped bit in the data fails the read of that chunk instead of returning
            # wrong numbers (HDF5's own metadata is checksummed under libver="latest")
            fletcher32=True,
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
