"""Pixel caches: the deterministic first steps of the seed's transforms (decode, resize, center crop), stored once.

A pixel cache lives in ``<cache_root>/<dataset>/pixels/<key12>/`` and uses the feature caches' machinery unchanged:
shards written under a temporary name and renamed (:class:`~fmcache.cache.shards.ShardWriter`), the manifest
rebuilt from the shards, the writer lock, ``fmcache verify [--repair]``, resume. Its manifest says ``"kind":
"pixels"``; each shard holds

- ``ids`` (n,) int64: global sample indices (the dataset index's order);
- ``pixels`` (n, H, W, C) uint8: the center crop each image's transforms see, H = W = the crop size, C = 1 for a
  grayscale dataset (its three channels are equal, so one is stored and repeated when read) or 3. One sample per
  chunk, with a fletcher32 checksum per chunk (a flipped bit fails the read).

The key (:func:`pixel_key`) covers what changes a stored byte: the dataset's name and fingerprint (the image files in
index order: path, size, mtime), the resize, crop, interpolation and antialiasing, the channels stored, the samples
(all, or the first N of each split with ``--limit``), the shard size and the schema. Neither the split nor the gray
mode changes a stored byte (``--gray seed`` zeroes channels after normalisation), so one pixel cache serves every
split mode and both gray modes.

Reads (:class:`PixelReader`) go sample by sample (``ds[row]``). Measured by ``benchmarks/bench_pixels.py`` (one core,
224 x 224 x 3 crops in shuffled batches of 64, cold / warm page cache): item by item 3,029 / 8,766 img/s, item by
item into one array with ``read_direct`` 2,690 / 6,741, one h5py fancy-index read of the batch's sorted rows 49 / 41
(h5py's point selections), contiguous slices 5,302 / 6,550 (a shuffled batch has none); raw chunks without their
checksum 4,045 / 32,789, not taken: the fletcher32 check is what turns a flipped bit into an error instead of a
training input. Files open lazily in each process (h5py is not fork-safe), so a reader travels to DataLoader workers.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import h5py
import numpy as np

from fmcache.cache.messages import one_line
from fmcache.cache.shards import PIXELS
from fmcache.cache.verify import is_pixel_manifest, load_manifest
from fmcache.errors import FmcacheError

KIND = PIXELS  # the manifest's "kind"; feature caches have none
FOLDER = "pixels"  # <cache_root>/<dataset>/pixels/<key12>
SCHEMA = 1  # the pixel layout's own version, in the key


def pixel_folder(cache_root: Path, dataset: str, key: str) -> Path:
    return Path(cache_root) / dataset / FOLDER / key[:12]


def pixel_caches(cache_root: Path, dataset: str) -> list[Path]:
    """Every pixel cache folder (with a manifest) of ``dataset`` under ``cache_root``, newest first."""
    found = [p.parent for p in (Path(cache_root) / dataset / FOLDER).glob("*/manifest.json")]
    return sorted(found, key=lambda p: p.joinpath("manifest.json").stat().st_mtime, reverse=True)


def sample_bytes(height: int, width: int, channels: int) -> int:
    return int(height) * int(width) * int(channels)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class PixelReader:
    """Crops of a complete pixel cache by global sample id: ``read(id)`` → (H, W, C) uint8.

    The id → (shard, row) table is read from the shards' ``ids`` at construction; HDF5 files open on first use in
    each process, so a reader pickled into DataLoader workers opens its own.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        if not is_pixel_manifest(self.manifest):
            raise FmcacheError(f"{self.folder} is a feature cache, not a pixel cache (`fmcache pixels` writes those)")
        if self.manifest.get("status") != "complete":
            raise FmcacheError(
                f"pixel cache {self.folder} is {self.manifest.get('status')}; rerun the `fmcache pixels` command that "
                "wrote it to finish it"
            )
        self.key = self.manifest["key"]
        p = self.manifest["pixels"]
        self.shape = (int(p["height"]), int(p["width"]), int(p["channels"]))
        self.files = {e["index"]: self.folder / e["file"] for e in self.manifest["shards"]}
        self.where: dict[int, tuple[int, int]] = {}
        for index, path in sorted(self.files.items()):
            with _guard(path), h5py.File(path, "r") as fh:
                ids = fh["ids"][...] if "ids" in fh else np.zeros(0, np.int64)
            self.where.update((int(i), (index, row)) for row, i in enumerate(ids.tolist()))
        self._open: dict[int, h5py.Dataset] = {}
        self._pid = os.getpid()

    @property
    def channels(self) -> int:
        return self.shape[2]

    def __len__(self) -> int:
        return len(self.where)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # open HDF5 handles never cross a process boundary

    def _dataset(self, shard: int) -> h5py.Dataset:
        if self._pid != os.getpid():  # forked: the parent's handles are not ours
            self._open, self._pid = {}, os.getpid()
        ds = self._open.get(shard)
        if ds is None:
            path = self.files[shard]
            with _guard(path):
                # no chunk cache: every chunk is one sample, read once per epoch in a shuffled order
                ds = h5py.File(path, "r", rdcc_nbytes=0)[PIXELS]
            self._open[shard] = ds
        return ds

    def read(self, sample_id: int) -> np.ndarray:
        """The (H, W, C) uint8 crop of global sample ``sample_id``."""
        try:
            shard, row = self.where[int(sample_id)]
        except KeyError:
            raise FmcacheError(
                f"pixel cache {self.folder} holds no sample {sample_id}; it was written for other samples "
                "(--limit), rerun `fmcache pixels` without it"
            ) from None
        with _guard(self.files[shard]):
            return self._dataset(shard)[row]

    def close(self) -> None:
        for ds in self._open.values():
            with contextlib.suppress(Exception):  # an already closed or broken handle: nothing left to release
                ds.file.close()
        self._open = {}


@contextlib.contextmanager
def _guard(path: Path):
    """An HDF5 error while reading a shard becomes the one-line damaged-shard error (verify, repair, rerun)."""
    try:
        yield
    except FmcacheError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise FmcacheError(
            f"pixel cache shard {path} is damaged ({one_line(exc)}); run `fmcache verify --repair {path.parent}`, "
            "then rerun the same `fmcache pixels` command"
        ) from exc
