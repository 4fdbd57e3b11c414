"""The report's external validation and corruption robustness, from real ``fmcache transfer`` results (issue #29).

One results tree, built once with the tiny model: ISIC 2019 → PAD-UFES-20 (a linear probe that fills Table 1), APTOS
→ its own clean cache from two probes (one fills Table 1, one departs from the recipe: the rule must pick the first)
and the second APTOS probe → its own test split corrupted by 2 corruptions × 2 severities. The tables' numbers are
the result files'; Δ's CI and the curves' CIs are recomputed here with the library's bootstrap functions; the
sections appear in every format; a tree without transfers has none; a missing source or a metric mismatch is said.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fmcache.frozen.specs import TransferSpec
from fmcache.report import resampling
from fmcache.report.evidence import unit_of
from fmcache.report.external import TARGET_STREAM
from fmcache.report.predictions import load_predictions, seed_mean
from fmcache.report.render import build_report
from fmcache.runners import run
from tests.conftest import probe, quiet, spec_kwargs
from tests.fixtures_data import make_aptos, make_isic
from tests.fixtures_external import make_pad_ufes20

RESAMPLES, SEED = 200, 3
CORRUPTIONS = ("defocus_blur", "gaussian_noise")
SEVERITIES = (2, 4)


def extract(dataset: str, root: Path, cache_root: Path, **kw) -> Path:
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec

    options = {"norm": "model", "shard_size": 16, "allow_empty_split": dataset != "isic2019", **kw}
    return run_extract(
        ExtractSpec(**spec_kwargs(root, cache_root, dataset=dataset, **options)), progress=False, log=quiet
    )


def transfer(result: Path, cache: Path, out: Path, **kw) -> Path:
    return run("transfer", TransferSpec(cache, result=result, out=out, **kw), log=quiet)["folder"]


def _doc(folder: Path | str) -> dict:
    return {**json.loads((Path(folder) / "result.json").read_text()), "folder": str(folder)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """ISIC 2019 (160 images: 16 test), PAD-UFES-20 (24, all test), APTOS (120: 84 train, 18 val, 18 test) and
    APTOS's test split under 2 corruptions × 2 severities, all of the tiny random-init dinov2."""
    base = tmp_path_factory.mktemp("external")
    results, caches = base / "results", base / "cache"
    isic = extract("isic2019", make_isic(base / "isic", n=160), caches)
    pad = extract("pad_ufes20", make_pad_ufes20(base / "pad", n=24, seed=7), caches)
    aptos_root = make_aptos(base / "aptos", n=120)
    aptos = extract("aptos2019", aptos_root, caches)
    # z-scored features and large LRs: the tiny random model's raw features barely differ between images, and
    # heads that predict one class make every bootstrap degenerate
    fast = {"lrs": (0.01, 0.1), "seeds": 2, "epochs": 4, "batch_size": 8, "plots": False}
    out = {
        "results": results,
        "isic_probe": probe(isic, results, standardize=True, **fast)["folder"],
        "aptos_paper": probe(aptos, results, **fast)["folder"],
        "aptos_departs": probe(aptos, results, standardize=True, metric="accuracy", **fast)["folder"],
    }
    out["isic_to_pad"] = transfer(out["isic_probe"], pad, results)
    out["aptos_self_paper"] = transfer(out["aptos_paper"], aptos, results, drop_overlap=True)
    out["aptos_self_departs"] = transfer(out["aptos_departs"], aptos, results, drop_overlap=True)
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            corrupted = extract("aptos2019", aptos_root, caches, corrupt=f"{name}:{severity}")
            out[(name, severity)] = transfer(out["aptos_departs"], corrupted, results, metric="accuracy")
    return out


