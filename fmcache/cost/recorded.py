"""The cost of jobs from what earlier runs recorded: the seconds of finished results and of complete caches.

Beside the model-based :class:`fmcache.cost.estimate.Estimator`, with the same API (:func:`estimate_jobs`): a job
costs the mean recorded time of the same kind and model, else of its kind; a kind never run has no estimate.
"""

from __future__ import annotations

from pathlib import Path

from fmcache.cache.manifest import read_manifest
from fmcache.cost.estimate import Cost, JobCost
from fmcache.errors import FmcacheError
from fmcache.results import find_results

EXTRACT = "extract"  # the grid's stage-one job kind, as caches record their extraction time
PIXELS = "pixels"  # the grid's pixel-cache job kind, as pixel caches' manifests say their kind


def recorded_seconds(results: Path, cache_root: Path) -> dict[tuple[str, str], list[float]]:
    """Recorded seconds by (kind, model): each result's train time, each complete cache's extraction time."""
    seconds: dict[tuple[str, str], list[float]] = {}
    if results.is_dir():
        for doc in find_results(results):
            t = (doc.get("timings") or {}).get("train_seconds")
            if t is not None:
                seconds.setdefault((doc["protocol"], doc["model"]), []).append(float(t))
    if cache_root.is_dir():
        for manifest in cache_root.glob("*/*/*/manifest.json"):
            try:
                doc = read_manifest(manifest.parent) or {}
            except (OSError, FmcacheError):
                continue
            shard_seconds = [s.get("seconds") for s in doc.get("shards") or [] if s.get("seconds") is not None]
            if doc.get("status") == "complete" and shard_seconds:
                # a pixel cache (fmcache pixels) is the grid's "pixels" job, its model the crops' size
                kind, name = (
                    (PIXELS, PIXELS) if doc.get("kind") == PIXELS else (EXTRACT, doc.get("model", {}).get("name", "?"))
                )
                seconds.setdefault((kind, name), []).append(sum(shard_seconds))
    return seconds


class RecordedEstimator:
    """A job's seconds from recorded runs (:func:`recorded_seconds`); FLOPs and bytes are not known here."""

    def __init__(self, recorded: dict[tuple[str, str], list[float]]):
        self.recorded = recorded

    def job(self, job) -> JobCost:
        same = self.recorded.get((job.kind, job.model["name"]))
        if not same:
            same = [s for (kind, _model), values in self.recorded.items() if kind == job.kind for s in values]
        if not same:
            raise FmcacheError(f"no recorded run of kind {job.kind}")
        seconds = sum(same) / len(same)
        return JobCost(Cost(seconds=seconds), Cost())
