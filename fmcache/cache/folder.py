"""A cache folder's life around a writer: its previous manifest, whether it is complete, damaged shards set aside,
the manifest rewritten from the shard files, and a failed fresh folder removed.

The extraction (:mod:`fmcache.extract.run`) asks these questions before and after it runs a model; the grid asks
"is this cache complete?" through the same code without building anything (:mod:`fmcache.extract.plan`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from fmcache.cache.annotations import ANNOTATIONS
from fmcache.cache.lock import CacheLock
from fmcache.cache.manifest import MANIFEST, read_manifest, shard_entries, write_manifest
from fmcache.cache.shards import finished_shards, remove_orphans
from fmcache.cache.verify import DAMAGED_DIR, VerifyReport, drop_from_manifest, open_check, quarantine, verify_cache
from fmcache.errors import FmcacheError

Log = Callable[[str], None]


class CacheFolder:
    """``<cache_root>/<dataset>/<model>/<key12>`` of one key; ``verify`` hash-checks shards (``--verify``)."""

    def __init__(self, folder: Path, key: str, verify: bool = False, log: Log = print):
        self.folder, self.key, self.verify, self.log = Path(folder), key, verify, log

    def previous_manifest(self, quiet: bool = False) -> dict | None:
        """The manifest on disk, or None; an unreadable one is rebuilt from the shard files, not fatal."""
        if not self.folder.is_dir():
            return None
        try:
            manifest = read_manifest(self.folder)
        except FmcacheError as exc:
            if not quiet:
                self.log(f"warning: {str(exc).split(';')[0]}; rebuilding it from the shard files")
            return None
        return manifest if manifest and manifest.get("key") == self.key else None

    def check_complete(self, manifest: dict | None) -> VerifyReport | None:
        """The shard checks of a manifest that says complete (None for any other): cheap by default (a stat and
        a metadata read per shard), and with ``verify`` every sha256 too."""
        if not manifest or manifest.get("status") != "complete":
            return None
        return verify_cache(self.folder, full=self.verify, manifest=manifest)

    def is_complete(self) -> bool:
        """The manifest says complete and every shard passes the cheap checks (or the full ones with ``verify``)."""
        report = self.check_complete(self.previous_manifest(quiet=True))
        return report is not None and not report.damaged

    def set_aside_damaged(self, checked: VerifyReport | None) -> None:
        """Under the lock: finished shards that fail the checks move to damaged/, so the writer recomputes them.

        ``checked`` is the report from before the lock; it stands when the manifest has not changed since, so a
        damaged complete cache is not opened (or, with ``verify``, hashed) twice.
        """
        on_disk = finished_shards(self.folder)
        if not on_disk:
            return
        manifest = self.previous_manifest(quiet=True)
        if manifest is None:  # no usable manifest: all that can be checked is that each shard opens
            checks = [open_check(path, index) for index, path in sorted(on_disk.items())]
        elif checked is not None and checked.manifest == manifest:
            checks = checked.checks
        else:
            checks = verify_cache(self.folder, full=self.verify, manifest=manifest).checks
        moved = quarantine(self.folder, checks)
        if moved:
            names = ", ".join(f"{file} ({c.problem})" for file, _ in moved for c in checks if c.file == file)
            self.log(f"warning: moved {len(moved)} damaged shard(s) to {DAMAGED_DIR}/ for recomputation: {names}")
            if manifest is not None:
                drop_from_manifest(self.folder, manifest)  # partial at once, even if this run is interrupted

    def write_manifest(self, base: dict, written: dict[str, dict], num_shards: int) -> dict:
        """Rebuild the manifest from the shard files (so every rank's finished work is listed after a crash too)."""
        previous = self.previous_manifest(quiet=True) or {}
        known = {s["file"]: s for s in previous.get("shards", []) if "sha256" in s}
        known.update(written)
        return write_manifest(self.folder, base, shard_entries(self.folder, self.key, known), num_shards)

    def remove_if_empty(self, lock: CacheLock) -> None:
        """A fresh run that failed before finishing any shard leaves no folder behind.

        Called only while the caller holds ``lock``, so the manifest and temporary files are its own.
        """
        if not self.folder.is_dir() or finished_shards(self.folder):
            return
        (self.folder / MANIFEST).unlink(missing_ok=True)
        (self.folder / ANNOTATIONS).unlink(missing_ok=True)
        remove_orphans(self.folder)
        lock.release()
        with contextlib.suppress(OSError):
            self.folder.rmdir()  # fails harmlessly when another run has put its lock in it meanwhile
            self.folder.parent.rmdir()  # <model>/ and <dataset>/ too, when nothing else lives there
            self.folder.parent.parent.rmdir()
