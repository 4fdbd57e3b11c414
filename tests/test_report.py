"""``fmcache report`` on synthetic results trees written with the results contract (fmcache.results.write_result)."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fmcache import metrics
from fmcache.cli import app
from fmcache.report import stats
from fmcache.report.render import build_report
from fmcache.report.tables import FEWER_SEEDS, MISSING
from fmcache.results import result_folder, seed_summary, write_result

runner = CliRunner()
N_TEST, N_VAL = 120, 40


def _predictions(rng: np.random.Generator, n_classes: int, quality: float, seeds: int) -> dict:
    """Scores that put ``quality`` of the mass on the true class, plus noise; the same ids/labels for every model."""
    out: dict = {"seeds": np.arange(seeds)}
    for split, n, offset in (("val", N_VAL, 1000), ("test", N_TEST, 0)):
        labels = np.random.default_rng(7 + offset).integers(0, n_classes, n)
        scores = rng.random((seeds, n, n_classes)) + quality * 3 * np.eye(n_classes)[labels][None]
        out |= {f"{split}_ids": np.arange(offset, offset + n), f"{split}_labels": labels,
                f"{split}_scores": scores / scores.sum(-1, keepdims=True)}  # fmt: skip
    return out


def _score(metric: str, pred: dict, split: str) -> list[float]:
    return [metrics.evaluate(metric, pred[f"{split}_labels"], s, False)["value"] for s in pred[f"{split}_scores"]]


def _write(root: Path, dataset: str, model: str, protocol: str, settings: dict, pred: dict | None = None,
           summary: dict | None = None, metric: str = "accuracy", seeds_requested: int | None = None,
           timings: dict | None = None, key: str = "k") -> Path:  # fmt: skip
    if summary is None and pred is not None:
        summary = seed_summary(1e-3, _score(metric, pred, "val"), _score(metric, pred, "test"),
                               seeds_requested or len(pred["seeds"]))  # fmt: skip
    folder = result_folder(root, dataset, model, (key * 64)[:64], protocol, settings)
    write_result(
        folder, protocol=protocol, settings=settings, dataset=dataset, model=model,
        cache_key=None if protocol.startswith("finetune") else (key * 64)[:64], weights={"source": "random"},
        metric=metric, timings=timings or {"train_seconds": 2.5, "inference_seconds_per_sample": 1e-4,
                                           "extract_seconds_per_image": 3e-3},
        summary=summary or {}, details={}, rows=[{"x": 1}], predictions=pred,
    )  # fmt: skip
    return folder


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Two datasets × three models: linear probes everywhere, a DeiT probe with fewer seeds, one fine-tune,
    a Fig. 4 sweep, k-NN, a self-CKA and a two-model CKA; dataset b has no DeiT or fine-tune results (missing)."""
    root = tmp_path / "results"
    rng = np.random.default_rng(0)
    for dataset in ("a", "b"):
        for model, quality in (("m1", 0.3), ("m2", 0.15), ("m3", 0.12)):
            _write(root, dataset, model, "probe_linear", {"epochs": 3}, _predictions(rng, 3, quality, 3), key=model)
            knn_pred = _predictions(rng, 3, quality, 1)
            test = _score("accuracy", knn_pred, "test")[0]
            rows = [{"layer": layer, "split": split, "k": k, "temperature": 0.07, "value": test - 0.01 * (4 - layer)}
                    for layer in (1, 2, 3, 4) for split in ("val", "test") for k in (10, 20)]  # fmt: skip
            _write(root, dataset, model, "knn", {"ks": [10, 20]}, knn_pred, key=model,
                   summary={"rows": rows, "best": {"k": 20, "layer": 4, "test": test}})  # fmt: skip
    _write(root, "a", "m1", "probe_deit", {"epochs": 3}, _predictions(rng, 3, 0.8, 2), seeds_requested=3, key="m1")
    for freeze in ("none", "2", "4", "all"):
        _write(root, "a", "m1", "finetune_linear", {"freeze": freeze, "drop_after": None},
               _predictions(rng, 3, 0.7, 2), key="f" + freeze)  # fmt: skip
    per_layer = {str(n): seed_summary(1e-3, [0.5], [0.4 + 0.1 * n], 1) for n in (1, 2, 3)}
    _write(root, "a", "m2", "probe_linear", {"layers": "all"}, None, key="m2",
           summary={**seed_summary(1e-3, [0.1], [0.1], 1), "per_layer": per_layer})  # fmt: skip
    matrix = [[1.0, 0.5], [0.5, 1.0]]
    _write(root, "a", "m1", "cka", {"layers": "all"}, None, key="m1",
           summary={"layers_a": [1, 2], "layers_b": [1, 2], "matrix": matrix})  # fmt: skip
    _write(root, "a", "m1", "cka", {"layers": "last", "cache_b_key": "m2" * 32, "model_b": "m2"}, None, key="m1",
           summary={"layers_a": [4], "layers_b": [4], "matrix": [[0.3]]})  # fmt: skip
    return root


def _md_table(text: str, title: str) -> list[list[str]]:
    lines = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    rows = [line for line in lines if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows if not row.startswith("|---")]


