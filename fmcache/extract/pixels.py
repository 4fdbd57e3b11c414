"""``fmcache pixels``: decode every image once and store the seed's deterministic prefix (resize, center crop) as
uint8 crops in a keyed, resumable pixel cache (:mod:`fmcache.cache.pixels`); and finding the pixel cache that
matches a run (fine-tuning, ``extract --views``), or saying what differs.

The writer follows the feature extraction's rules: shards cover fixed slices of the samples' canonical order, each
written under a temporary name and renamed, the manifest rebuilt after every shard, one writer at a time (the cache
lock), damaged shards set aside and recomputed, so a killed run resumes to the bytes an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

import fmcache
from fmcache.cache.folder import CacheFolder
from fmcache.cache.key import SCHEMA_VERSION, cache_key
from fmcache.cache.lock import CacheLock
from fmcache.cache.manifest import read_manifest
from fmcache.cache.pixels import KIND, SCHEMA, PixelReader, human_size, pixel_caches, pixel_folder, sample_bytes
from fmcache.cache.shards import PIXELS, BackgroundWriter, ShardWriter, finished_shards, remove_orphans
from fmcache.data import DatasetIndex, load_dataset
from fmcache.data.pixels import DecodedCrops, prefix_of, prefix_spec, transform_suffix
from fmcache.data.registry import DATASETS, check_gray_for
from fmcache.data.transforms import default_resize
from fmcache.data.views import ViewsImageDataset
from fmcache.errors import FmcacheError
from fmcache.extract.pixel_spec import PixelSpec
from fmcache.extract.plan import ExtractPlan, select_positions
from fmcache.files import ensure_writable_dir
from fmcache.progress import progress_bar

# -- the plan: key, folder, size ---------------------------------------------------------------------------------


def resolve_channels(channels: str, dataset: str) -> int:
    """``--channels``: auto stores one channel for a grayscale dataset (its three are equal when read), else three."""
    if channels == "auto":
        spec = DATASETS.get(dataset)
        return 1 if spec is not None and spec.grayscale else 3
    return int(channels)


def pixel_inputs(index: DatasetIndex, positions: np.ndarray, prefix: dict, channels: int, spec: PixelSpec) -> dict:
    """What a pixel cache's key hashes: what changes a stored byte (:mod:`fmcache.cache.pixels`)."""
    dataset = {"name": index.name, "fingerprint": index.fingerprint(), "limit": spec.limit, "n": len(positions)}
    if spec.limit is not None:  # the first N of each split: which samples those are depends on the split
        dataset["split"] = index.split_info
    return {
        "kind": KIND,
        "pixel_schema": SCHEMA,
        "dataset": dataset,
        "prefix": prefix,
        "channels": channels,
        "shard_size": spec.shard_size,  # the shard layout: a resume with another size would mix two layouts
    }


@dataclass
class PixelPlan:
    spec: PixelSpec
    index: DatasetIndex
    positions: np.ndarray
    prefix: dict
    channels: int
    inputs: dict
    key: str
    folder: Path
    num_shards: int
    cache: CacheFolder

    @property
    def nbytes(self) -> int:
        """The crops' bytes (the shards add a few KB each)."""
        return len(self.positions) * sample_bytes(self.prefix["crop"], self.prefix["crop"], self.channels)

    def shard_positions(self, shard: int) -> np.ndarray:
        size = self.spec.shard_size
        return self.positions[shard * size : (shard + 1) * size]

    def describe(self) -> str:
        """One line: what is stored, its size and where (said before anything is written, and by ``--dry-run``)."""
        crop, n = self.prefix["crop"], len(self.positions)
        per = sample_bytes(crop, crop, self.channels)
        gray = " (grayscale: one channel)" if self.channels == 1 and self.spec.channels == "auto" else ""
        return (
            f"pixel cache of {self.index.name}: {n:,} images as {crop}x{crop}x{self.channels} uint8{gray}, "
            f"{human_size(per)} each, {human_size(self.nbytes)} in all ({self.num_shards} shard(s)) → {self.folder}"
        )


