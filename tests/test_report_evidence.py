"""The report's evidence (issue #28): every number equals the statistics library's on the same arrays, at the unit
the predictions name; subgroups find a planted shift; one section per statistic in HTML, Markdown and LaTeX."""

from __future__ import annotations

import csv
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fmcache import metrics
from fmcache.cli import app
from fmcache.report import calibration, delong, ranking, resampling, stats, subgroups
from fmcache.report.predictions import load_splits
from fmcache.report.render import build_report
from fmcache.results import find_results, result_folder, seed_summary, write_result

runner = CliRunner()
N_PATIENTS, SEEDS, RESAMPLES = 80, 2, 150  # two scans per patient: 160 test images per dataset
DATASETS = {"bin": "auc", "ml": "mean_auc", "grade": "accuracy"}
QUALITY = {"m1": 2.0, "m2": 1.2, "m3": 0.6}


def _labels(dataset: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if dataset == "ml":
        y = (rng.random((n, 4)) < 0.35).astype(np.float64)
        y[rng.random((n, 4)) < 0.2] = np.nan  # unknown labels, masked
        return y
    return rng.integers(0, 2 if dataset == "bin" else 3, n)


def _scores(dataset: str, y: np.ndarray, quality: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(SEEDS, n, C) probabilities whose separation is ``quality`` per row."""
    if dataset == "ml":
        logit = quality[None, :, None] * (2 * np.nan_to_num(y) - 1)[None] + rng.normal(size=(SEEDS, *y.shape))
        return 1 / (1 + np.exp(-logit))
    width = 2 if dataset == "bin" else 3
    logit = quality[None, :, None] * 2 * np.eye(width)[y][None] + rng.normal(size=(SEEDS, len(y), width))
    e = np.exp(logit)
    return e / e.sum(-1, keepdims=True)


def _split(dataset: str, model: str, offset: int, rng: np.random.Generator, shift: bool) -> dict:
    n = 2 * N_PATIENTS
    y = _labels(dataset, n, np.random.default_rng(offset + len(dataset)))  # the same labels for every model
    patient = np.repeat(np.arange(N_PATIENTS), 2)
    sex = np.where(np.random.default_rng(1).random(N_PATIENTS) < 0.5, "F", "M")[patient]
    age = np.random.default_rng(2).uniform(25, 90, N_PATIENTS)[patient]
    age[::17] = np.nan
    quality = np.full(n, QUALITY[model])
    if shift:  # the planted shift: every model is near chance on the women of the binary task
        quality[sex == "F"] = 0.05
    return {
        "ids": np.arange(offset, offset + n),
        "labels": y,
        "scores": _scores(dataset, y, quality, rng),
        "groups": np.array([f"patient:{p:04d}" for p in patient]),
        "sex": sex,
        "age": age,
    }


def _write(root: Path, dataset: str, model: str, with_groups: bool = True, knn: bool = False) -> Path:
    rng = np.random.default_rng(zlib.crc32(f"{dataset}/{model}/{knn}".encode()))
    metric = DATASETS[dataset]
    pred: dict = {"seeds": np.arange(1 if knn else SEEDS)}
    per_split = {}
    for split, offset in (("test", 0), ("val", 1000)):
        s = _split(dataset, model, offset, rng, shift=dataset == "bin")
        per_split[split] = s
        scores = s["scores"][:1] if knn else s["scores"]
        pred |= {f"{split}_ids": s["ids"], f"{split}_labels": s["labels"], f"{split}_scores": scores}
        if with_groups:
            pred |= {f"{split}_groups": s["groups"], f"{split}_meta__sex": s["sex"], f"{split}_meta__age": s["age"]}

    def score(split: str) -> list[float]:
        s = per_split[split]
        return [metrics.evaluate(metric, s["labels"], x, dataset == "ml")["value"] for x in pred[f"{split}_scores"]]

    if knn:
        settings = {"ks": [200], "temperature": 0.1, "layers": [4]}
        test = score("test")[0]
        rows = [{"layer": 4, "split": sp, "k": 200, "temperature": 0.1, "value": test} for sp in ("val", "test")]
        summary = {"rows": rows, "best": {"k": 200, "layer": 4, "test": test}}
    else:
        settings = {"epochs": 3, "pool": ["paper"]}
        summary = seed_summary(1e-3, score("val"), score("test"), SEEDS)
    protocol = "knn" if knn else "probe_linear"
    folder = result_folder(root, dataset, model, (model * 64)[:64], protocol, settings)
    extra = {"paper_feature": True} | ({"group_unit": "patient"} if with_groups else {})
    write_result(
        folder,
        protocol=protocol,
        settings=settings,
        dataset=dataset,
        model=model,
        cache_key=(model * 64)[:64],
        weights={"source": "random"},
        metric=metric,
        timings={"train_seconds": 1.0, "inference_seconds_per_sample": 1e-4},
        summary=summary,
        details={},
        rows=[{"x": 1}],
        predictions=pred,
        extra=extra,
    )
    return folder


def _tree(root: Path, with_groups: bool = True) -> Path:
    for dataset in DATASETS:
        for model in QUALITY:
            _write(root, dataset, model, with_groups)
    for model in ("m1", "m2"):
        _write(root, "bin", model, with_groups, knn=True)
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The demo-like tree (patients of two scans, a synthetic sex and age) and its report, built once."""
    root = _tree(tmp_path_factory.mktemp("evidence") / "results")
    out = tmp_path_factory.mktemp("evidence_report") / "report"
    built = build_report(
        root,
        out,
        formats=["md", "csv", "tex", "html"],
        resamples=RESAMPLES,
        seed=3,
        by="sex,age_bin",
        log=lambda _m: None,
    )
    docs = {(d["dataset"], d["model"], d["protocol"]): d for d in find_results(root)}
    return {"root": root, "out": out, "built": built, "ev": built["evidence"], "docs": docs}


def _pred(doc: dict) -> stats.Predictions:
    return load_splits(doc["folder"])["test"]


def _clusters(pred: stats.Predictions) -> resampling.Clusters:
    return resampling.make_clusters(len(pred.labels), pred.groups, "patient", labels=pred.labels)


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def test_cell_cis_are_the_librarys_at_the_patient_level_and_name_their_unit(report):
    ev, out = report["ev"], report["out"]
    for dataset, metric in DATASETS.items():
        doc = report["docs"][dataset, "m2", "probe_linear"]
        pred = _pred(doc)
        expected = resampling.metric_ci(metric, pred, _clusters(pred), resamples=RESAMPLES, seed=3)
        got = ev.results[doc["folder"]].ci
        assert got["unit"] == "patient" and got["n_clusters"] == N_PATIENTS and got["n"] == 2 * N_PATIENTS
        for key in ("point", "low", "high"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), (dataset, key)
        assert got["failed"] == expected["failed"]
    shown = _rows(out / "supp_bootstrap_ci.csv")
    assert shown and all(r["95 % CI"].endswith(" patient") for r in shown)
    assert {r["unit"] for r in shown} == {f"{N_PATIENTS} patients"}
    # the paper table's values CSV carries the CI and its unit
    table1 = [r for r in _rows(out / "table1_frozen_values.csv") if r["test_mean"]]
    assert table1 and all(r["ci_unit"] == "patient" and r["ci_low"] for r in table1)


def test_paired_bootstrap_and_delong_are_the_librarys(report):
    ev = report["ev"]
    rows = {(r["dataset"], r["comparison"], r["other"]): r for r in ev.paired}
    for dataset, metric in (("bin", "auc"), ("ml", "mean_auc")):
        best, other = (_pred(report["docs"][dataset, m, "probe_linear"]) for m in ("m1", "m3"))
        row = rows[dataset, "Table 1 linear frozen", "m3"]
        assert row["best"] == "m1" and row["unit"] == "patient"
        expected = resampling.paired_metric_test(metric, best, other, _clusters(best), RESAMPLES, seed=3)
        for key in ("delta", "low", "high", "p_value"):
            assert row[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), (dataset, key)
        if metric == "auc":
            want = delong.delong_test(best.labels, best.scores[:, :, 1], other.scores[:, :, 1], best.groups, "patient")
            got = row["delong"]
        else:
            want = delong.multilabel_delong(best.labels, best.scores, other.scores, None, best.groups, "patient")
            got = row["delong"]
            assert got["per_label"]["label_1"]["p_value"] == pytest.approx(want["per_label"]["label_1"]["p_value"])
            got, want = got["mean"], want["mean"]
        assert got["delta"] == pytest.approx(want["delta"]) and got["p_value"] == pytest.approx(want["p_value"])
        assert got["se"] == pytest.approx(want["se"])
    shown = _rows(report["out"] / "supp_paired_tests.csv")
    assert any(r["p (DeLong)"] not in ("", "–") for r in shown)  # the demo's DeLong p-value
    assert (report["out"] / "supp_paired_delong_per_label_ml.csv").is_file()


def test_delong_se_of_every_auc_cell_is_the_librarys(report):
    ev = report["ev"]
    binary = _pred(report["docs"]["bin", "m2", "probe_linear"])
    got = ev.results[report["docs"]["bin", "m2", "probe_linear"]["folder"]].delong
    want = delong.auc_se(binary.labels, binary.scores[:, :, 1], binary.groups, "patient")
    assert got["kind"] == "binary" and got["se"] == pytest.approx(want["se"]) and got["unit"] == "patient"
    ml_doc = report["docs"]["ml", "m2", "probe_linear"]
    multi = _pred(ml_doc)
    got = ev.results[ml_doc["folder"]].delong
    want = delong.multilabel_delong(multi.labels, multi.scores, None, None, multi.groups, "patient")
    assert got["mean"]["se"] == pytest.approx(want["mean"]["se"])
    assert got["per_label"]["label_0"]["auc"] == pytest.approx(want["per_label"]["label_0"]["auc"])
    assert ev.results[report["docs"]["grade", "m2", "probe_linear"]["folder"]].delong is None  # no AUC cell
    assert (report["out"] / "supp_delong_per_label_ml.csv").is_file()


def test_calibration_is_the_librarys_temperature_scaling(report):
    ev = report["ev"]
    for dataset in DATASETS:
        doc = report["docs"][dataset, "m3", "probe_linear"]
        splits = load_splits(doc["folder"])
        test, val = splits["test"], splits["val"]
        want = calibration.temperature_scaling(val.scores, val.labels, test.scores, test.labels, test.multilabel)
        got = ev.results[doc["folder"]].calibration
        assert got["temperature"] == pytest.approx(want["temperature"])
        for when in ("before", "after"):
            for key in ("ece", "mce", "brier", "nll"):
                assert got[when][key] == pytest.approx(want[when][key]), (dataset, when, key)
    shown = _rows(report["out"] / "supp_calibration_values.csv")
    assert {"ece", "ece_scaled", "temperature"} <= set(shown[0])
    figures = {f.name for f in report["built"]["figures"]}
    assert "supp_reliability_table1_frozen_bin_auc_linear" in figures
    # k-NN scores are calibrated too, and the notes say what they are
    knn_doc = report["docs"]["bin", "m1", "knn"]
    assert "ece" in ev.results[knn_doc["folder"]].calibration["before"]
    assert "vote shares" in (report["out"] / "report.md").read_text()


def test_subgroups_find_the_planted_shift_and_equal_the_library(report):
    ev, out = report["ev"], report["out"]
    doc = report["docs"]["bin", "m1", "probe_linear"]
    pred = _pred(doc)
    got = ev.results[doc["folder"]].subgroups["sex"]
    want = subgroups.subgroup_report("auc", pred, pred.meta["sex"], pred.groups, "patient", RESAMPLES, seed=3)
    assert got["worst"] == want["worst"] == "F" and got["gap"] == pytest.approx(want["gap"])
    assert got["gap"] > 0.2 and got["groups"]["F"]["metric"]["high"] < got["groups"]["M"]["metric"]["low"]
    assert got["equalized_odds"]["difference"] == pytest.approx(want["equalized_odds"]["difference"])
    ages = ev.results[doc["folder"]].subgroups["age_bin"]["groups"]
    assert "unknown" in ages and set(ages) <= {"<40", "40-59", "60-79", "80+", "unknown"}
    assert any("n=" in "".join(e["flags"]) for e in ages.values())  # small groups are flagged, not dropped
    table = _rows(out / "supp_subgroups_bin_sex.csv")
    assert {r["sex"].split()[0] for r in table} == {"F", "M"} and all(r["unit"] == "patient" for r in table)
    summary = {
        (r["dataset"], r["attribute"], r["model"], r["paper cell"]): r
        for r in _rows(out / "supp_subgroups_summary.csv")
    }
    assert summary["bin", "sex", "m1", "Table 1 linear frozen"]["worst group"] == "F"
    figures = {f.name for f in report["built"]["figures"]}
    assert "supp_forest_table1_frozen_bin_auc_linear_sex" in figures


def test_rankings_within_and_across_datasets_are_the_librarys(report):
    ev = report["ev"]
    within = next(w for w in ev.within if w["dataset"] == "bin" and w["output"] == "table1_frozen")
    preds = {m: _pred(report["docs"]["bin", m, "probe_linear"]) for m in QUALITY}
    want = ranking.within_dataset_ranking("auc", preds, _clusters(preds["m1"]), RESAMPLES, seed=3)
    for model in QUALITY:
        for key in ("rank", "rank_low", "rank_high", "tied_with_best"):
            assert within["models"][model][key] == pytest.approx(want["models"][model][key]), (model, key)
    across = next(a for a in ev.across if a["block"] == ("table1_frozen", "linear", "frozen"))
    table = [
        [report["docs"][d, m, "probe_linear"]["summary"]["test_mean"] for m in sorted(QUALITY)]
        for d in ("bin", "ml", "grade")
    ]
    want = ranking.compare_models(np.array(table), sorted(QUALITY))
    assert across["avg_ranks"] == pytest.approx(want["avg_ranks"]) and across["chi2"] == pytest.approx(want["chi2"])
    assert across["cd"] == pytest.approx(want["cd"]) and across["groups"] == want["groups"]
    md = (report["out"] / "report.md").read_text()
    assert "Friedman" in md and " ≈" in (report["out"] / "supp_rank_within_table1_frozen.csv").read_text()
    assert "supp_cd_table1_frozen_linear_frozen" in {f.name for f in report["built"]["figures"]}


def test_one_section_per_statistic_in_html_markdown_and_latex(report):
    out = report["out"]
    page = (out / "report.html").read_text()
    for key in ("paper", "ci", "paired", "delong", "calibration", "subgroups", "rankings"):
        assert page.count(f"<section id='{key}'>") == 1, key
    assert page.count("data:image/png;base64,") == len(report["built"]["figures"])
    md = (out / "report.md").read_text()
    for title in ("# Confidence intervals at the unit", "# Calibration", "# Subgroups", "# Rankings", "# DeLong"):
        assert f"\n{title}" in md, title
    tex = (out / "report.tex").read_text()
    assert "\\section*{Calibration}" in tex and "\\includegraphics" in tex
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") and tex.count("\\begin{tabular}") > 5
    for block in re.findall(r"\\begin\{tabular\}\{(l r*)\}(.*?)\\end\{tabular\}", tex, flags=re.S):
        spec, body = block
        assert "\\toprule" in body and "\\midrule" in body and "\\bottomrule" in body
        rows = [line for line in body.splitlines() if line.endswith("\\\\")]
        assert rows and all(len(re.findall(r"(?<!\\)&", row)) == len(spec) - 1 for row in rows)
    for name in re.findall(r"\\includegraphics\[[^]]*\]\{([^}]*)\}", tex):
        assert (out / name).is_file()
    assert tex.count("{") == tex.count("}")


def test_per_result_statistics_land_in_the_reports_own_files(report):
    out, ev = report["out"], report["ev"]
    rows = _rows(out / "supp_evidence.csv")
    statistics = {r["statistic"] for r in rows}
    assert {
        "ci",
        "delong_auc",
        "ece_before",
        "ece_after",
        "temperature",
        "subgroup_metric",
        "subgroup_gap",
        "equalized_odds_difference",
    } <= statistics
    assert {r["folder"] for r in rows} == set(ev.results)
    document = json.loads((out / "evidence.json").read_text())
    assert set(document["results"]) == set(ev.results) and document["settings"]["resamples"] == RESAMPLES
    # the results tree is only read
    assert not list(report["root"].rglob("evidence*"))


def test_a_tree_without_groups_or_metadata_is_image_level_with_a_note(tmp_path: Path):
    root = tmp_path / "results"
    for dataset in ("bin", "grade"):
        for model in ("m1", "m2"):
            _write(root, dataset, model, with_groups=False)
    built = build_report(root, tmp_path / "report", resamples=40, log=lambda _m: None)
    assert {r.unit for r in built["evidence"].results.values()} == {"image"}
    shown = _rows(tmp_path / "report" / "supp_bootstrap_ci.csv")
    assert shown and all(r["95 % CI"].endswith(" image") for r in shown)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "No subgroups: these results' predictions carry no per-sample metadata" in md
    assert not list((tmp_path / "report").glob("supp_subgroups*"))
    assert "bootstrapped by image" in md
    result = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "r2"), "--by", "sex"])
    assert result.exit_code == 2 and "columns available: none" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_by_an_unknown_column_is_one_line_naming_the_columns(report, tmp_path: Path):
    result = runner.invoke(app, ["report", str(report["root"]), "--out", str(tmp_path / "r"), "--by", "sex,view"])
    assert result.exit_code == 2 and "'view'" in result.output and "age, age_bin, sex" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_subgroups_from_yaml_per_dataset(report, tmp_path: Path):
    config = tmp_path / "subgroups.yaml"
    config.write_text("datasets:\n  bin: [sex]\nmin_size: 10\n")
    result = runner.invoke(
        app,
        [
            "report",
            str(report["root"]),
            "--out",
            str(tmp_path / "r"),
            "--resamples",
            "30",
            "--subgroups",
            str(config),
            "--format",
            "md",
        ],
    )
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "r").glob("supp_subgroups_*.csv")}
    assert "supp_subgroups_bin_sex.csv" in names and not any("_ml_" in n or "age" in n for n in names)
    config.write_text("by: [sex]\nbins: 3\n")
    result = runner.invoke(
        app, ["report", str(report["root"]), "--out", str(tmp_path / "r2"), "--subgroups", str(config)]
    )
    assert result.exit_code == 2 and "unknown key(s) bins" in result.output
    result = runner.invoke(
        app, ["report", str(report["root"]), "--out", str(tmp_path / "r3"), "--by", "sex", "--subgroups", str(config)]
    )
    assert result.exit_code == 2 and "not both" in result.output


