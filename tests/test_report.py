"""``fmcache report`` on synthetic results trees written with the results contract (fmcache.results.write_result)."""

from __future__ import annotations

import csv
import json
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
           timings: dict | None = None, key: str = "k", paper_feature: bool | None = None) -> Path:  # fmt: skip
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
        extra={} if paper_feature is None else {"paper_feature": paper_feature},
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
            _write(root, dataset, model, "probe_linear", {"epochs": 3, "pool": ["paper"]},
                   _predictions(rng, 3, quality, 3), key=model)  # fmt: skip
            # the seed's k-NN (k = 200, T = 0.1) on the paper feature at the last layer: Fig. 2
            knn_pred = _predictions(rng, 3, quality, 1)
            test = _score("accuracy", knn_pred, "test")[0]
            rows = [
                {"layer": 4, "split": split, "k": 200, "temperature": 0.1, "value": test} for split in ("val", "test")
            ]
            _write(root, dataset, model, "knn", {"ks": [200], "temperature": 0.1, "layers": [4]}, knn_pred, key=model,
                   summary={"rows": rows, "best": {"k": 200, "layer": 4, "test": test}}, paper_feature=True)  # fmt: skip
    # DINO's k/T sweep over every layer: supplementary (the sweep's figure and the per-layer curve)
    rows = [{"layer": layer, "split": split, "k": k, "temperature": 0.07, "value": 0.5 - 0.01 * (4 - layer)}
            for layer in (1, 2, 3, 4) for split in ("val", "test") for k in (10, 20)]  # fmt: skip
    _write(root, "a", "m1", "knn", {"ks": [10, 20], "temperature": 0.07, "layers": [1, 2, 3, 4]},
           _predictions(rng, 3, 0.3, 1), key="m1", paper_feature=False,
           summary={"rows": rows, "best": {"k": 20, "layer": 4, "test": 0.5, "val": 0.5}})  # fmt: skip
    _write(root, "a", "m1", "probe_deit", {"epochs": 3, "layers": ["paper"]}, _predictions(rng, 3, 0.8, 2),
           seeds_requested=3, key="m1")  # fmt: skip
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
        col = header.index(f"{doc['dataset']} (accuracy) linear")
        mean, std = body[doc["model"]][col].rstrip(FEWER_SEEDS).split(" ± ")
        assert float(mean) == pytest.approx(doc["summary"]["test_mean"], abs=6e-5)
        assert float(std) == pytest.approx(doc["summary"]["test_std"], abs=6e-5)
    # a DeiT probe with 2 of 3 seeds is marked; dataset b has no DeiT result: missing, never 0
    deit = body["m1"][header.index("a (accuracy) DeiT")]
    assert deit.endswith(FEWER_SEEDS)
    assert body["m1"][header.index("b (accuracy) DeiT")] == MISSING
    # Table 2 is the unfrozen one (fine-tuning with --freeze none); only m1 on dataset a has it
    unfrozen = _md_table(md, "Table 2")
    assert unfrozen[0] == ["model", "a (accuracy) linear", "a (accuracy) DeiT"]
    assert [row[0] for row in unfrozen[1:]] == ["m1"] and unfrozen[1][2] == MISSING
    # the values CSV holds the exact numbers; missing cells are empty there
    with open(out / "table1_frozen_values.csv") as fh:
        records = list(csv.DictReader(fh))
    by = {(r["model"], r["dataset"], r["head"], r["regime"]): r for r in records}
    deit_doc = next(d for d in docs if d["protocol"] == "probe_deit")
    assert float(by["m1", "a", "deit", "frozen"]["test_mean"]) == pytest.approx(deit_doc["summary"]["test_mean"])
    assert by["m1", "a", "deit", "frozen"]["fewer_seeds"] == "True"
    assert by["m1", "b", "deit", "frozen"]["test_mean"] == ""
    # displayed CSV mirrors the Markdown
    with open(out / "table1_frozen.csv") as fh:
        shown = list(csv.reader(fh))
    assert shown[0] == header and [r[0] for r in shown[1:]] == ["m1", "m2", "m3"]
    # k-NN is the paper's Fig. 2 (never "Table 2"): the seed's k = 200 and T = 0.1; the sweep is supplementary
    knn = _md_table(md, "Fig. 2 (data)")
    seed_knn = {(d["model"], d["dataset"]): d for d in docs if d["protocol"] == "knn" and d["settings"]["ks"] == [200]}
    assert float(knn[1][1]) == pytest.approx(seed_knn["m1", "a"]["summary"]["best"]["test"], abs=6e-5)
    assert "k=20" in _md_table(md, "Supplementary: knn sweep")[1][4]
    assert "k-NN" not in md.split("## Table 2", 1)[1].split("\n## ", 1)[0]
    names = {p.name for p in (out / "figures").iterdir()}
    for expected in ("supp_bars_a_accuracy.png", "fig2_knn_a.png", "supp_knn_vs_layer_a.png", "supp_knn_sweep_a.png",
                     "supp_linear_vs_layer_a.png", "fig4_freeze_a.png", "fig8_cka_models_a.png"):  # fmt: skip
        assert expected in names, names
    assert any(n.startswith("supp_cka_a_m1_vs_m1") for n in names)
    files = {p.name for p in out.iterdir()}
    assert {"table1_frozen.csv", "table2_unfrozen.csv", "fig2_knn.csv", "fig3_time.csv"} <= files
    tex = (out / "report.tex").read_text()
    assert "\\toprule" in tex and "$\\pm$" in tex
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(names) and "http" not in page.replace("http-equiv", "")