def plan_pixels(spec: PixelSpec, log=print) -> PixelPlan:
    """The key, folder and size of ``spec``'s pixel cache; reads the label files and stats the images, decodes none."""
    check_gray_for(spec.gray, spec.dataset)
    index = load_dataset(spec.dataset, spec.data_root, **spec.dataset_options)
    positions = select_positions(index, spec.limit)
    prefix = prefix_spec(spec.img_size, spec.resize, spec.interpolation)
    channels = resolve_channels(spec.channels, index.name)
    inputs = pixel_inputs(index, positions, prefix, channels, spec)
    key = cache_key(inputs)
    folder = pixel_folder(spec.cache_root, index.name, key)
    return PixelPlan(
        spec=spec,
        index=index,
        positions=positions,
        prefix=prefix,
        channels=channels,
        inputs=inputs,
        key=key,
        folder=folder,
        num_shards=max(1, -(-len(positions) // spec.shard_size)),
        cache=CacheFolder(folder, key, verify=spec.verify, log=log),
    )


def command_for(dataset: str, root: object, prefix: dict, cache_root: Path, limit: int | None = None) -> str:
    """The ``fmcache pixels`` command that writes a pixel cache with ``prefix`` (for the messages)."""
    crop = prefix["crop"]
    parts = [f"fmcache pixels --dataset {dataset} --data-root {root} --img-size {crop}"]
    if list(prefix["resize"]) != [default_resize(crop)] * 2:
        parts.append(f"--resize {prefix['resize'][0]}")
    if prefix["interpolation"] != "bilinear":
        parts.append(f"--interpolation {prefix['interpolation']}")
    if Path(cache_root) != Path("cache"):
        parts.append(f"--cache-root {cache_root}")
    if limit is not None:
        parts.append(f"--limit {limit}")
    return " ".join(parts)


# -- the writer ----------------------------------------------------------------------------------------------------


class _Crops(Dataset):
    """(crop, global index, failure) per sample: a bad image surfaces as one clean line in the main process."""

    def __init__(self, source: DecodedCrops, positions: np.ndarray):
        self.source, self.positions = source, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        gid = int(self.positions[i])
        try:
            return self.source.read(gid), gid, None
        except FmcacheError as exc:
            return None, gid, str(exc)


def _collate(items: list) -> list:
    return items


def _versions() -> dict:
    out = {"fmcache": fmcache.__version__}
    for pkg in ("pillow", "torchvision", "h5py", "numpy", "pydicom"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def write_pixels(spec: PixelSpec, progress: bool = True, log=print) -> Path:
    """Write (or resume, or return at once when complete) ``spec``'s pixel cache; returns its folder."""
    return PixelWriter(plan_pixels(spec, log), progress, log).run()


class PixelWriter:
    def __init__(self, plan: PixelPlan, progress: bool = True, log=print):
        self.plan, self.progress, self.log = plan, progress, log
        self.folder, self.key = plan.folder, plan.key

    def run(self) -> Path:
        plan = self.plan
        report = plan.cache.check_complete(plan.cache.previous_manifest())
        if report is not None:
            if not report.damaged:
                self.log(f"pixel cache already complete: {self.folder}")
                return self.folder
            self.log(f"warning: {report.summary()}; recomputing them")
        lock = CacheLock(self.folder)
        fresh = not self.folder.exists()
        try:
            ensure_writable_dir(self.folder)
            lock.acquire()
            if lock.stale_message:
                self.log(lock.stale_message)
            removed = remove_orphans(self.folder)
            if removed:
                self.log(f"removed {len(removed)} unfinished shard file(s) from an interrupted run")
            plan.cache.set_aside_damaged(report)
            self._write_all()
            manifest = self._manifest()
            if manifest["status"] != "complete":
                raise FmcacheError(f"the pixel cache ended with missing shards in {self.folder}; rerun the command")
        except BaseException:
            if fresh and lock.held:  # a fresh run that failed before any shard leaves no folder behind
                plan.cache.remove_if_empty(lock)
            raise
        finally:
            lock.release()
        return self.folder

    def _base(self) -> dict:
        plan = self.plan
        crop = plan.prefix["crop"]
        counts = {s: int(np.isin(plan.positions, plan.index.indices(s)).sum()) for s in ("train", "val", "test")}
        return {
            "schema": SCHEMA_VERSION,
            "kind": KIND,
            "key": self.key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "inputs": plan.inputs,
            "pixels": {"height": crop, "width": crop, "channels": plan.channels, "dtype": "uint8", "layout": "HWC"},
            "dataset": {
                "name": plan.index.name,
                "root": str(plan.index.root),
                "fingerprint": plan.inputs["dataset"]["fingerprint"],
                "n": len(plan.positions),
                "limit": plan.spec.limit,
                "split_counts": counts,
            },
            "shard_size": plan.spec.shard_size,
            "versions": _versions(),
        }

    def _manifest(self) -> dict:
        return self.plan.cache.write_manifest(self._base(), self._written, self.plan.num_shards)

    def _write_all(self) -> None:
        plan = self.plan
        self._written: dict[str, dict] = {}
        self._manifest()
        done = set(finished_shards(self.folder))
        todo = [s for s in range(plan.num_shards) if s not in done]
        total = sum(len(plan.shard_positions(s)) for s in todo)
        left = total * sample_bytes(plan.prefix["crop"], plan.prefix["crop"], plan.channels)
        self.log(plan.describe() + (f"; {human_size(left)} left to write" if done else ""))
        free = shutil.disk_usage(self.folder).free
        if free < left:
            self.log(f"warning: {human_size(left)} to write and {human_size(free)} free under {self.folder}")
        source = DecodedCrops(plan.index, plan.prefix, plan.channels)
        writer = BackgroundWriter()
        try:
            with progress_bar(self.progress, total, f"pixels → {self.folder}", "pixels") as advance:
                for shard in todo:
                    self._write_shard(shard, source, writer, advance)
                    self._manifest()
        finally:
            writer.close()

    def _write_shard(self, shard: int, source: DecodedCrops, writer: BackgroundWriter, advance) -> None:
        plan, spec = self.plan, self.plan.spec
        positions = plan.shard_positions(shard)
        attrs = {"key": self.key, "schema": SCHEMA_VERSION, "shard": shard}
        shard_writer = ShardWriter(self.folder, shard, len(positions), attrs, None)
        loader = DataLoader(
            _Crops(source, positions),
            batch_size=spec.batch_size,
            shuffle=False,
            num_workers=spec.workers,
            collate_fn=_collate,
        )
        start = time.perf_counter()
        try:
            for items in loader:
                bad = [(gid, why) for crop, gid, why in items if crop is None]
                if bad:
                    raise FmcacheError(bad[0][1])
                arrays = {"ids": np.array([gid for _, gid, _ in items], np.int64)}
                arrays[PIXELS] = np.stack([crop for crop, _, _ in items])
                writer.submit(lambda a=arrays: shard_writer.append(a))
                advance(len(items))
            writer.drain()
            entry = shard_writer.commit({"skipped": []})
            entry["seconds"] = time.perf_counter() - start
        except BaseException:
            with contextlib.suppress(BaseException):  # the original error is the one to report
                writer.drain()
            shard_writer.abort()
            raise
        self._written[entry["file"]] = entry


# -- finding the pixel cache a run can read --------------------------------------------------------------------------


@dataclass
class Match:
    """A pixel cache a run may read (``reader``), or why none fits (``why``, one line, and the command that writes
    one)."""

    reader: PixelReader | None
    why: str = ""
    folder: Path | None = None

    def record(self) -> str:
        """``details.data_source`` of a result: images, or the pixel cache's key."""
        return f"pixels:{self.reader.key}" if self.reader is not None else "images"


def _differences(manifest: dict, index: DatasetIndex, fingerprint: str, prefix: dict, limit: int | None) -> list[str]:
    inputs = manifest.get("inputs") or {}
    data, have = inputs.get("dataset") or {}, inputs.get("prefix") or {}
    out = []
    if data.get("fingerprint") != fingerprint:
        out.append("its images differ from the dataset's now (the fingerprint of path, size and mtime changed)")
    for name, label in (("crop", "crop"), ("resize", "resize"), ("interpolation", "interpolation")):
        if have.get(name) != prefix[name]:
            out.append(f"{label} {have.get(name)} (this run: {prefix[name]})")
    cached_limit = data.get("limit")
    if cached_limit is not None and (limit is None or limit > cached_limit or data.get("split") != index.split_info):
        out.append(f"it holds the first {cached_limit} samples of each split only (this run: {limit or 'all'})")
    return out


def find_pixels(
    cache_root: Path,
    index: DatasetIndex,
    prefix: dict,
    limit: int | None,
    fingerprint: str | None = None,
) -> Match:
    """The complete pixel cache of ``index`` under ``cache_root`` that stores ``prefix`` for every sample a run with
    ``limit`` reads; else why not (the closest cache's differences, or that there is none)."""
    fingerprint = fingerprint or index.fingerprint()
    command = command_for(index.name, index.root, prefix, cache_root)
    found = []
    for folder in pixel_caches(cache_root, index.name):
        try:
            manifest = read_manifest(folder)
        except FmcacheError:
            continue
        if not manifest or manifest.get("kind") != KIND:
            continue
        differs = _differences(manifest, index, fingerprint, prefix, limit)
        if not differs:
            if manifest.get("status") != "complete" or not CacheFolder(folder, manifest["key"]).is_complete():
                done = len(manifest.get("shards", []))
                found.append(
                    (0, folder, f"pixel cache {folder} is not complete ({done}/{manifest.get('num_shards')} shards)")
                )
                continue
            return Match(PixelReader(folder), folder=folder)
        found.append((len(differs), folder, f"pixel cache {folder} differs: {'; '.join(differs)}"))
    if not found:
        return Match(None, f"no pixel cache of {index.name} under {cache_root}; write one with `{command}`")
    _, folder, why = min(found, key=lambda f: f[0])
    return Match(None, f"{why}; write a matching one with `{command}`", folder)


# -- extract --views from a pixel cache ------------------------------------------------------------------------------


def views_pixels(plan: ExtractPlan, log=print) -> Match | None:
    """For ``extract --views K``: the matching pixel cache, when one exists and the center crops and the views start
    from the same prefix (the default resize and interpolation), else None (the images are decoded)."""
    if not plan.spec.views:
        return None
    prefix = prefix_of(plan.transform_desc)
    if prefix != prefix_spec(plan.img_size):  # the train augmentation's prefix is always the seed's default
        return None
    try:  # both transforms must start with exactly that prefix (anything else would see other pixels)
        for transform in (plan.transform, plan.augment):
            transform_suffix(transform, prefix)
    except FmcacheError:
        return None
    fingerprint = plan.inputs["dataset"]["fingerprint"] if plan.spec.fingerprint == "stat" else None
    match = find_pixels(plan.spec.cache_root, plan.index, prefix, plan.spec.limit, fingerprint)
    if match.reader is None:
        return None
    log(f"note: the center crops and views start from pixel cache {match.folder} (no image is decoded)")
    return match


def views_dataset(plan: ExtractPlan, positions: np.ndarray, pixels: Match | None, seed: int) -> ViewsImageDataset:
    """The views dataset of one shard: from the images, or from ``pixels`` (:func:`views_pixels`) with the steps
    after the prefix; either gives the same tensors."""
    if pixels is None:
        return ViewsImageDataset(plan.index, positions, plan.transform, plan.augment, plan.spec.views, seed)
    prefix = prefix_of(plan.transform_desc)
    transform, augment = (transform_suffix(t, prefix) for t in (plan.transform, plan.augment))
    return ViewsImageDataset(plan.index, positions, transform, augment, plan.spec.views, seed, pixels.reader)
