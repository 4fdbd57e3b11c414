"""``manifest.json``: the cache's table of contents, rebuilt from the finished shards and rewritten atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py

from fmcache.cache.messages import damaged_shard
from fmcache.cache.shards import finished_shards
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_json, sha256_file

MANIFEST = "manifest.json"


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise FmcacheError(
            f"{path} is not valid JSON ({exc}); rerun the same `fmcache extract` command: "
            "it rebuilds the manifest from the shard files"
        ) from exc


def shard_entries(folder: Path, key: str, known: dict[str, dict]) -> list[dict]:
    """Entries for every finished shard on disk; checksums are reused from ``known`` where available.

    Only complete shards have their final name (they are renamed after close), so the scan never lists a
    partial one. A shard whose key attribute differs is foreign and refused.
    """
    entries = []
    for index, path in sorted(finished_shards(folder).items()):
        try:
            with h5py.File(path, "r") as fh:
                attrs = dict(fh.attrs)
        except OSError as exc:  # callers check shards first; this is the last line of defence
            raise damaged_shard(path, exc) from exc
        if attrs.get("key") != key:
            raise FmcacheError(f"{path} belongs to another cache (key mismatch); delete it and extract again")
        entry = known.get(path.name) or {"file": path.name, "n": int(attrs["n"]), "sha256": sha256_file(path)}
        if "size" not in entry:  # manifests written before sizes were recorded
            entry = {**entry, "size": path.stat().st_size}
        # per-shard compute time lives in the manifest only (shard bytes must not depend on timing)
        seconds = float(entry.get("seconds", attrs.get("seconds", 0.0)))
        entry = {**entry, "index": index, "seconds": seconds}
        entry["skipped"] = json.loads(attrs.get("skipped", "[]"))
        entries.append(entry)
    return entries


def write_manifest(folder: Path, base: dict, entries: list[dict], planned_shards: int) -> dict:
    """Rewrite the manifest from ``base`` (key inputs, model and dataset info) plus the shard entries."""
    done = {e["index"] for e in entries}
    complete = done == set(range(planned_shards))
    seconds = sum(e["seconds"] for e in entries)
    images = sum(e["n"] for e in entries)
    manifest = {
        **base,
        "status": "complete" if complete else "partial",
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "num_shards": planned_shards,
        "shards": [{k: e[k] for k in ("file", "index", "n", "size", "sha256", "seconds")} for e in entries],
        "skipped": [s for e in entries for s in e["skipped"]],
        "timings": {
            "extract_seconds": round(seconds, 3),
            "images": images,
            "s_per_img": round(seconds / images, 6) if images else None,
        },
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def record_conformance(folder: Path, verdict: dict, weights_sha256: str) -> dict:
    """Add ``fmcache conformance``'s verdict to a cache's manifest (atomically), as ``conformance``; refused when the
    cache was extracted from other weights than the file checked, so a verdict never vouches for another model."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise FmcacheError(f"{folder} holds no manifest.json; give a cache folder (see `fmcache ls`)")
    model = (manifest.get("inputs") or {}).get("model") or {}
    weights = model.get("weights") or {}
    if model.get("name") != verdict.get("model") or weights.get("sha256") != weights_sha256:
        raise FmcacheError(
            f"cache {folder} holds {model.get('name')} with weights {weights}; the check ran on {verdict.get('model')} "
            f"with the file of sha256 {weights_sha256[:12]}...: check the cache's own model and --weights file"
        )
    manifest["conformance"] = verdict
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest
