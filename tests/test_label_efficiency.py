"""Label efficiency (``--train-fraction`` / ``--train-per-class``): nested stratified subsets, one result folder per
(amount, repeat), fraction 1.0 equal to the plain run, the curve's files, the CLI, the grid YAML and the report."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fmcache.cli import app
from fmcache.errors import FmcacheError
from fmcache.frozen import subsets as sub
from fmcache.results import find_results, settings_hash, train_subset
from tests.conftest import knn, probe, token_probe

runner = CliRunner()
CLASSES = ("a", "b", "c", "d")
SIZES = (50, 30, 7, 13)
FRACTIONS = (0.1, 0.2, 0.25, 0.5, 1.0)


def _labels() -> np.ndarray:
    labels = np.repeat(np.arange(len(SIZES)), SIZES)
    return np.random.default_rng(3).permutation(labels)


# -- the subsets themselves (pure numpy) ---------------------------------------------------------------------------


def test_fraction_subsets_are_stratified_nested_and_seeded_per_repeat():
    labels = _labels()
    drawn = {(f, r): sub.stratified(labels, CLASSES, r, fraction=f) for f in FRACTIONS for r in range(3)}
    for (f, _r), rows in drawn.items():
        counts = np.bincount(labels[rows], minlength=len(SIZES))
        assert counts.tolist() == [math.floor(f * n + 0.5) for n in SIZES]  # per class, round half up
        assert np.all(np.diff(rows) > 0)  # sorted, no repeats: the split's own order
    for r in range(3):  # within a repeat every larger subset holds every smaller one
        for small, large in itertools.pairwise(FRACTIONS):
            assert np.isin(drawn[(small, r)], drawn[(large, r)]).all()
    assert not np.array_equal(drawn[(0.25, 0)], drawn[(0.25, 1)])  # repeats draw other samples
    assert np.array_equal(drawn[(0.25, 1)], sub.stratified(labels, CLASSES, 1, fraction=0.25))  # and are seeded
    assert np.array_equal(drawn[(1.0, 2)], np.arange(len(labels)))  # the whole split, row for row


def test_per_class_subsets_are_nested_with_the_fractions_of_their_repeat_and_capped():
    labels = _labels()
    five, ten = sub.stratified(labels, CLASSES, 0, per_class=5), sub.stratified(labels, CLASSES, 0, per_class=10)
    assert np.bincount(labels[five]).tolist() == [5, 5, 5, 5]
    assert np.bincount(labels[ten]).tolist() == [10, 10, 7, 10]  # class c has 7: all of them
    assert np.isin(five, ten).all()
    # one order per (repeat, class): a per-class count and a fraction of the same repeat nest too
    assert np.isin(sub.stratified(labels, CLASSES, 0, fraction=0.1), ten).all()


def test_plan_runs_the_whole_split_once_and_draws_val_when_it_follows():
    labels = _labels()
    plan = sub.plan(labels, labels[:40], CLASSES, False, fractions=(0.5, 1.0), repeats=3, val_follows=True)
    assert [(s.fraction, s.repeat) for s in plan] == [(0.5, 0), (0.5, 1), (0.5, 2), (1.0, 0)]
    assert plan[-1].full and all(s.val is not None for s in plan)
    assert plan[0].settings() == {"train_subset": {"fraction": 0.5, "repeat": 0, "sampling": "stratified",
                                                   "val_follows": True}}  # fmt: skip
    assert plan[0].tag() == "f0.5_r0"
    assert len(plan[0].val) == sum(math.floor(0.5 * n + 0.5) for n in np.bincount(labels[:40]))


def test_a_fraction_that_empties_a_class_says_so_in_one_line():
    with pytest.raises(FmcacheError) as caught:
        sub.stratified(_labels(), CLASSES, 0, fraction=0.05)  # class c: 7 × 0.05 rounds to 0
    message = str(caught.value)
    # 0.5 / 7 = 0.07143 printed rounded UP (0.0714 would round 7 × 0.0714 down to 0 again); tests/test_inputs_checked.py
    assert "\n" not in message and "class 'c'" in message and ">= 0.0715" in message and "--train-per-class" in message


def test_multilabel_subsets_are_random_nested_and_keep_every_label():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 3)) < 0.3).astype(np.float64)
    labels[rng.random((200, 3)) < 0.1] = np.nan  # unknown labels
    small, large = (sub.draw(labels, CLASSES[:3], True, 1, fraction=f) for f in (0.1, 0.5))
    assert len(small) == 20 and len(large) == 100 and np.isin(small, large).all()
    with pytest.raises(FmcacheError, match="needs single-label data"):
        sub.draw(labels, CLASSES[:3], True, 0, per_class=5)
    labels[:, 2] = 0.0
    labels[7, 2] = 1.0  # one positive of label c: a small random subset misses it
    with pytest.raises(FmcacheError, match="leaves label 'c' with no positive train sample"):
        sub.draw(labels, CLASSES[:3], True, 0, fraction=0.05)


def test_spec_checks_the_options():
    from fmcache.frozen.specs import KnnSpec, ProbeSpec

    spec = ProbeSpec("c", train_fraction="1.0,0.1, 0.5", subset_repeats=2)
    assert spec.train_fraction == (0.1, 0.5, 1.0)
    assert KnnSpec("c", train_per_class=[10, 1]).train_per_class == (1, 10)
    for bad, needle in (
        ({"train_fraction": "0,0.5"}, "in (0, 1]"),
        ({"train_fraction": "1.5"}, "in (0, 1]"),
        ({"train_fraction": "0.5", "train_per_class": "5"}, "not both"),
        ({"subset_repeats": 3}, "add --train-fraction"),
        ({"val_fraction_follows": True}, "add --train-fraction"),
        ({"train_per_class": "0"}, "integers >= 1"),
    ):
        with pytest.raises(FmcacheError, match=needle.replace("(", r"\(").replace("]", r"\]")):
            ProbeSpec("c", **bad)


# -- the runners on a real cache ------------------------------------------------------------------------------------

PROBE = {"lrs": [1e-2, 1e-1], "seeds": 2, "epochs": 3, "batch_size": 8, "plots": False}


def _doc(folder) -> dict:
    return json.loads((Path(folder) / "result.json").read_text())


def _same_numbers(a: dict, b: dict) -> None:
    assert a["summary"] == b["summary"]
    pa, pb = np.load(Path(a["folder"]) / "predictions.npz"), np.load(Path(b["folder"]) / "predictions.npz")
    for key in pa.files:
        assert np.array_equal(pa[key], pb[key]), key


def test_fraction_one_equals_the_plain_run_and_the_plain_folder_keeps_its_name(tiny_cache: Path, tmp_path: Path):
    plain = knn(tiny_cache, tmp_path, ks=(3, 5), plots=False)
    curve = knn(tiny_cache, tmp_path, ks=(3, 5), plots=False, train_fraction="0.5,1.0", subset_repeats=2)
    assert len(curve["folders"]) == 3  # 0.5 × 2 repeats, 1.0 once (every repeat is the whole split)
    whole = {**_doc(curve["folders"][-1]), "folder": str(curve["folders"][-1])}
    assert train_subset(whole) == {"fraction": 1.0, "repeat": 0, "sampling": "stratified", "val_follows": False}
    _same_numbers({**_doc(plain["folder"]), "folder": str(plain["folder"])}, whole)
    # the plain run's settings are exactly as before the option existed: no train_subset key, the same folder
    plain_doc = _doc(plain["folder"])
    assert "train_subset" not in plain_doc["settings"] and "subset" not in plain_doc
    assert Path(plain["folder"]).name == f"knn-{settings_hash(plain_doc['settings'])[:12]}"

    plain_p = probe(tiny_cache, tmp_path, **PROBE)
    curve_p = probe(tiny_cache, tmp_path, **PROBE, train_fraction=[1.0])
    assert len(curve_p["folders"]) == 1 and curve_p["folder"] != plain_p["folder"]
    _same_numbers({**_doc(plain_p["folder"]), "folder": str(plain_p["folder"])},
                  {**_doc(curve_p["folder"]), "folder": str(curve_p["folder"])})  # fmt: skip


def test_curve_files_subsets_npz_and_val_that_follows(tiny_cache: Path, tmp_path: Path):
    from fmcache.cache.reader import CacheReader

    reader = CacheReader(tiny_cache)
    options = {**PROBE, "plots": True, "train_fraction": "0.5,1.0", "subset_repeats": 2, "val_fraction_follows": True}
    result = probe(tiny_cache, tmp_path, **options)
    folders = [Path(f) for f in result["folders"]]
    assert len(folders) == 3 and len({f.name for f in folders}) == 3
    for folder in folders:
        doc = _doc(folder)
        saved = np.load(folder / "subsets.npz")
        expected = sub.stratified(reader.labels("train"), reader.class_names, doc["settings"]["train_subset"]["repeat"],
                                  fraction=doc["settings"]["train_subset"]["fraction"])  # fmt: skip
        assert np.array_equal(saved["train_rows"], expected)  # anyone can redo the exact subset
        assert np.array_equal(saved["train_ids"], reader.ids("train")[expected])
        assert doc["subset"]["n_train"] == len(expected) and sum(doc["subset"]["train_per_class"]) == len(expected)
        predictions = np.load(folder / "predictions.npz")
        assert np.array_equal(predictions["val_ids"], saved["val_ids"])  # val followed the fraction
        assert len(predictions["test_ids"]) == len(reader.ids("test"))  # test never does
    curve = Path(result["label_efficiency"])
    assert curve.parent.name == "label_efficiency" and curve.name.startswith("probe_linear-")
    for name in ("label_efficiency.csv", "label_efficiency.png", "subsets.npz", "label_efficiency.json"):
        assert (curve / name).is_file(), name
    rows = result["rows"]
    assert [(r["fraction"], r["repeats"], r["test_n"]) for r in rows] == [(0.5, 2, 4), (1.0, 1, 2)]
    every = np.load(curve / "subsets.npz")
    assert {"f0.5_r0_train_rows", "f0.5_r1_val_ids", "f1_r0_train_ids"} <= set(every.files)
    assert not (curve / "result.json").exists()  # not a result: the report and the grid ignore the folder


def test_pooled_mean_and_std_are_over_repeats_times_seeds():
    from fmcache.label_efficiency import label_efficiency_rows

    values = [[0.5, 0.7], [0.6, 0.9]]  # two repeats × two seeds
    docs = [{"protocol": "probe_linear", "metric": "accuracy", "settings": {"layers": [4], "train_subset":
             {"fraction": 0.1, "repeat": r}}, "subset": {"n_train": 10},
             "summary": {"test_mean": float(np.mean(v)), "test_std": float(np.std(v, ddof=1)), "n_seeds": 2,
                         "val_mean": 0.0, "val_std": 0.0}} for r, v in enumerate(values)]  # fmt: skip
    (row,) = label_efficiency_rows(docs)
    flat = np.ravel(values)
    assert row["test_mean"] == pytest.approx(flat.mean()) and row["test_std"] == pytest.approx(flat.std(ddof=1))
    assert row["layer"] == "4" and row["test_n"] == 4 and row["repeats"] == 2


def test_token_head_subsets_stream_and_preload_alike_and_fraction_one_is_plain(tiny_cache: Path, tmp_path: Path):
    options = {"head": "attentive", "lrs": [1e-3], "seeds": 1, "epochs": 2, "batch_size": 4, "plots": False,
               "layer": "last"}  # fmt: skip
    streamed = token_probe(tiny_cache, tmp_path / "a", **options, preload="no", workers=0, train_fraction=[0.5])
    loaded = token_probe(tiny_cache, tmp_path / "b", **options, preload="yes", train_fraction=[0.5])
    a, b = _doc(streamed["folder"]), _doc(loaded["folder"])
    assert a["summary"] == b["summary"] and a["subset"]["n_train"] < 28
    plain = token_probe(tiny_cache, tmp_path / "c", **options, preload="yes")
    whole = token_probe(tiny_cache, tmp_path / "c", **options, preload="yes", train_fraction=[1.0])
    assert _doc(plain["folder"])["summary"] == _doc(whole["folder"])["summary"]


def test_small_subsets_clip_k_and_train_on_one_batch(tiny_cache: Path, tmp_path: Path):
    notes: list[str] = []
    from fmcache.frozen.run import run_knn, run_probe
    from fmcache.frozen.specs import KnnSpec, ProbeSpec

    result = run_knn(KnnSpec(tiny_cache, out=tmp_path, ks=(3, 20), plots=False, train_per_class=[1]), log=notes.append)
    assert {r["k"] for r in _doc(result["folder"])["summary"]["rows"]} == {3, 5}  # 5 classes × 1: k=20 runs as 5
    run_probe(ProbeSpec(tiny_cache, out=tmp_path, **{**PROBE, "batch_size": 64}, train_per_class=[2]),
              log=notes.append)  # fmt: skip
    assert any("k > 5 runs as k = 5" in n for n in notes) and any("one batch of all of them" in n for n in notes)


def test_multilabel_cache_runs_random_subsets(tmp_path: Path):
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import spec_kwargs
    from tests.fixtures_data import make_chexpert

    root = make_chexpert(tmp_path / "chexpert", n=60)
    kw = spec_kwargs(root, tmp_path / "cache", dataset="chexpert", dataset_options={"uncertain": "ignore"})
    cache = run_extract(ExtractSpec(**kw), progress=False, log=lambda m: None)
    plain = knn(cache, tmp_path / "r", ks=(3,), plots=False)
    curve = knn(cache, tmp_path / "r", ks=(3,), plots=False, train_fraction=[0.8, 1.0])
    docs = [_doc(f) for f in curve["folders"]]
    assert [d["settings"]["train_subset"]["sampling"] for d in docs] == ["random", "random"]
    assert "train_per_class" not in docs[0]["subset"] and docs[0]["metric"] == "mean_auc"
    assert docs[-1]["summary"] == _doc(plain["folder"])["summary"]
    with pytest.raises(FmcacheError, match="needs single-label data"):
        knn(cache, tmp_path / "r", ks=(3,), train_per_class=[2])


# -- the command line, the grid YAML and the report ----------------------------------------------------------------


def test_cli_curve_and_the_empty_class_error(tiny_cache: Path, tmp_path: Path):
    ok = runner.invoke(app, ["knn", str(tiny_cache), "--k", "3", "--out", str(tmp_path), "--no-plots",
                             "--train-fraction", "0.5,1", "--subset-repeats", "2"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "label efficiency" in ok.output and "3 result folders" in ok.output
    bad = runner.invoke(app, ["probe", str(tiny_cache), "--out", str(tmp_path), "--train-fraction", "0.05"])
    assert bad.exit_code == 2
    lines = [line for line in bad.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "leaves class" in lines[0] and "no train sample" in lines[0], bad.output


GRID = """
results: out/results
cache_root: out/cache
models:
  - {name: resnet50, random_init: true, img_size: 32}
