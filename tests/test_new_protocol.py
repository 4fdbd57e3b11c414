"""Adding a protocol is one row, one spec and one runner: a toy protocol (nearest class centroid on the pooled
features) registered here runs through `grid --dry-run`, `grid` and `report` without touching any other module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fmcache import metrics
from fmcache.cache.reader import CacheReader
from fmcache.frozen.common import protocol_dir, resolve_metric, result_source
from fmcache.frozen.specs import EVAL_SPLITS, CacheSpec
from fmcache.grid.config import GridOptions
from fmcache.grid.main import run_grid
from fmcache.protocols import Protocol
from fmcache.report.render import build_report
from fmcache.results import find_results, write_result
from fmcache.runners import bind, unbind

# the row: what it reads, how its results compete (k-NN's "rows": a value per k), which cost model prices it
CENTROID = Protocol("nearest_centroid", "nearest_centroid", "pooled", "rows", "neighbours",
                    describes="the nearest class centroid on L2-normalised pooled features (a test's toy)")  # fmt: skip


@dataclass(frozen=True)
class CentroidSpec(CacheSpec):
    """The spec: the cost model's k-NN inputs (one "neighbour": the centroid) and the layer."""

    ks: tuple[int, ...] = (1,)
    layer: str = "last"
    eval_splits: tuple[str, ...] = EVAL_SPLITS
    metric: str | None = None


def run_centroid(spec: CentroidSpec, progress: bool = False, log=print) -> dict:
    """The runner: centroids of the train split's normalised features, cosine to each, softmax as scores."""
    reader = CacheReader(spec.cache)
    metric = resolve_metric(reader, spec.metric)

    def features(split: str) -> np.ndarray:
        x = reader.pooled(split, spec.layer, "mean").astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    train, labels = features("train"), reader.labels("train").astype(int)
    centroids = np.stack([train[labels == c].mean(0) for c in range(len(reader.class_names))])
    scores = {s: np.exp(10 * features(s) @ centroids.T) for s in spec.eval_splits}
    scores = {s: v / v.sum(1, keepdims=True) for s, v in scores.items()}
    values = {s: metrics.evaluate(metric, reader.labels(s), scores[s], False)["value"] for s in spec.eval_splits}
    rows = [
        {"layer": reader.num_layers, "split": s, "k": 1, "temperature": None, "value": v} for s, v in values.items()
    ]
    settings = {"layer": spec.layer, "eval_splits": list(spec.eval_splits), "metric": metric}
    folder = protocol_dir(reader, spec.out, CENTROID.name, settings)
    source = result_source(reader)
    summary = {"rows": rows, "best": {"k": 1, "layer": reader.num_layers, "test": values["test"], "val": values["val"]}}
    write_result(folder, protocol=CENTROID.name, settings=settings, dataset=reader.dataset, model=reader.model,
                 cache_key=reader.key, weights=source.weights, metric=metric, timings=source.timings(0.0, 0.0),
                 summary=summary, details={}, rows=rows, predictions=source.predictions(
                     {s: scores[s][None] for s in spec.eval_splits}, [-1]))  # fmt: skip
    return {"folder": folder, "metric": metric}


@pytest.fixture
def centroid():
    bind(CENTROID, CentroidSpec, run_centroid)
    yield CENTROID
    unbind(CENTROID.name)


def test_a_registered_protocol_runs_through_the_dry_run_the_grid_and_the_report(centroid, tmp_path: Path):
    config = tmp_path / "grid.yaml"
    config.write_text(
        "models: [{name: resnet50, random_init: true, img_size: 32}]\n"
        "datasets: [{name: imagefolder, root: data/digits, prepare: digits, per_class: 8}]\n"
        "extract: {batch_size: 32, workers: 0}\nprotocols: {nearest_centroid: {layer: last}}\n"
    )
    lines: list[str] = []
    plan = run_grid(config, GridOptions(dry_run=True, device_rate="h100"), log=lines.append)
    (job,) = [j for j in plan["pending"] if j.startswith("nearest_centroid")]
    assert plan["cost"]["jobs"][job]["ours"]["seconds"] > 0  # priced by the cost model its row names
    assert any("nearest_centroid" in line and "1 job(s)" in line for line in lines)
    done = run_grid(config, GridOptions(), log=lambda _m: None)
    assert job in done["ran"]
    (doc,) = [d for d in find_results(tmp_path / "results") if d["protocol"] == "nearest_centroid"]
    assert 0 <= doc["summary"]["best"]["test"] <= 1
    out = build_report(tmp_path / "results", tmp_path / "report", resamples=20, log=lambda _m: None)["out"]
    listed = (out / "supp_nearest_centroid_values.csv").read_text()  # it fills no paper output: supplementary
    assert doc["folder"] in listed
    assert doc["folder"] in (out / "fig3_time_values.csv").read_text()
