"""knn and probe from a real cache: result files, reference equality, the demo check, and CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fmcache.cache.reader import CacheReader
from fmcache.cli import app
from fmcache.errors import FmcacheError
from fmcache.frozen.common import results_dir
from fmcache.frozen.features import standardize_splits
from fmcache.frozen.knn import knn_predict
from fmcache.frozen.sklearn_ref import fit_sklearn_reference
from fmcache.metrics import evaluate
from fmcache.results import find_results, is_complete
from tests.conftest import knn, probe

runner = CliRunner()


def test_knn_from_cache_writes_files_and_equals_the_library(tiny_cache: Path, tmp_path: Path):
    reader = CacheReader(tiny_cache)
    result = knn(reader, out=tmp_path, ks=(3, 5), temperature=0.1, layer="all", pool="cls")
    folder = result["folder"]
    assert folder.parent == results_dir(reader, tmp_path) and folder.name.startswith("knn-")
    for name in ("result.json", "result.csv", "predictions.npz", "knn_vs_k.png", "knn_vs_layer.png"):
        assert (folder / name).is_file(), name
    payload = json.loads((folder / "result.json").read_text())
    assert payload["cache_key"] == reader.key and payload["fmcache_version"] and payload["protocol"] == "knn"
    assert payload["settings"]["ks"] == [3, 5] and payload["settings"]["layers"] == [1, 2]
    assert payload["settings_hash"].startswith(folder.name.split("-")[1])
    best = payload["summary"]["best"]
    assert best["layer"] == 2 and best["k"] in (3, 5)
    assert len(payload["summary"]["rows"]) == 2 * 2 * 2  # layers × splits × ks
    with np.load(folder / "predictions.npz") as npz:
        assert npz["test_scores"].shape == (1, len(reader.ids("test")), 5)
        recomputed = evaluate("qwk", npz["test_labels"], npz["test_scores"][0], False)["value"]
    assert recomputed == pytest.approx(best["test"], abs=1e-6)
    # the stored numbers are those of k-NN on the cached features, scored by the dataset's metric (QWK)
    bank, labels = reader.pooled("train", 2, "cls"), reader.labels("train")
    scores = knn_predict(bank, labels, reader.pooled("test", 2, "cls"), (3, 5), temperature=0.1, num_classes=5)
    expected = evaluate("qwk", reader.labels("test"), scores[5], False)["value"]
    assert result["layers"][2]["splits"]["test"][5]["value"] == pytest.approx(expected)
    assert result["metric"] == "qwk"


def test_probe_from_cache_writes_files(tiny_cache: Path, tmp_path: Path):
    reader = CacheReader(tiny_cache)
    result = probe(reader, out=tmp_path, lrs=(1e-3, 1e-2), seeds=2, epochs=3, batch_size=8)
    folder = result["folder"]
    assert folder.name.startswith("probe_linear-")
    assert (folder / "result.json").is_file() and (folder / "result.csv").is_file()
    assert (folder / "probe_linear_curves.png").is_file()
    payload = json.loads((folder / "result.json").read_text())
    layer = payload["details"]["layers"][str(reader.num_layers)]
    assert layer["best_lr"] in (1e-3, 1e-2) and len(layer["per_lr"]) == 2
    assert len(result["rows"]) == 4  # 2 LRs × 2 seeds
    summary = payload["summary"]
    assert summary["best_lr"] == layer["best_lr"] and summary["test_mean"] == pytest.approx(layer["test_mean"])
    assert summary["n_seeds"] == summary["seeds_requested"] == 2 and "per_layer" not in summary
    for key in ("train_seconds", "inference_seconds_per_sample", "extract_seconds_per_image"):
        assert payload["timings"][key] is not None, key
    assert payload["status"] == "complete" and payload["weights"] == reader.manifest["weights"]


def test_probe_predictions_are_what_the_metric_scored(tiny_cache: Path, tmp_path: Path):
    """predictions.npz holds the best LR's heads at their selected epoch: rescoring them gives the JSON's numbers."""
    reader = CacheReader(tiny_cache)
    result = probe(reader, out=tmp_path, lrs=(1e-3, 1e-2), seeds=(3, 7), epochs=3, batch_size=8, plots=False)
    folder = result["folder"]
    payload = json.loads((folder / "result.json").read_text())
    best = payload["details"]["layers"][str(reader.num_layers)]["per_lr"][str(payload["summary"]["best_lr"])]
    with np.load(folder / "predictions.npz") as npz:
        assert list(npz["seeds"]) == [3, 7]
        assert npz["test_scores"].dtype == np.float32 and npz["test_scores"].shape == (2, len(reader.ids("test")), 5)
        assert np.array_equal(npz["test_ids"], reader.ids("test"))
        assert np.array_equal(npz["val_labels"], reader.labels("val"))
        for i in range(2):
            test = evaluate("qwk", npz["test_labels"], npz["test_scores"][i], False)["value"]
            val = evaluate("qwk", npz["val_labels"], npz["val_scores"][i], False)["value"]
            assert test == pytest.approx(best["test_per_seed"][i], abs=1e-6)
            assert val == pytest.approx(best["val_per_seed"][i], abs=1e-6)


def test_runs_with_other_settings_get_their_own_folders(tiny_cache: Path, tmp_path: Path):
    reader = CacheReader(tiny_cache)
    first = probe(reader, out=tmp_path, lrs=(1e-3,), seeds=1, epochs=2, batch_size=8, plots=False)
    first_doc = (first["folder"] / "result.json").read_bytes()
    second = probe(reader, out=tmp_path, lrs=(1e-3,), seeds=1, epochs=3, batch_size=8, plots=False)
    assert first["folder"] != second["folder"] and first["folder"].parent == second["folder"].parent
    assert (first["folder"] / "result.json").read_bytes() == first_doc  # not overwritten
    knn_a = knn(reader, out=tmp_path, ks=(3,), plots=False)
    knn_b = knn(reader, out=tmp_path, ks=(5,), plots=False)
    assert knn_a["folder"] != knn_b["folder"]
    found = find_results(tmp_path)
    assert sorted(r["protocol"] for r in found) == ["knn", "knn", "probe_linear", "probe_linear"]
    assert {r["settings"]["epochs"] for r in found if r["protocol"] == "probe_linear"} == {2, 3}
    # the same settings (seeds as a count or as the list) name the same folder, so a rerun replaces it in place
    again = probe(reader, out=tmp_path, lrs=(1e-3,), seeds=[0], epochs=2, batch_size=8, plots=False)
    assert again["folder"] == first["folder"] and is_complete(again["folder"])


def test_standardize_uses_train_statistics():
    rng = np.random.default_rng(0)
    data = [(rng.normal(5, 3, (50, 4)).astype(np.float32), None), (rng.normal(5, 3, (10, 4)).astype(np.float32), None)]
    out = standardize_splits(data)
    assert np.allclose(out[0][0].mean(0), 0, atol=1e-5) and np.allclose(out[0][0].std(0), 1, atol=1e-4)
    mean, std = data[0][0].astype(np.float64).mean(0), data[0][0].astype(np.float64).std(0)
    assert np.allclose(out[1][0], (data[1][0] - mean) / std, atol=1e-5)


@pytest.mark.slow
def test_demo_probe_is_within_two_points_of_sklearn_on_the_demo_cache(tmp_path: Path):
    """The demo itself (digits → random-init ResNet-50 → k-NN → probe with --sklearn), checked against sklearn."""
    from fmcache.demo import run_demo

    result = run_demo(tmp_path / "demo", log=lambda m: None)
    ((layer, entry),) = result["probe"]["layers"].items()
    reader = CacheReader(result["cache"])
    data = standardize_splits([(reader.pooled(s, layer, "mean"), reader.labels(s)) for s in ("train", "val", "test")])
    reference = fit_sklearn_reference(*data[0], *data[1], *data[2], metric="accuracy")
    assert entry["sklearn"]["value"] == pytest.approx(reference["value"])
    assert reference["value"] > 0.8
    assert abs(entry["test_mean"] - reference["value"]) <= 0.02
    cka = result["cka"]  # the demo's CKA step: every stage against every stage, a 1 on the diagonal
    assert np.allclose(np.diag(cka["matrix"]), 1.0) and (cka["folder"] / "cka_heatmap.png").is_file()
    # its report shows the evidence (issue #28): a patient-level CI, a DeLong p-value, a reliability diagram, a
    # subgroup table and a critical-difference diagram, on the digits' synthetic patients
    report = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "] patient |" in report and "p (DeLong)" in report
    delong = [line for line in report.splitlines() if line.startswith("| Table 1 linear frozen | csv (auc)")]
    assert any(cell.strip().replace(".", "", 1).isdigit() for line in delong for cell in line.split("|")[-2:])
    figures = {p.name for p in (tmp_path / "demo" / "report" / "figures").iterdir()}
    assert any(n.startswith("supp_reliability_") for n in figures) and any(n.startswith("supp_cd_") for n in figures)
    assert "## Subgroups of imagefolder by sex" in report and "## Subgroups of csv by age_bin" in report


def _cli(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["knn", "{missing}"], "no cache at"),
        (["knn", "{cache}", "--layer", "9"], "layers 1..2"),
        (["knn", "{cache}", "--pool", "bogus"], "unknown --pool"),
        (["knn", "{cache}", "--metric", "f1"], "unknown metric"),
        (["knn", "{cache}", "--k", "10,500"], "larger than the train bank"),
        (["knn", "{cache}", "--eval", "holdout"], "bad --eval"),
        (["probe", "{cache}", "--head", "mlp"], "unknown --head"),
        (["probe", "{cache}", "--lrs", "a,b"], "bad --lrs"),
        (["probe", "{cache}", "--layer", "0"], "layer 0 does not exist"),
        (["probe", "{cache}", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["knn", "{cache}", "--pool", "paper", "--layer", "1"], "last layer (2) only"),
        (["knn", "{cache}", "--eval", "train,val"], "bad --eval"),
    ],
)
def test_stage_two_bad_input_is_one_line_and_exit_2(tiny_cache: Path, tmp_path: Path, args, message):
    argv = [a.format(cache=tiny_cache, missing=tmp_path / "nope") for a in args] + ["--out", str(tmp_path / "r")]
    result = _cli(*argv)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_pool_is_a_clear_error(tmp_path: Path, aptos_root: Path):
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import spec_kwargs
    from tests.tiny_models import TINY

    size, overrides, *_ = TINY["resnet50"]
    kw = spec_kwargs(aptos_root, tmp_path / "cache", limit=3)
    kw.update(model="resnet50", img_size=size, arch_overrides=overrides)
    cache = run_extract(ExtractSpec(**kw), progress=False, log=lambda m: None)
    with pytest.raises(FmcacheError, match="no 'cls' pooled features"):
        knn(CacheReader(cache), out=tmp_path, ks=(1,), pool="cls")
    result = knn(CacheReader(cache), out=tmp_path, ks=(1,))  # auto → the model's mean pooling
    assert result["layers"][5]["splits"]["val"][1]["metric"] == "qwk"


def test_knn_and_probe_cli_print_tables(tiny_cache: Path, tmp_path: Path):
    result = _cli("knn", str(tiny_cache), "--k", "3,5", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "k-NN (qwk)" in result.output
    result = _cli("probe", str(tiny_cache), "--lrs", "1e-3", "--seeds", "2", "--epochs", "2", "--batch-size", "8",
                  "--out", str(tmp_path))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "linear probe (qwk" in result.output


def test_multilabel_chexpert_cache_knn_and_probe(tmp_path: Path):
    """CheXpert end to end: NaN-aware multi-label k-NN and BCE heads, scored by mean AUC over usable labels."""
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import spec_kwargs
    from tests.fixtures_data import make_chexpert

    root = make_chexpert(tmp_path / "chexpert", n=60)
    kw = spec_kwargs(root, tmp_path / "cache", dataset="chexpert")
    reader = CacheReader(run_extract(ExtractSpec(**kw), progress=False, log=lambda m: None), uncertain="ignore")
    assert reader.multilabel and reader.labels("train").shape[1] == 14 and np.isnan(reader.labels("train")).any()
    # U-Ignore (stage two's choice): the uncertain entries are NaN, out of the loss and the metric
    knn_result = knn(reader, out=tmp_path / "r", ks=(3, 5), uncertain="ignore")
    entry = knn_result["layers"][2]["splits"]["test"][5]
    assert entry["metric"] == "mean_auc" and 0.0 <= entry["value"] <= 1.0
    probe_result = probe(reader, out=tmp_path / "r", lrs=(1e-3,), seeds=2, epochs=3, batch_size=16, uncertain="ignore")
    assert probe_result["metric"] == "mean_auc" and np.isfinite(probe_result["layers"][2]["test_mean"])


def test_cli_empty_split_and_missing_pool_are_one_line_exit_2(tmp_path: Path, aptos_root: Path):
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import spec_kwargs
    from tests.tiny_models import TINY

    size, overrides, *_ = TINY["resnet50"]
    kw = spec_kwargs(aptos_root, tmp_path / "cache", limit=3)
    kw.update(model="resnet50", img_size=size, arch_overrides=overrides)
    resnet = run_extract(ExtractSpec(**kw), progress=False, log=lambda m: None)
    result = _cli("knn", str(resnet), "--pool", "cls", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "no 'cls' pooled features" in result.output and "Traceback" not in result.output

    from tests.fixtures_data import make_csv

    root = make_csv(tmp_path / "csv", n=12)
    lines = (root / "labels.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    (root / "labels.csv").write_text("\n".join([header + ",split"] + [r + ",train" for r in rows]) + "\n")
    kw = spec_kwargs(root, tmp_path / "cache2", dataset="csv", allow_empty_split=True)
    cache = run_extract(ExtractSpec(**kw), progress=False, log=lambda m: None)
    result = _cli("knn", str(cache), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "is empty" in result.output and "Traceback" not in result.output