def test_cells_never_mix_metrics_or_features(tree: Path, tmp_path: Path):
    """A run with --metric accuracy beside the default quadratic-κ run, and a per-layer CLS run beside the paper
    feature: each metric gets its own column, and only the paper feature enters Table 1."""
    rng = np.random.default_rng(5)
    _write(tree, "a", "m1", "probe_linear", {"epochs": 3, "pool": ["paper"], "metric": "qwk"},
           _predictions(rng, 3, 0.9, 3), metric="qwk", key="m1")  # fmt: skip
    cls_run = _write(tree, "a", "m2", "probe_linear", {"epochs": 9, "pool": ["cls"], "layers": [1, 2, 3, 4]},
                     _predictions(rng, 3, 2.0, 3), key="m2")  # fmt: skip
    out = build_report(tree, tmp_path / "report", resamples=20)["out"]
    table = _md_table((out / "report.md").read_text(), "Table 1")
    header, body = table[0], {row[0]: row for row in table[1:]}
    assert "a (accuracy) linear" in header and "a (qwk) linear" in header
    assert body["m2"][header.index("a (qwk) linear")] == MISSING  # m2 ran no qwk probe
    with open(out / "table1_frozen_values.csv") as fh:
        records = list(csv.DictReader(fh))
    assert all(r["folder"] != str(cls_run) for r in records)
    qwk = next(r for r in records if r["metric"] == "qwk" and r["model"] == "m1")
    assert qwk["candidates"] == "1" and qwk["test_mean"] != ""


def test_missing_predictions_are_named_damaged_ones_are_one_line(tree: Path, tmp_path: Path):
    import json

    from fmcache.results import find_results

    docs = find_results(tree)
    probe = next(d for d in docs if d["protocol"] == "probe_linear" and d["model"] == "m3" and d["dataset"] == "b")
    (Path(probe["folder"]) / "predictions.npz").unlink()
    result = runner.invoke(app, ["report", str(tree), "--out", str(tmp_path / "r1"), "--resamples", "20"])
    assert result.exit_code == 0, result.output
    assert f"{probe['folder']} has no predictions.npz" in result.output
    assert (
        f"Not in the bootstrap (no predictions.npz): {probe['folder']}" in (tmp_path / "r1" / "report.md").read_text()
    )
    # a truncated result.json next to good ones is named, not silently skipped
    other = next(d for d in docs if d["protocol"] == "knn" and d["model"] == "m3" and d["dataset"] == "b")
    path = Path(other["folder"]) / "result.json"
    path.write_text(path.read_text()[:50])
    result = runner.invoke(app, ["report", str(tree), "--out", str(tmp_path / "r2"), "--resamples", "20"])
    assert result.exit_code == 0 and f"skipped {path}" in result.output
    # one flipped byte in a predictions.npz: one line naming the file, exit 2, no traceback
    victim = next(d for d in docs if d["protocol"] == "probe_linear" and d["model"] == "m1" and d["dataset"] == "a")
    npz = Path(victim["folder"]) / "predictions.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    result = runner.invoke(app, ["report", str(tree), "--out", str(tmp_path / "r3"), "--resamples", "20"])
    assert result.exit_code == 2 and str(npz) in result.output and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    # predictions swapped after the run (a valid file, but not the one the run wrote): detected by its sha256
    donor = next(d for d in docs if d["protocol"] == "probe_linear" and d["model"] == "m3" and d["dataset"] == "a")
    npz.write_bytes((Path(donor["folder"]) / "predictions.npz").read_bytes())
    result = runner.invoke(app, ["report", str(tree), "--out", str(tmp_path / "r4"), "--resamples", "20"])
    assert result.exit_code == 2 and "does not match the sha256" in result.output and str(npz) in result.output
    assert json.loads((Path(victim["folder"]) / "result.json").read_text())["predictions_sha256"]


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