datasets:
  - {name: imagefolder, root: data/digits, prepare: digits, per_class: 8}
extract: {batch_size: 32, workers: 0, shard_size: 40}
protocols:
  knn:
    - {ks: [3, 5]}
    - {ks: [3, 5], train_fraction: [0.25, 0.5, 1.0], subset_repeats: 2}
  probe_linear:
    - {lrs: [1.0e-2], seeds: 2, epochs: 2, batch_size: 16}
    - {lrs: [1.0e-2], seeds: 2, epochs: 2, batch_size: 16, train_fraction: [0.5, 1.0]}
"""


def test_grid_yaml_takes_fraction_lists_skips_them_when_done_and_the_report_draws_the_curve(tmp_path: Path):
    config = tmp_path / "grid.yaml"
    config.write_text(GRID)
    first = runner.invoke(app, ["grid", str(config)])
    assert first.exit_code == 0 and "5 job(s): 5 ran, 0 already done" in first.output, first.output
    again = runner.invoke(app, ["grid", str(config)])
    assert "5 job(s): 0 ran, 5 already done" in again.output, again.output  # the ledger sees a curve's runs done
    results = tmp_path / "out" / "results"
    docs = find_results(results)
    subsets = [d for d in docs if train_subset(d)]
    assert len(subsets) == 5 + 2 and len(docs) == len(subsets) + 2  # knn 0.25/0.5 × 2 + 1.0; probe 0.5 + 1.0
    report = runner.invoke(app, ["report", str(results), "--out", str(tmp_path / "report"), "--resamples", "20"])
    assert report.exit_code == 0, report.output
    figure = tmp_path / "report" / "figures" / "supp_label_efficiency_imagefolder_accuracy.png"
    assert figure.is_file()
    assert "supp_label_efficiency_imagefolder_accuracy" in (tmp_path / "report" / "report.md").read_text()
    fig2 = (tmp_path / "report" / "fig2_knn_values.csv").read_text()
    assert not any(d["folder"] in fig2 for d in subsets)  # a subset is never a cell
    # the whole-split k-NN (DINO's k, not the seed's k = 200) is the sweep's supplementary output
    plain_knn = next(d for d in docs if d["protocol"] == "knn" and not train_subset(d))
    assert plain_knn["folder"] in (tmp_path / "report" / "supp_knn_sweep_values.csv").read_text()


def test_shipped_example_config_expands_into_valid_specs():
    from fmcache.grid.config import load_grid
    from fmcache.grid.jobs import expand
    from fmcache.runners import make_spec

    grid = load_grid(Path(__file__).resolve().parents[1] / "configs" / "label_efficiency.yaml")
    readers = [job for job in expand(grid) if job.kind != "extract"]
    specs = [make_spec(job.kind, cache=Path("c"), **job.options) for job in readers]
    assert {s.train_fraction for s in specs if s.train_fraction} == {(0.01, 0.05, 0.1, 0.25, 0.5, 1.0)}
    assert any(s.train_per_class == (1, 5, 20) for s in specs) and all(s.subset_repeats > 1 for s in specs)
