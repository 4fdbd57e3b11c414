"""External validation from a grid YAML (issue #29): transfer jobs after the heads they apply, external sets extracted
for them only, corrupted test caches, the dry run's plan and cost, and --only with the whole dependency chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fmcache.cli import app
from fmcache.errors import FmcacheError
from fmcache.grid.config import load_grid
from fmcache.grid.jobs import expand, select
from fmcache.results import RESULT_JSON, find_results
from tests.conftest import TINY_MODEL, TINY_OVERRIDES, TINY_SIZE
from tests.fixtures_data import make_isic
from tests.fixtures_external import make_pad_ufes20

runner = CliRunner()


def _yaml(tmp_path: Path, transfer: list[dict], **data_roots: Path) -> Path:
    doc = {
        "results": "out/results",
        "cache_root": "out/cache",
        "models": [{"name": TINY_MODEL, "random_init": True, "img_size": TINY_SIZE, "arch_overrides": TINY_OVERRIDES}],
        "datasets": [{"name": name, "root": str(root)} for name, root in data_roots.items()],
        "extract": {"batch_size": 8, "workers": 0, "shard_size": 64},
        "protocols": {
            "knn": {"ks": [3], "layer": "last"},
            "probe_linear": {"lrs": [1.0e-2], "seeds": 2, "epochs": 2, "layer": "last", "batch_size": 16},
            "transfer": transfer,
        },
    }
    path = tmp_path / "external.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("external_data")
    return {"isic2019": make_isic(base / "isic", n=48), "pad_ufes20": make_pad_ufes20(base / "pad", n=24, seed=7)}


def test_jobs_and_dependencies(tmp_path: Path, roots: dict[str, Path]) -> None:
    transfer = [
        {"from": "probe_linear", "source": "isic2019", "target": "pad_ufes20"},
        {"from": "knn", "source": "isic2019", "target": "pad_ufes20"},
        {"from": "probe_linear", "source": "isic2019", "target": "isic2019", "corrupt": ["gaussian_noise"],
         "severities": [1, 3], "drop_overlap": True},
    ]  # fmt: skip
    jobs = expand(load_grid(_yaml(tmp_path, transfer, **roots)))
    ids = [j.id for j in jobs]
    model = TINY_MODEL
    # the external set is extracted (for transfer) but no protocol trains on it
    assert f"extract/pad_ufes20/{model}" in ids and f"knn/pad_ufes20/{model}" not in ids
    assert f"probe_linear/pad_ufes20/{model}" not in ids
    # corrupted test caches of the source dataset, one per corruption and severity
    assert {f"extract/isic2019/{model}@gaussian_noise:1", f"extract/isic2019/{model}@gaussian_noise:3"} <= set(ids)
    by_id = {j.id: j for j in jobs}
    first = by_id[f"transfer#0/pad_ufes20/{model}"]
    assert first.deps == [f"probe_linear/isic2019/{model}", f"extract/pad_ufes20/{model}"]
    assert by_id[f"transfer#1/pad_ufes20/{model}"].deps[0] == f"knn/isic2019/{model}"
    noisy = by_id[f"transfer#2/isic2019/{model}@gaussian_noise:3"]
    assert noisy.extract["corrupt"] == "gaussian_noise:3" and noisy.options["drop_overlap"] is True
    assert ids.index(first.deps[0]) < ids.index(first.id)  # heads first
    # --only transfer keeps the whole chain: heads job, its extract, the target's extract
    kept = {j.id for j in select(jobs, "transfer")}
    assert {f"extract/isic2019/{model}", f"probe_linear/isic2019/{model}", f"extract/pad_ufes20/{model}"} <= kept


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"source": "isic2019", "target": "pad_ufes20"}, "needs from"),
        ({"from": "cka", "source": "isic2019", "target": "pad_ufes20"}, "keeps heads"),
        ({"from": "probe_linear", "source": "isic2019", "target": "cmmd"}, "not a dataset of this grid"),
        ({"from": "probe_linear", "source": "isic2019", "target": "isic2019", "corrupt": "gamma_corr_up"}, "not a"),
        ({"from": "probe_linear", "source": "isic2019", "target": "isic2019", "corrupt": "gaussian_noise",
          "severities": [7]}, "severity must be 1-5"),
        ({"from": "probe_linear", "source": "isic2019", "target": "pad_ufes20", "heads": "x"}, "unknown key"),
    ],
)  # fmt: skip
def test_bad_transfer_variants_are_one_line(tmp_path: Path, roots: dict[str, Path], variant, message) -> None:
    with pytest.raises(FmcacheError, match=message):
        load_grid(_yaml(tmp_path, [variant], **roots))


def test_heads_from_an_evaluation_only_set_are_refused(tmp_path: Path, roots: dict[str, Path]) -> None:
    grid = load_grid(_yaml(tmp_path, [{"from": "probe_linear", "source": "pad_ufes20", "target": "isic2019"}], **roots))
    with pytest.raises(FmcacheError, match="does not run"):
        expand(grid)


@pytest.mark.slow
def test_grid_runs_transfer_and_corruptions_then_does_nothing(tmp_path: Path, roots: dict[str, Path]) -> None:
    transfer = [
        {"from": "probe_linear", "source": "isic2019", "target": "pad_ufes20"},
        {"from": "probe_linear", "source": "isic2019", "target": "isic2019", "corrupt": "contrast_down",
         "severities": [2, 5], "drop_overlap": True},
    ]  # fmt: skip
    path = _yaml(tmp_path, transfer, **roots)
    dry = runner.invoke(app, ["grid", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "external validation: 1 job(s)" in dry.output and "corruption robustness: 2 job(s)" in dry.output
    first = runner.invoke(app, ["grid", str(path)])
    assert first.exit_code == 0, first.output
    results = tmp_path / "out" / "results"
    docs = [d for d in find_results(results) if d["protocol"] == "transfer"]
    assert len(docs) == 3
    targets = sorted((d["target"]["dataset"], (d["target"].get("corruption") or {}).get("severity")) for d in docs)
    assert targets == [("isic2019", 2), ("isic2019", 5), ("pad_ufes20", None)]
    (source,) = [d for d in find_results(results) if d["protocol"] == "probe_linear"]
    assert all(d["source"]["folder"] == source["folder"] for d in docs)
    pad = next(d for d in docs if d["target"]["dataset"] == "pad_ufes20")
    assert pad["label_map"]["origin"] and json.loads((Path(pad["folder"]) / RESULT_JSON).read_text())["summary"]
    again = runner.invoke(app, ["grid", str(path)])
    assert again.exit_code == 0 and "0 ran" in again.output, again.output
    # the report's two sections read them
    report = runner.invoke(app, ["report", str(results), "--out", str(tmp_path / "report"), "--resamples", "50"])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "External validation" in text and "Corruption robustness" in text
    assert (tmp_path / "report" / "external_validation.csv").is_file()
