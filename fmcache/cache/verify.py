"""Cache integrity: check every shard against the manifest, and move damaged shards aside for recomputation.

Checks, cheapest first: the file exists, has the size the manifest recorded, opens as HDF5 with this cache's key,
shard number and row count, and holds the expected datasets with the expected shapes and dtypes. The full check
also compares the sha256 with the manifest's. ``extract`` runs the cheap checks before it trusts a cache
(a stat and a metadata read per shard); ``fmcache verify`` and ``extract --verify`` run the full one.

Repair never deletes anything: a damaged shard moves to ``damaged/`` under a name that no reader or resume
takes for a shard, and the manifest drops it and turns ``partial``, so rerunning the same ``extract``
recomputes exactly the shards that were moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fmcache.cache.annotations import check_annotations
from fmcache.cache.lock import CacheLock
from fmcache.cache.manifest import MANIFEST, read_manifest, shard_entries, write_manifest
from fmcache.cache.messages import one_line, repair_hint
from fmcache.cache.shards import PIXELS, feature_datasets, finished_shards, shard_name
from fmcache.cache.views import IDS as VIEW_IDS
from fmcache.cache.views import views_datasets, views_k
from fmcache.errors import FmcacheError
from fmcache.files import sha256_file

DAMAGED_DIR = "damaged"
OK, DAMAGED, PENDING = "ok", "damaged", "not extracted"
# manifest fields that write_manifest derives from the shards; everything else is the run's fixed base
_DERIVED = ("status", "updated", "num_shards", "shards", "skipped", "timings")


@dataclass
class ShardCheck:
    """The verdict on one planned shard."""

    index: int
    file: str
    state: str  # ok, damaged or "not extracted" (a partial cache's missing shard is not damage)
    n: int | None = None
    size: int | None = None  # bytes on disk, None when the file is missing
    problem: str = ""


@dataclass
class VerifyReport:
    folder: Path
    manifest: dict
    checks: list[ShardCheck]
    full: bool
    annotations: str | None = None  # what is wrong with annotations.npz (missing, changed), or None

    @property
    def damaged(self) -> list[ShardCheck]:
        return [c for c in self.checks if c.state == DAMAGED]

    @property
    def pending(self) -> list[ShardCheck]:
        return [c for c in self.checks if c.state == PENDING]

    def summary(self) -> str:
        """One line naming every damaged shard and its problem."""
        names = "; ".join(f"{c.file} {c.problem}" for c in self.damaged)
        return f"cache {self.folder} has {len(self.damaged)} damaged shard(s): {names}"


def load_manifest(folder: Path) -> dict:
    folder = Path(folder)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        raise FmcacheError(f"{folder} is not a cache (no {MANIFEST}); list caches with `fmcache ls`")
    return manifest


def is_pixel_manifest(manifest: dict | None) -> bool:
    """A pixel cache's manifest (``fmcache pixels``, :mod:`fmcache.cache.pixels`); feature caches have no kind."""
    return bool(manifest) and manifest.get("kind") == PIXELS