@pytest.fixture(scope="module")
def report(tree, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("external_report") / "report"
    formats = ["md", "csv", "tex", "html"]
    return build_report(tree["results"], out, formats=formats, resamples=RESAMPLES, seed=SEED, log=quiet)


def _table(report: dict, name: str):
    (found,) = [t for t in report["tables"] if t.name == name]
    return found


def _values_csv(report: dict, name: str) -> list[dict]:
    with open(report["out"] / f"{name}_values.csv", newline="") as f:
        return list(csv.DictReader(f))


def _boot_values(doc: dict, seed: int) -> tuple[np.ndarray, resampling.Clusters, float]:
    """A result's seed-mean bootstrap values, computed here with the library's functions."""
    pred = load_predictions(doc["folder"])
    _unit, ids, _ = unit_of(doc, pred)
    unit = _unit if ids is not None else None
    clusters = resampling.make_clusters(len(pred.labels), ids, unit, labels=pred.labels)
    values = resampling.per_seed_values(doc["metric"], pred, clusters, RESAMPLES, seed).mean(axis=1)
    return values, clusters, seed_mean(doc["metric"], pred)


def test_the_external_table_holds_the_result_files_numbers(tree, report):
    table = _table(report, "external_validation")
    rows = {(r["source_dataset"], r["target_dataset"]): r for r in table.records}
    assert set(rows) == {("isic2019", "pad_ufes20"), ("aptos2019", "aptos2019")}  # corrupted targets: not here
    for (source_name, _target), transfer_name in (
        (("isic2019", "pad_ufes20"), "isic_to_pad"),
        (("aptos2019", "aptos2019"), "aptos_self_paper"),
    ):
        record, doc = rows[(source_name, _target)], _doc(tree[transfer_name])
        source = _doc(doc["source"]["folder"])
        assert record["folder"] == str(tree[transfer_name])
        assert record["source_test_mean"] == doc["source"]["test_mean"] == source["summary"]["test_mean"]
        assert record["source_test_std"] == source["summary"]["test_std"]
        assert record["target_test_mean"] == doc["summary"]["test_mean"]
        assert record["target_test_std"] == doc["summary"]["test_std"]
        assert (record["source_metric"], record["target_metric"]) == (source["metric"], doc["metric"])
        assert record["delta"] == pytest.approx(doc["summary"]["test_mean"] - source["summary"]["test_mean"], abs=1e-15)
        assert record["target_n"] == doc["target"]["evaluated"]["test"] == len(load_predictions(doc["folder"]).ids)
        assert record["classes_kept"] == len(doc["label_map"]["kept"])
        assert record["classes_dropped"] == len(doc["label_map"]["dropped_classes"])
        assert record["overlap_dropped"] == doc["overlap"]["dropped"]
    assert (
        rows[("isic2019", "pad_ufes20")]["classes_kept"] == 6
        and rows[("aptos2019", "aptos2019")]["overlap_dropped"] == 102
    )  # APTOS's own 28 train + 6 val samples
    # two transfers for APTOS → APTOS: the one whose source fills Table 1 is shown, the other named
    assert rows[("aptos2019", "aptos2019")]["candidates"] == 2
    assert any(str(tree["aptos_self_departs"]) in n and "fills the paper's cell" in n for n in table.notes)
    # the displayed row is the record's, as Markdown shows it
    md = (report["out"] / "report.md").read_text()
    line = next(line for line in md.splitlines() if "| isic2019 → pad_ufes20 |" in line)
    record = rows[("isic2019", "pad_ufes20")]
    assert f"{record['source_test_mean']:.4f} ± {record['source_test_std']:.4f}" in line
    assert f"{record['target_test_mean']:.4f} ± {record['target_test_std']:.4f}" in line
    assert f"{record['delta']:+.4f} [{record['delta_low']:+.4f}, {record['delta_high']:+.4f}]" in line
    assert "| 6 / 0 |" in line


def test_delta_ci_is_the_difference_of_two_independent_bootstraps(tree, report):
    """ISIC → PAD: two test sets; the source is resampled with the report's seed, the target with seed + 1, each at its own unit, and the interval is the percentile interval of the differences."""
    (record,) = [r for r in _table(report, "external_validation").records if r["target_dataset"] == "pad_ufes20"]
    doc = _doc(tree["isic_to_pad"])
    source_values, _, _ = _boot_values(_doc(tree["isic_probe"]), SEED)
    target_values, _, _ = _boot_values(doc, SEED + TARGET_STREAM)
    diff = target_values - source_values
    low, high = np.quantile(diff[np.isfinite(diff)], [0.025, 0.975])
    assert record["delta_ci"] == "independent"
    assert record["delta_low"] == pytest.approx(low, abs=1e-12) and record["delta_high"] == pytest.approx(
        high, abs=1e-12
    )
    assert record["failed"] == int(np.sum(~np.isfinite(diff))) and record["resamples"] == RESAMPLES
    assert any(
        "independent" in n and f"seed {SEED + TARGET_STREAM}" in n for n in _table(report, "external_validation").notes
    )


def test_a_transfer_to_the_sources_own_cache_is_paired(tree, report):
    """APTOS → its own test rows: the same clusters, so both are drawn on the same resamples and Δ's CI is paired
    (the heads reproduce the source's scores, so Δ is 0 and its interval collapses)."""
    (record,) = [r for r in _table(report, "external_validation").records if r["target_dataset"] == "aptos2019"]
    source_values, clusters, _ = _boot_values(_doc(tree["aptos_paper"]), SEED)
    target_values, clusters_t, _ = _boot_values(_doc(tree["aptos_self_paper"]), SEED)
    assert np.array_equal(clusters.row_cluster, clusters_t.row_cluster)
    expected = resampling.paired_from_values(record["delta"], target_values - source_values, clusters, RESAMPLES, SEED)
    assert record["delta_ci"] == "paired" and record["delta"] == pytest.approx(0.0, abs=1e-12)
    assert record["delta_low"] == pytest.approx(expected["low"], abs=1e-12)
    assert record["delta_high"] == pytest.approx(expected["high"], abs=1e-12)
    assert abs(record["delta_low"]) < 1e-5 and abs(record["delta_high"]) < 1e-5
    # the source fills Table 1: its draws are those of its CI in the CI section, not drawn again
    ci = report["evidence"].results[str(tree["aptos_paper"])].ci
    assert (record["source_ci_low"], record["source_ci_high"]) == (ci["low"], ci["high"])


def test_corruption_curves_are_the_results(tree, report):
    table = _table(report, "corruption_robustness")
    source = _doc(tree["aptos_departs"])
    clean = source["summary"]["test_mean"]
    source_values, source_clusters, source_point = _boot_values(source, SEED)
    records = [r for r in table.records if r["corruption"] in CORRUPTIONS]
    assert {(r["corruption"], r["severity"]) for r in records} == {
        (c, s) for c in CORRUPTIONS for s in (0, *SEVERITIES)
    }
    drops: dict[int, list[float]] = {}
    for r in records:
        if r["severity"] == 0:  # the source result on its clean test set
            assert r["mean"] == clean and r["folder"] == str(tree["aptos_departs"])
            ci = resampling.ci_from_values(source_point, source_values, source_clusters, RESAMPLES, SEED)
        else:
            doc = _doc(tree[(r["corruption"], r["severity"])])
            assert doc["target"]["corruption"]["name"] == r["corruption"] and r["mean"] == doc["summary"]["test_mean"]
            assert r["std"] == doc["summary"]["test_std"] and r["folder"] == doc["folder"]
            values, clusters, point = _boot_values(doc, SEED + TARGET_STREAM)
            ci = resampling.ci_from_values(point, values, clusters, RESAMPLES, SEED + TARGET_STREAM)
            assert r["relative_drop"] == pytest.approx((clean - r["mean"]) / clean, abs=1e-12)
            drops.setdefault(r["severity"], []).append((clean - r["mean"]) / clean)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci["low"], ci["high"]), abs=1e-12)
    mean_rows = {r["severity"]: r for r in table.records if r["corruption"] == "mean relative drop"}
    for severity, values in drops.items():
        assert mean_rows[severity]["mean_relative_drop"] == pytest.approx(np.mean(values), abs=1e-12)
        assert mean_rows[severity]["corruptions"] == len(CORRUPTIONS)
    # the CSV is the table's numbers
    written = [r for r in _values_csv(report, "corruption_robustness") if r["corruption"] in CORRUPTIONS]
    assert [float(r["mean"]) for r in written] == pytest.approx([r["mean"] for r in records])
    # the figure: one for APTOS, a panel per corruption
    names = [f.name for f in report["figures"]]
    assert "corruption_robustness_aptos2019" in names and "external_validation" in names
    assert (report["out"] / "figures" / "corruption_robustness_aptos2019.png").stat().st_size > 1000