def test_stats_delegates_to_the_one_bootstrap():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 90)
    scores = rng.random((2, 90, 3)) + 2 * np.eye(3)[y][None]
    pred = stats.Predictions(np.arange(90), y, scores / scores.sum(-1, keepdims=True))
    assert stats.bootstrap_ci("accuracy", pred, 100, 1) == resampling.metric_ci("accuracy", pred, None, 100, 1)
    patients = np.repeat(np.arange(45), 2)
    clustered = stats.bootstrap_ci("accuracy", pred, 100, 1, cluster_ids=patients, unit="patient")
    assert clustered["unit"] == "patient" and clustered["n_clusters"] == 45


def test_a_column_some_datasets_lack_is_noted_not_failed(tmp_path: Path):
    root = tmp_path / "results"
    for model in ("m1", "m2"):
        _write(root, "bin", model, with_groups=True)
        _write(root, "grade", model, with_groups=False)
    built = build_report(root, tmp_path / "report", resamples=30, by="sex", log=lambda _m: None)
    units = {r.dataset: r.unit for r in built["evidence"].results.values()}
    assert units == {"bin": "patient", "grade": "image"}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "sex: not carried by the predictions of grade (no table there)." in md
    assert (tmp_path / "report" / "supp_subgroups_bin_sex.csv").is_file()
    assert not (tmp_path / "report" / "supp_subgroups_grade_sex.csv").exists()