@pytest.mark.parametrize(
    ("model", "pooled_kind", "pools", "layers", "paper"),
    [
        ("dinov2_vitb14", "cls", ["cls"], [12], True),  # CLS after the final norm = pooled/paper
        ("dinov2_vitb14", "cls", ["paper"], [12], True),
        ("dinov2_vitb14", "cls", ["mean"], [12], False),
        ("sam_vit_b", "mean", ["mean"], [12], True),  # SAM/SEEM/MAE/AIMv2/ResNet: the patch mean
        ("clip_vitb16", "pooled", ["cls"], [12], False),  # CLIP/CoCa: ln_post(CLS) @ proj, not the CLS
        ("clip_vitb16", "pooled", ["paper"], [12], True),
        ("coca_vitb32", "pooled", ["cls"], list(range(1, 13)), False),  # per layer: a study, not Table 1
        ("sam2_b", "pooled", ["mean"], [4], False),  # SAM2: the neck's mean, not the trunk's
        ("sam2_b", "pooled", ["paper"], [4], True),
    ],
)
def test_table1_cell_comes_from_each_familys_paper_feature(tmp_path, model, pooled_kind, pools, layers, paper):
    """What the probe runner records (is_paper_feature) decides Table 1; the report admits only paper features."""
    from types import SimpleNamespace

    from fmcache.frozen.common import is_paper_feature
    from fmcache.report.tables import doc_outputs

    reader = SimpleNamespace(manifest={"model": {"pooled_kind": pooled_kind}}, num_layers=layers[-1])
    recorded = is_paper_feature(reader, layers, pools)
    assert recorded is paper
    doc = {"protocol": "probe_linear", "model": model, "img_size": 224, "paper_feature": recorded,
           "settings": {"pool": pools, "layers": layers}}  # fmt: skip
    assert ("table1_frozen" in doc_outputs(doc)) is paper


def test_a_table_without_an_earlier_dataset_still_fills_its_cells(tmp_path: Path):
    """Table 2 and Fig. 2 cover only dataset b while the linear probes cover a and b: their cells are found (a
    column's identity does not depend on which datasets other results cover)."""
    root, rng = tmp_path / "results", np.random.default_rng(3)
    for dataset in ("a", "b"):
        _write(root, dataset, "m1", "probe_linear", {"epochs": 3, "pool": ["paper"]}, _predictions(rng, 3, 0.5, 2),
               key="m1")  # fmt: skip
    _write(root, "b", "m1", "finetune_linear", {"freeze": "none", "drop_after": None}, _predictions(rng, 3, 0.7, 2),
           key="fnone")  # fmt: skip
    knn_pred = _predictions(rng, 3, 0.5, 1)
    test = _score("accuracy", knn_pred, "test")[0]
    rows = [{"layer": 4, "split": split, "k": 200, "temperature": 0.1, "value": test} for split in ("val", "test")]
    _write(root, "b", "m1", "knn", {"ks": [200], "temperature": 0.1}, knn_pred, key="m1", paper_feature=True,
           summary={"rows": rows, "best": {"k": 200, "layer": 4, "test": test}})  # fmt: skip
    md = (build_report(root, tmp_path / "report", resamples=20)["out"] / "report.md").read_text()
    for title in ("Table 2", "Fig. 2"):
        header, *body = _md_table(md, title)
        (row,) = [r for r in body if r[0] == "m1"]
        assert header[1].startswith("b (accuracy)") and row[1] != MISSING, (title, header, row)