def test_the_sections_appear_in_every_format(report):
    out = report["out"]
    md, html, tex = ((out / f"report.{ext}").read_text() for ext in ("md", "html", "tex"))
    for title in ("External validation", "Corruption robustness"):
        assert f"# {title}\n" in md and f"\\section*{{{title}}}" in tex and f"<h2>{title}</h2>" in html
    assert "![External validation: source vs target test metric" in md
    assert "figures/external_validation.png" in tex and "figures/corruption_robustness_aptos2019.png" in tex
    assert html.count("data:image/png;base64,") >= 2 and "<section id='external'>" in html
    assert "\\ensuremath{\\Delta}" in tex and "\\ensuremath{\\rightarrow}" in tex
    for name in ("external_validation", "corruption_robustness"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}_values.csv").is_file()
    # a transfer result is shown here, not as a supplementary table
    assert not any(t.name.startswith("supp_transfer") for t in report["tables"])
    keys = [s.key for s in report["sections"]]
    assert keys.index("external") < keys.index("corruption") < keys.index("figures")


def test_a_tree_without_transfers_has_no_such_section(tree, tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(tree["results"], copy, ignore=shutil.ignore_patterns("transfer-*"))
    answer = build_report(copy, tmp_path / "report", formats=["md", "tex", "html"], resamples=50, log=quiet)
    md = (answer["out"] / "report.md").read_text()
    assert "External validation" not in md and "Corruption robustness" not in md
    assert not (answer["out"] / "external_validation.csv").exists()
    assert not [f for f in answer["figures"] if f.name.startswith(("external", "corruption"))]
    assert answer["external"].rows == [] and answer["external"].curves == []


def test_a_missing_source_or_another_metric_is_said(tree, tmp_path):
    """The source's predictions gone: Δ without a CI and a note; the source's metric other than the target's: no Δ."""
    copy = tmp_path / "results"
    shutil.copytree(tree["results"], copy)
    moved = {str(tree["results"]): str(copy)}

    def here(folder: Path) -> Path:
        return Path(str(folder).replace(*next(iter(moved.items()))))

    (here(tree["isic_probe"]) / "predictions.npz").unlink()
    shutil.rmtree(here(tree["aptos_departs"]))  # the corruption curves' source: gone from the tree
    path = here(tree["aptos_self_paper"]) / "result.json"
    doc = json.loads(path.read_text())
    doc["source"]["metric"] = "accuracy"
    path.write_text(json.dumps(doc))
    answer = build_report(copy, tmp_path / "report", resamples=50, log=quiet)
    table = _table(answer, "external_validation")
    rows = {r["target_dataset"]: r for r in table.records}
    isic = rows["pad_ufes20"]
    assert isic["delta"] is not None and isic["delta_low"] is None and isic["delta_ci"] is None
    assert any(
        "isic2019 → pad_ufes20" in n and "no CI of the source" in n and "no predictions.npz" in n for n in table.notes
    )
    assert rows["aptos2019"]["delta"] is None
    assert any("no Δ: the source's metric is accuracy" in n for n in table.notes)
    (line,) = [row for row in table.rows if row[2] == "isic2019 → pad_ufes20"]
    assert line[7] == f"{isic['delta']:+.4f}" and line[8] == "–"
    # the curves keep the source's clean metric as the transfers recorded it, without a CI, and say so
    curves = _table(answer, "corruption_robustness")
    zero = [r for r in curves.records if r.get("severity") == 0 and r["corruption"] in CORRUPTIONS]
    assert len(zero) == len(CORRUPTIONS)
    recorded = _doc(tree[(CORRUPTIONS[0], SEVERITIES[0])])["source"]["test_mean"]
    assert all(r["mean"] == recorded and r["ci_low"] is None for r in zero)
    assert any("severity 0" in n and "not among this report's results" in n for n in curves.notes)