def test_tables_equal_the_json_summaries(tree: Path, tmp_path: Path):
    from fmcache.results import find_results

    out = build_report(tree, tmp_path / "report", formats=["md", "csv", "tex", "html"], resamples=200)["out"]
    md = (out / "report.md").read_text()
    table = _md_table(md, "Table 1")
    header, body = table[0], {row[0]: row for row in table[1:]}
    docs = find_results(tree)
    for doc in docs:
        if doc["protocol"] != "probe_linear" or "per_layer" in doc["summary"]:
            continue
        col = header.index(f"{doc['dataset']} (accuracy) linear frozen")
        mean, std = body[doc["model"]][col].rstrip(FEWER_SEEDS).split(" ± ")
        assert float(mean) == pytest.approx(doc["summary"]["test_mean"], abs=6e-5)
        assert float(std) == pytest.approx(doc["summary"]["test_std"], abs=6e-5)
    # a DeiT probe with 2 of 3 seeds is marked; dataset b has no DeiT or fine-tune: missing, never 0
    deit = body["m1"][header.index("a (accuracy) DeiT frozen")]
    assert deit.endswith(FEWER_SEEDS)
    assert body["m1"][header.index("b (accuracy) DeiT frozen")] == MISSING
    assert body["m2"][header.index("a (accuracy) linear fine-tuned")] == MISSING
    assert body["m1"][header.index("a (accuracy) linear fine-tuned")] != MISSING
    # the values CSV holds the exact numbers; missing cells are empty there
    with open(out / "table1_values.csv") as fh:
        records = list(csv.DictReader(fh))
    by = {(r["model"], r["dataset"], r["head"], r["regime"]): r for r in records}
    deit_doc = next(d for d in docs if d["protocol"] == "probe_deit")
    assert float(by["m1", "a", "deit", "frozen"]["test_mean"]) == pytest.approx(deit_doc["summary"]["test_mean"])
    assert by["m1", "a", "deit", "frozen"]["fewer_seeds"] == "True"
    assert by["m1", "b", "deit", "frozen"]["test_mean"] == ""
    # displayed CSV mirrors the Markdown
    with open(out / "table1.csv") as fh:
        shown = list(csv.reader(fh))
    assert shown[0] == header and [r[0] for r in shown[1:]] == ["m1", "m2", "m3"]
    # Table 2 states k and T
    knn = _md_table(md, "Table 2")
    assert "k=20" in knn[1][1] and "T=0.07" in knn[1][1]
    names = {p.name for p in (out / "figures").iterdir()}
    for expected in ("a_bars.png", "a_knn_vs_k.png", "a_knn_vs_layer.png", "a_probe_linear_vs_layer.png",
                     "a_frozen_blocks.png", "a_cka_last_layer_models.png"):  # fmt: skip
        assert expected in names, names
    assert any(n.startswith("a_cka_m1_vs_m1") for n in names)
    tex = (out / "report.tex").read_text()
    assert "\\toprule" in tex and "$\\pm$" in tex
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(names) and "http" not in page.replace("http-equiv", "")


def test_bootstrap_ci_contains_point_and_is_seeded():
    pred = _predictions(np.random.default_rng(1), 3, 0.15, 2)
    p = stats.Predictions(pred["test_ids"], pred["test_labels"], pred["test_scores"].astype(np.float64))
    ci = stats.bootstrap_ci("accuracy", p, resamples=300, seed=5)
    assert ci["low"] <= ci["point"] <= ci["high"] and ci["high"] - ci["low"] > 0
    assert ci["point"] == pytest.approx(np.mean(_score("accuracy", pred, "test")))
    assert stats.bootstrap_ci("accuracy", p, resamples=300, seed=5) == ci
    assert stats.bootstrap_ci("accuracy", p, resamples=300, seed=6) != ci


def test_paired_test_p_values_are_sane():
    rng = np.random.default_rng(2)
    good = _predictions(rng, 3, 2.0, 2)
    bad = _predictions(rng, 3, 0.0, 2)
    g = stats.Predictions(good["test_ids"], good["test_labels"], good["test_scores"])
    b = stats.Predictions(bad["test_ids"], bad["test_labels"], bad["test_scores"])
    far = stats.paired_bootstrap("accuracy", g, b, resamples=300, seed=0)
    assert far["delta"] > 0.3 and far["p_value"] < 0.01 and far["low"] > 0
    same = stats.paired_bootstrap("accuracy", g, g, resamples=300, seed=0)
    assert same["delta"] == 0 and same["p_value"] == 1.0
    # pairing is by id: a shuffled copy of the same run is still the same run
    order = rng.permutation(len(g.ids))
    shuffled = stats.Predictions(g.ids[order], g.labels[order], g.scores[:, order])
    assert stats.paired_bootstrap("accuracy", g, shuffled, resamples=100, seed=0)["p_value"] == 1.0


def test_report_cli_and_bad_input(tree: Path, tmp_path: Path):
    result = runner.invoke(app, ["report", str(tree), "--out", str(tmp_path / "rep"), "--resamples", "50"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "report.html").is_file() and (tmp_path / "rep" / "report.tex").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["report", str(empty), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no results under" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["report", str(tree), "--out", str(tmp_path / "x"), "--format", "pdf"])
    assert result.exit_code == 2 and "unknown --format" in result.output


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless check needs Debian's chromium (/usr/bin/chromium)")
def test_html_renders_in_headless_chromium(tree: Path, tmp_path: Path):
    from PIL import Image

    out = build_report(tree, tmp_path / "report", formats=["html"], resamples=20)["out"]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
         (out / "report.html").resolve().as_uri()],
        check=False, capture_output=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (900, 1200) and pixels.var() > 10  # text and tables, not a blank page
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