def _csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def test_each_paper_cell_comes_from_the_result_its_rule_admits(tmp_path: Path, monkeypatch):
    """One model at 224 and at 1024 px, a LoRA beside a full fine-tune (the LoRA with the better val), a cosine
    fine-tune, the seed's k-NN beside a better-val k/T sweep: each paper cell and figure line comes from the result
    the paper's rule admits, and every other result lands in a supplementary table named after what it varies."""
    root, rng = tmp_path / "results", np.random.default_rng(11)
    full = _write(root, "a", "m1", "finetune_linear", {"freeze": "none", "drop_after": None},
                  _predictions(rng, 3, 0.3, 2), key="full")  # fmt: skip
    lora = _write(root, "a", "m1", "finetune_linear", {"freeze": "none", "drop_after": None, "method": "lora",
                  "lora_rank": 8}, _predictions(rng, 3, 2.0, 2), key="lora")  # fmt: skip
    cosine = _write(root, "a", "m1", "finetune_linear", {"freeze": "none", "drop_after": None,
                    "schedule": "cosine"}, _predictions(rng, 3, 2.0, 2), key="cos")  # fmt: skip
    big = _write(root, "a", "m1", "finetune_linear", {"freeze": "none", "drop_after": None},
                 _predictions(rng, 3, 2.0, 2), key="big")  # fmt: skip
    doc = big / "result.json"
    data = json.loads(doc.read_text())
    doc.write_text(json.dumps({**data, "img_size": 1024}))
    for freeze, key in (("2", "k2"), ("4", "k4")):
        _write(root, "a", "m1", "finetune_linear", {"freeze": freeze, "drop_after": None},
               _predictions(rng, 3, 0.3, 2), key=key)  # fmt: skip
    _write(root, "a", "m1", "finetune_linear", {"freeze": "2", "drop_after": None, "method": "lora"},
           _predictions(rng, 3, 2.0, 2), key="k2lora")  # fmt: skip
    seed_pred = _predictions(rng, 3, 0.3, 1)
    seed_test = _score("accuracy", seed_pred, "test")[0]
    rows = [{"layer": 4, "split": s, "k": 200, "temperature": 0.1, "value": seed_test} for s in ("val", "test")]
    seed = _write(root, "a", "m1", "knn", {"ks": [200], "temperature": 0.1, "layers": [4]}, seed_pred, key="m1",
                  paper_feature=True, summary={"rows": rows, "best": {"k": 200, "layer": 4, "test": seed_test}})  # fmt: skip
    rows = [{"layer": 4, "split": s, "k": 20, "temperature": 0.07, "value": 0.99} for s in ("val", "test")]
    sweep = _write(root, "a", "m1", "knn", {"ks": [20], "temperature": 0.07, "layers": [4]},
                   _predictions(rng, 3, 2.0, 1), key="m1", paper_feature=True,
                   summary={"rows": rows, "best": {"k": 20, "layer": 4, "test": 0.99, "val": 0.99}})  # fmt: skip
    out = build_report(root, tmp_path / "report", resamples=20)["out"]
    values = {name: _csv_rows(out / f"{name}_values.csv") for name in ("table2_unfrozen", "table3_1024px", "fig2_knn")}
    (t2,) = [r for r in values["table2_unfrozen"] if r["head"] == "linear"]
    assert t2["folder"] == str(full) and t2["candidates"] == "1"  # not the LoRA, the cosine or the 1024 px run
    (t3,) = [r for r in values["table3_1024px"] if r["head"] == "linear"]
    assert t3["folder"] == str(big)
    (fig2,) = values["fig2_knn"]
    assert fig2["folder"] == str(seed) and float(fig2["test"]) == pytest.approx(seed_test)
    supp = {p.name for p in out.glob("supp_*_values.csv")}
    assert {"supp_method_lora_values.csv", "supp_schedule_cosine_values.csv", "supp_knn_sweep_values.csv"} <= supp
    listed = {r["folder"] for name in supp for r in _csv_rows(out / name)}
    assert {str(lora), str(cosine), str(sweep)} <= listed
    # Fig. 4's line: the full fine-tunes at K = 2, 4; its dashed reference: Table 2's cell
    from fmcache.report.figures import frozen_blocks
    from fmcache.results import find_results

    docs = find_results(root)
    import matplotlib.axes

    drawn, hlines = [], []
    errorbar, axhline = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "errorbar",
        lambda ax, xs, ys, **kw: drawn.append((list(xs), list(ys))) or errorbar(ax, xs, ys, **kw),
    )
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda ax, y, **kw: hlines.append(y) or axhline(ax, y, **kw))
    frozen_blocks(docs, tmp_path / "figs")
    by_folder = {d["folder"]: d for d in docs}
    k2 = next(d for d in docs if d["settings"].get("freeze") == "2" and "method" not in d["settings"])
    assert drawn[0][0] == [2, 4] and drawn[0][1][0] == pytest.approx(k2["summary"]["test_mean"])
    assert hlines == [pytest.approx(by_folder[str(full)]["summary"]["test_mean"])]