def expected_datasets(manifest: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Dataset name → (shape after the row axis, dtype) that every non-empty shard of this cache holds."""
    if is_pixel_manifest(manifest):  # ids and the (H, W, C) uint8 crops
        p = manifest["pixels"]
        return {"ids": ((), "int64"), PIXELS: ((int(p["height"]), int(p["width"]), int(p["channels"])), "uint8")}
    model, data = manifest["model"], manifest["dataset"]
    feat = "float16" if manifest.get("dtype", "fp16") == "fp16" else "float32"
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "ids": ((), "int64"),
        "split": ((), "int8"),
        "labels": (((len(data["class_names"]),), "float32") if data["multilabel"] else ((), "int64")),
    }
    return out | {name: (shape, feat) for name, shape in feature_datasets(model).items()}


def _layout_problem(fh: h5py.File, manifest: dict, index: int, n_listed: int | None) -> str:
    """'' when the open file's attributes and datasets are what the manifest describes, else the first problem."""
    attrs = fh.attrs
    if attrs.get("key") != manifest["key"]:
        return "belongs to another cache (key attribute differs)"
    if int(attrs.get("shard", -1)) != index:
        return f"holds shard {attrs.get('shard')} (attribute), not {index}"
    n = int(attrs.get("n", -1))
    if n_listed is not None and n != n_listed:
        return f"holds {n} rows, the manifest says {n_listed}"
    if n == 0:  # every image of this shard was skipped (--on-bad-image skip): no arrays at all
        return "" if "ids" not in fh else "holds arrays although its row count is 0"
    for name, (shape, dtype) in expected_datasets(manifest).items():
        if name not in fh:
            return f"lacks dataset {name}"
        ds = fh[name]
        if not isinstance(ds, h5py.Dataset) or ds.shape != (n, *shape):
            return f"dataset {name} has shape {getattr(ds, 'shape', '?')}, expected {(n, *shape)}"
        if ds.dtype != np.dtype(dtype):
            return f"dataset {name} has dtype {ds.dtype}, expected {dtype}"
    return _views_problem(fh, manifest)


def _views_problem(fh: h5py.File, manifest: dict) -> str:
    """'' when the views/ group holds the shard's train rows (ids in row order) with the expected shapes, or the
    cache has no views; else the first problem."""
    k = views_k(manifest)
    if not k:
        return ""
    train = fh["split"][...] == 0
    want_ids = fh["ids"][...][train]
    if VIEW_IDS not in fh or not isinstance(fh[VIEW_IDS], h5py.Dataset):
        return f"lacks dataset {VIEW_IDS}"
    if fh[VIEW_IDS].shape != want_ids.shape or not np.array_equal(fh[VIEW_IDS][...], want_ids):
        return f"dataset {VIEW_IDS} does not list the shard's {len(want_ids)} train rows"
    feat = "float16" if manifest.get("dtype", "fp16") == "fp16" else "float32"
    for name, shape in views_datasets(manifest["model"], k).items():
        if name not in fh:
            return f"lacks dataset {name}"
        ds = fh[name]
        if not isinstance(ds, h5py.Dataset) or ds.shape != (len(want_ids), *shape):
            return f"dataset {name} has shape {getattr(ds, 'shape', '?')}, expected {(len(want_ids), *shape)}"
        if ds.dtype != np.dtype(feat):
            return f"dataset {name} has dtype {ds.dtype}, expected {feat}"
    return ""


def check_shard(path: Path, manifest: dict, index: int, entry: dict | None, full: bool) -> ShardCheck:
    """Cheap checks (stat, open, layout), then the sha256 when ``full``; never raises for a damaged file."""
    check = ShardCheck(index=index, file=path.name, state=OK, n=entry["n"] if entry else None)
    try:
        check.size = path.stat().st_size
    except FileNotFoundError:
        check.state, check.problem = DAMAGED, "is missing"
        return check
    except OSError as exc:
        check.state, check.problem = DAMAGED, f"cannot be read ({one_line(exc)})"
        return check
    want = entry.get("size") if entry else None
    if want is not None and check.size != want:
        check.state, check.problem = DAMAGED, f"has {check.size} bytes, the manifest says {want}"
        return check
    try:
        with h5py.File(path, "r") as fh:
            problem = _layout_problem(fh, manifest, index, check.n)
            if check.n is None:
                check.n = int(fh.attrs.get("n", 0))
    except Exception as exc:  # h5py raises OSError, KeyError, RuntimeError or ValueError for broken files
        problem = f"does not open as HDF5 ({one_line(exc, 120)})"
    if not problem and full and entry is not None and "sha256" in entry:
        try:
            if sha256_file(path) != entry["sha256"]:
                problem = "content differs from the manifest (sha256 mismatch)"
        except OSError as exc:
            problem = f"cannot be read ({one_line(exc)})"
    if problem:
        check.state, check.problem = DAMAGED, problem
    return check


def open_check(path: Path, index: int) -> ShardCheck:
    """Without a manifest, a finished shard counts as damaged only when it does not open as HDF5."""
    try:
        with h5py.File(path, "r"):
            return ShardCheck(index=index, file=path.name, state=OK)
    except Exception as exc:  # h5py raises several types for a broken file
        return ShardCheck(index=index, file=path.name, state=DAMAGED, problem=f"does not open ({exc})")


def verify_cache(folder: str | Path, full: bool = True, manifest: dict | None = None) -> VerifyReport:
    """Check every planned shard of the cache at ``folder`` (see the module doc for what is checked)."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else load_manifest(folder)
    listed = {int(s["index"]): s for s in manifest.get("shards", [])}
    on_disk = finished_shards(folder) if folder.is_dir() else {}
    complete = manifest.get("status") == "complete"
    checks = []
    for index in range(int(manifest.get("num_shards", len(listed)))):
        entry = listed.get(index)
        path = folder / (entry["file"] if entry else shard_name(index))
        if entry is None and index not in on_disk:
            # a partial cache simply has not got there yet; a complete one must list every shard
            state, problem = (DAMAGED, "is missing from a manifest that says complete") if complete else (PENDING, "")
            checks.append(ShardCheck(index=index, file=path.name, state=state, problem=problem))
            continue
        # a finished shard the manifest does not list yet (a crash between rename and manifest) is checked cheaply
        checks.append(check_shard(path, manifest, index, entry, full and entry is not None))
    report = VerifyReport(folder=folder, manifest=manifest, checks=checks, full=full)
    if full and manifest.get("annotations"):
        try:
            check_annotations(folder, manifest["annotations"])
        except FmcacheError as exc:
            report.annotations = str(exc)
    return report


def quick_problems(folder: Path, manifest: dict) -> list[tuple[str, str]]:
    """(file, problem) for listed shards that are missing or have the wrong size: one stat each, for info/ls."""
    problems = []
    for entry in manifest.get("shards", []):
        path = Path(folder) / entry["file"]
        try:
            size = path.stat().st_size
        except OSError:
            problems.append((entry["file"], "missing"))
            continue
        if entry.get("size") is not None and size != entry["size"]:
            problems.append((entry["file"], f"{size} bytes, manifest says {entry['size']}"))
    return problems


def _aside_name(folder: Path, file: str) -> Path:
    """A free name under damaged/ that does not end in .h5, so no glob for shards ever picks it up."""
    base = folder / DAMAGED_DIR / f"{file}.damaged"
    path, count = base, 1
    while path.exists():
        count += 1
        path = base.with_name(f"{base.name}-{count}")
    return path


def quarantine(folder: Path, checks: list[ShardCheck]) -> list[tuple[str, Path]]:
    """Move each damaged shard file that exists into ``damaged/``; the caller holds the cache lock."""
    moved = []
    for check in checks:
        path = folder / check.file
        if check.state != DAMAGED or not path.exists():
            continue
        target = _aside_name(folder, check.file)
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
        moved.append((check.file, target))
    return moved


def drop_from_manifest(folder: Path, manifest: dict) -> dict:
    """Rewrite the manifest from the shards left on disk: damaged ones are gone, so the status turns partial."""
    known = {s["file"]: s for s in manifest.get("shards", []) if (folder / s["file"]).is_file()}
    base = {k: v for k, v in manifest.items() if k not in _DERIVED}
    # skipped images and per-shard seconds come back from the remaining shards' attributes and entries
    entries = shard_entries(folder, manifest["key"], known)
    return write_manifest(folder, base, entries, int(manifest["num_shards"]))


def repair_cache(report: VerifyReport) -> list[tuple[str, Path]]:
    """Move the damaged shards of ``report`` aside and mark the cache partial (under the writer lock)."""
    if not report.damaged:
        return []
    folder = report.folder
    with CacheLock(folder):
        moved = quarantine(folder, report.damaged)
        drop_from_manifest(folder, report.manifest)
    return moved


def repair_message(report: VerifyReport, moved: list[tuple[str, Path]]) -> str:
    where = f"{report.folder / DAMAGED_DIR}/" if moved else "nowhere (no damaged file was on disk)"
    command = "fmcache pixels" if is_pixel_manifest(report.manifest) else "fmcache extract"
    return (
        f"moved {len(moved)} damaged shard file(s) to {where}; the cache is now partial: rerun the same "
        f"`{command}` command to recompute {len(report.damaged)} shard(s)"
    )


def damage_error(report: VerifyReport) -> FmcacheError:
    hint = repair_hint(report.folder)
    if is_pixel_manifest(report.manifest):
        hint = hint.replace("fmcache extract", "fmcache pixels")
    return FmcacheError(f"{report.summary()}; {hint}")
