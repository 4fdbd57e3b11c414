"""Issue #25: every input checked on the newer surfaces.

- a fraction the error suggests is accepted (rounded up at the printed precision), and each list option's error
  shows its own example;
- the dry run validates every job's spec as the run does, and prices label efficiency and LoRA as they run;
- ``calibration.json``, ``flops.json`` and ``--device-rate`` are checked when read;
- the report checks every ``result.json`` against the results contract, and a label-efficiency run's ``subsets.npz``
  against the sha256 its result records.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fmcache.cli import app
from fmcache.config import as_floats, as_ints
from fmcache.cost import counting, rates
from fmcache.cost.estimate import DataSize, Estimator, bests
from fmcache.errors import FmcacheError
from fmcache.finetune.spec import FinetuneSpec
from fmcache.frozen import subsets as sub
from fmcache.frozen.specs import KnnSpec, ProbeSpec, TokenProbeSpec
from fmcache.grid.config import GridOptions
from fmcache.grid.jobs import Job
from fmcache.grid.main import ignored_options, run_grid
from fmcache.grid.run import damage, is_done, job_spec, ledger_path, refusal
from fmcache.results import (
    RESULT_JSON,
    SUBSETS,
    ContractError,
    find_results,
    incomplete,
    is_complete,
    result_folder,
    seed_summary,
    write_result,
)
from tests.conftest import knn

runner = CliRunner()


@pytest.fixture(autouse=True)
def private_files(tmp_path, monkeypatch):
    """Counts and calibrations in the test's own folder, never the user's."""
    monkeypatch.setenv("FMCACHE_CALIBRATION", str(tmp_path / "calibration.json"))
    monkeypatch.setenv("FMCACHE_FLOPS_CACHE", str(tmp_path / "flops.json"))


def _one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


# -- 2. a suggested fraction is accepted ------------------------------------------------------------------------------


def _labels(sizes) -> np.ndarray:
    return np.random.default_rng(0).permutation(np.repeat(np.arange(len(sizes)), sizes))


def _suggestion(sizes, fraction: float) -> str:
    with pytest.raises(FmcacheError) as caught:
        sub.stratified(_labels(sizes), [str(c) for c in range(len(sizes))], 0, fraction=fraction)
    return re.search(r"use a fraction >= ([0-9.e-]+) ", str(caught.value)).group(1)


@pytest.mark.parametrize(
    ("sizes", "fraction", "printed"),
    [
        ((7, 6, 14, 9, 8), 0.05, "0.0834"),
        ((6,), 0.05, "0.0834"),
        ((7, 50), 0.05, "0.0715"),
        ((14, 30), 0.02, "0.0358"),
        ((3, 100), 0.1, "0.167"),
        ((1, 10), 0.3, "0.5"),
        ((8, 40), 0.05, "0.0625"),
    ],
    ids=["issue-44-rows", "six", "seven", "fourteen", "three", "one", "exact-at-3-digits"],
)
def test_the_suggested_fraction_keeps_every_class(sizes, fraction, printed):
    suggested = _suggestion(sizes, fraction)
    assert suggested == printed
    labels = _labels(sizes)
    rows = sub.stratified(labels, [str(c) for c in range(len(sizes))], 0, fraction=float(suggested))
    assert np.bincount(labels[rows], minlength=len(sizes)).min() >= 1
    # the whole plan (what the runner draws first) takes it too, for every repeat
    sub.plan(labels, labels, [str(c) for c in range(len(sizes))], False, fractions=(float(suggested),), repeats=3)


def test_every_suggestion_from_1_to_200_is_accepted_and_tight():
    for size in range(1, 201):
        suggested = float(_suggestion((size, 400), 0.4 / size))  # 0.4 of one sample always rounds to 0
        labels = _labels((size, 400))
        rows = sub.stratified(labels, ["small", "large"], 0, fraction=suggested)
        assert (labels[rows] == 0).any(), size
        assert 0.5 / size <= suggested <= 0.5 / size * 1.01 + 1e-12, (size, suggested)  # 3 digits, rounded up


def test_the_cli_takes_the_fraction_its_error_suggested(tiny_cache: Path, tmp_path: Path):
    args = ["knn", str(tiny_cache), "--k", "3", "--out", str(tmp_path), "--no-plots", "--train-fraction"]
    refused = runner.invoke(app, [*args, "0.01"])
    suggested = re.search(r">= ([0-9.e-]+) ", _one_error_line(refused.output)).group(1)
    accepted = runner.invoke(app, [*args, suggested])
    assert accepted.exit_code == 0, accepted.output


@pytest.mark.parametrize(
    ("make", "example"),
    [
        (lambda: KnnSpec("/c", train_fraction="x"), "e.g. 0.01,0.1,1.0"),
        (lambda: KnnSpec("/c", train_fraction=""), "e.g. 0.01,0.1,1.0"),
        (lambda: KnnSpec("/c", train_per_class="1.5"), "e.g. 1,5,10"),
        (lambda: KnnSpec("/c", ks="ten"), "e.g. 10,20,100,200"),
        (lambda: ProbeSpec("/c", seeds="a,b"), "e.g. 0,3,7"),
        (lambda: TokenProbeSpec("/c", seeds="1,-1"), "e.g. 0,3,7"),
        (lambda: ProbeSpec("/c", lrs="fast"), "e.g. 1e-5,1e-4"),
        (lambda: FinetuneSpec(lrs="fast"), "e.g. 1e-5,1e-4"),
    ],
    ids=["fraction", "empty-fraction", "per-class", "k", "seeds", "negative-seed", "probe-lrs", "finetune-lrs"],
)
def test_each_list_option_shows_its_own_example(make, example):
    with pytest.raises(FmcacheError) as caught:
        make()
    assert example in str(caught.value)


@pytest.mark.parametrize(
    ("option", "value"),
    [("temperature", [1]), ("temperature", "warm"), ("weight_decay", {"a": 1}), ("clip", [1.0]), ("lora_alpha", True)],
)
def test_a_number_option_given_a_list_or_text_is_one_line(tmp_path: Path, option: str, value):
    """A YAML value of the wrong type for a number option (``temperature: [1]``) is refused naming the option, as
    its flag, never a traceback from float()."""
    config = tmp_path / "options.yaml"
    config.write_text(json.dumps({option: value}))
    command = {"temperature": ["knn", "nope"], "weight_decay": ["probe", "nope"]}.get(option, ["finetune"])
    result = CliRunner().invoke(app, [*command, "--config", str(config)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"--{option.replace('_', '-')} must be a number" in lines[0]


def test_list_coercion_takes_no_default_example():
    """A new call site has to say its own example: the parameter has no default to fall back on."""
    for fn in (as_floats, as_ints):
        assert inspect.signature(fn).parameters["example"].default is inspect.Parameter.empty


# -- 3a. the dry run checks every job's spec as the run does ----------------------------------------------------------

GRID = """
models: [{name: resnet50, random_init: true, img_size: 32}]
datasets: [{name: imagefolder, root: data/digits, prepare: digits, per_class: 8}]
extract: {batch_size: 32, workers: 0}
protocols:
  knn: {ks: [3]}
"""


def _grid(tmp_path: Path, protocols: str = "", extract: str = "") -> Path:
    path = tmp_path / "grid.yaml"
    text = GRID.replace("extract: {batch_size: 32, workers: 0}", extract or "extract: {batch_size: 32, workers: 0}")
    path.write_text(text + protocols)
    return path


@pytest.mark.parametrize(
    ("extra", "refused", "why"),
    [
        (
            "  probe_linear: {seeds: 1, epochs: -3}\n",
            "probe_linear/imagefolder/resnet50",
            "--epochs must be an integer >= 1, got -3",
        ),
        ("  finetune_linear: {epochs: -5, workers: 0}\n", "finetune_linear/imagefolder/resnet50", "got -5"),
        ("  cka: {split: nope}\n", "cka/imagefolder/resnet50", "unknown --split 'nope'"),
        ("  probe_deit: {head_depth: 13, head_random_init: true}\n", "probe_deit/imagefolder/resnet50", "--head-depth"),
    ],
    ids=["probe-epochs", "finetune-epochs", "cka-split", "deit-depth"],
)
def test_the_dry_run_refuses_what_the_run_refuses(tmp_path, extra, refused, why):
    messages: list[str] = []
    with pytest.raises(FmcacheError, match=r"1 job\(s\) of .* would be refused"):
        run_grid(_grid(tmp_path, extra), GridOptions(dry_run=True, device_rate="h100"), log=messages.append)
    text = "\n".join(messages)
    assert f"  refused: {refused}: " in text and why in text
    assert "cost of the 2 job(s)" in text  # the refused job is not priced (no negative costs)


def test_a_refused_extract_and_the_cli_exit_code(tmp_path):
    config = _grid(tmp_path, extract="extract: {batch_size: 0, workers: 0}")
    result = runner.invoke(app, ["grid", str(config), "--dry-run", "--device-rate", "h100"])
    assert result.exit_code == 2 and "refused: extract/imagefolder/resnet50: --batch-size" in result.output
    assert "would be refused" in _one_error_line(result.output)


def test_dry_run_and_run_build_the_spec_alike(tmp_path):
    """One validation: the refusal the dry run prints is the run's own error for the job."""
    job = Job(
        "finetune_linear/d/m",
        "finetune_linear",
        {"name": "aptos2019", "root": str(tmp_path)},
        {"name": "deit_base"},
        {"epochs": -5},
        results=str(tmp_path),
    )
    with pytest.raises(FmcacheError) as caught:
        job_spec(job)
    assert refusal(job) == str(caught.value)
    assert refusal(replace(job, options={"epochs": 5})) is None


# -- 3b. calibrations and --device-rate -------------------------------------------------------------------------------


def _entry(**changes) -> dict:
    fields = {f: 1.0 for f in rates.Rates.__dataclass_fields__ if f not in ("label", "overlap", "source")}
    return {**fields, "overlap": True, "measured_at": "then", **changes}


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ({"Some GPU": [1, 2]}, "'Some GPU' is list"),
        ({"Some GPU": _entry(fwd="fast")}, "fwd = 'fast'"),
        ({"Some GPU": _entry(fwd=0)}, "fwd = 0"),
        ({"Some GPU": _entry(train=-2.0)}, "train = -2.0"),
        ({"Some GPU": _entry(decode_s=-1)}, "decode_s = -1"),
        ({"Some GPU": _entry(io_bytes_s=None)}, "io_bytes_s = None"),
        ({"Some GPU": _entry(overlap="yes")}, "overlap = 'yes'"),
        ({"Some GPU": {k: v for k, v in _entry().items() if k != "train"}}, "lacks train"),
        ("{", "not a calibration file"),
        ([1, 2], "not a calibration file"),
    ],
    ids=[
        "entry-list",
        "text-rate",
        "zero-rate",
        "negative-rate",
        "negative-time",
        "null",
        "bool",
        "missing",
        "not-json",
        "not-an-object",
    ],
)
def test_a_damaged_calibration_file_is_one_line_naming_it(tmp_path, content, named):
    path = tmp_path / "other.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(FmcacheError) as caught:
        rates.resolve_rates(str(path), print)
    assert str(path) in str(caught.value) and named in str(caught.value)


def test_this_machines_damaged_entry_is_named_too(tmp_path, monkeypatch):
    monkeypatch.setattr(rates, "device_name", lambda device=None: "cpu: test")
    (tmp_path / "calibration.json").write_text(json.dumps({"cpu: test": [1, 2]}))
    with pytest.raises(FmcacheError, match=re.escape(str(tmp_path / "calibration.json"))):
        rates.resolve_rates(None, print)
    (tmp_path / "calibration.json").write_text(json.dumps({"cpu: test": _entry(fp64=0.0)}))
    with pytest.raises(FmcacheError, match=r"fp64 = 0\.0"):
        rates.resolve_rates(None, print)
    (tmp_path / "calibration.json").write_text(json.dumps({"cpu: test": _entry(), "old": [3]}))
    with pytest.raises(FmcacheError, match="'old' is list"):  # the whole file is checked when read
        rates.resolve_rates(None, print)


@pytest.mark.parametrize("text", ["inf", "1e400", "nan", "-1", "0", "-inf"])
def test_a_device_rate_must_be_finite_and_positive(text):
    with pytest.raises(FmcacheError, match="positive finite FLOP/s"):
        rates.resolve_rates(text, print)


def test_the_dry_run_with_a_bad_calibration_file_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Some GPU": _entry(fwd=0)}))
    result = runner.invoke(app, ["grid", str(_grid(tmp_path)), "--dry-run", "--device-rate", str(bad)])
    assert result.exit_code == 2 and str(bad) in _one_error_line(result.output)


def test_an_ignored_option_is_said(tmp_path):
    missing = tmp_path / "grid.yaml"
    missing.write_text(GRID.replace("root: data/digits, prepare: digits, per_class: 8", "root: data/none"))
    result = runner.invoke(app, ["grid", str(missing), "--device-rate", "h100"])  # no --dry-run: nothing to price
    assert result.exit_code == 2 and "warning: --device-rate prices a --dry-run only; ignored" in result.output
    assert ignored_options(GridOptions(dry_run=True, device_rate="h100")) == []
    assert ignored_options(GridOptions(slurm_qos="high", gpus_per_job=1)) == [
        "warning: --slurm-qos, --gpus-per-job apply to --executor slurm only; ignored"
    ]


# -- 3c. a damaged flops.json entry is counted again --------------------------------------------------------------------

TINY_VIT = {"name": "timm:vit_tiny_patch16_224", "img_size": 32, "arch_overrides": {"patch_size": 8, "depth": 4}}


def _drop(key):
    def change(entry):
        return {k: v for k, v in entry.items() if k != key}

    return change


@pytest.mark.parametrize(
    "damage_entry",
    [
        _drop("layers"),
        lambda e: {**e, "layers": "4"},
        lambda e: {**e, "flops": -1.0},
        lambda e: {**e, "dims": "x"},
        lambda e: {**e, "params": 1.5},
        lambda e: {**e, "tokens": e["tokens"][:-1]},
        lambda e: [1, 2],
    ],
    ids=["missing-layers", "text-count", "negative-flops", "text-list", "fractional", "short-list", "not-an-object"],
)
def test_a_damaged_count_is_dropped_recounted_and_rewritten(tmp_path, damage_entry):
    path = tmp_path / "flops.json"
    counts = counting.Counts()
    good = counts.model(TINY_VIT)
    counts.save()
    doc = json.loads(path.read_text())
    (key,) = doc
    original = doc[key]
    path.write_text(json.dumps({key: damage_entry(original)}))
    notes: list[str] = []
    again = counting.Counts(log=notes.append)
    assert again.model(TINY_VIT) == good
    assert len(notes) == 1 and str(path) in notes[0] and "counting it again" in notes[0]
    again.save()
    assert json.loads(path.read_text()) == {key: original}


def test_a_flops_file_that_does_not_parse_is_rewritten(tmp_path):
    path = tmp_path / "flops.json"
    path.write_text('{"truncated": ')
    notes: list[str] = []
    counts = counting.Counts(log=notes.append)
    counts.model(TINY_VIT)
    counts.save()
    assert str(path) in notes[0] and len(json.loads(path.read_text())) == 1


# -- 3d. label efficiency and LoRA are priced as they run ---------------------------------------------------------------

DATA = DataSize(train=80, val=10, test=10, classes=10, mpx=0.001)


def _job(kind: str, **options) -> Job:
    return Job(f"{kind}/d/m", kind, {"name": "d", "root": "/d"}, dict(TINY_VIT), options, extract={"workers": 0})


def _estimator(data: DataSize = DATA) -> Estimator:
    return Estimator(rates.preset("h100"), {"d": data}, counting.Counts())


@pytest.mark.parametrize(
    ("options", "trains"),
    [
        ({}, [80]),
        ({"train_fraction": [0.25, 0.5, 1.0], "subset_repeats": 3}, [20] * 3 + [40] * 3 + [80]),
        ({"train_fraction": "0.1,1.0"}, [8, 80]),
        ({"train_per_class": [1, 5, 20], "subset_repeats": 2}, [10, 10, 50, 50, 80]),
    ],
    ids=["plain", "fractions-x3-full-once", "fractions-as-text", "per-class"],
)
def test_knn_label_efficiency_costs_every_subset_run(options, trains):
    """The k-NN search is 2 · queries · bank · width per run; the bank is each run's own train subset."""
    estimator = _estimator()
    width = estimator.counts.model(TINY_VIT).pooled_dim
    cost = estimator.job(_job("knn", ks=[3], **options))
    assert cost.ours.flops == pytest.approx(sum(2.0 * 20 * n * width for n in trains))
    assert cost.ours.seconds >= len(trains) * estimator.rates.job_s  # every run pays a job's fixed cost


def test_a_label_efficiency_probe_is_the_sum_of_its_runs():
    options = {"lrs": [1e-3], "seeds": 2, "epochs": 5, "batch_size": 8}
    curve = {"train_fraction": [0.5, 1.0], "subset_repeats": 2, "val_fraction_follows": True}
    total = _estimator().job(_job("probe_linear", **options, **curve)).ours
    runs = [replace(DATA, train=40, val=5)] * 2 + [DATA]  # val cut alike when it follows; 1.0 once
    parts = [_estimator(d).job(_job("probe_linear", **options)).ours for d in runs]
    for field in ("flops", "read", "seconds"):
        assert getattr(total, field) == pytest.approx(sum(getattr(p, field) for p in parts)), field


@pytest.mark.parametrize(
    ("options", "adapters"),
    [
        ({}, 8 * 1152 * 4),
        ({"freeze": 2}, 8 * 1152 * 2),
        ({"lora_rank": 16}, 16 * 1152 * 4),
        ({"lora_targets": "attn.qkv"}, 8 * (192 + 576) * 4),
        ({"drop_after": 3, "freeze": 1}, 8 * 1152 * 2),
    ],
    ids=["default", "freeze-2", "rank-16", "qkv-only", "blocks-2-3"],
)
def test_lora_is_priced_with_its_adapters_not_the_whole_foundation(options, adapters):
    """ViT-Ti (width 192, 4 blocks): qkv 192 → 576 and proj 192 → 192 give r · 1152 per block. Each epoch's
    checkpoint holds adapters + head with AdamW's two moments (12 B each); each new best exports the whole
    foundation (merged, fp32) with the adapters and the head."""
    estimator = _estimator()
    shape = estimator.counts.model(TINY_VIT)
    base = {"epochs": 4, "lrs": [1e-3, 1e-4], "seeds": 1, "workers": 0, "checkpoint_every": 0}  # last.pt every epoch
    lora = estimator.job(_job("finetune_linear", **base, method="lora", **options)).ours
    full = estimator.job(_job("finetune_linear", **base, **{k: v for k, v in options.items() if "lora" not in k})).ours
    trained = adapters + shape.pooled_dim * DATA.classes
    assert lora.written == pytest.approx(2 * (4 * 12 * trained + bests(4) * (shape.params + trained) * 4))
    assert lora.written < full.written and lora.flops < full.flops
    assert estimator.counts.lora(TINY_VIT, None) == (["attn.qkv", "attn.proj"], [1152] * 4)


# -- 4. the report checks the files it reads ---------------------------------------------------------------------------


def _result(root: Path, model: str, **overrides) -> Path:
    settings = {"epochs": 3, "pool": ["paper"]}
    kwargs = dict(
        protocol="probe_linear",
        settings=settings,
        dataset="aptos2019",
        model=model,
        cache_key=model * 64,
        weights={"source": "random"},
        metric="qwk",
        timings={"train_seconds": 1.0},
        summary=seed_summary(1e-3, [0.5, 0.6], [0.4, 0.5], 2),
        details={},
        rows=[{"x": 1}],
    )
    kwargs.update(overrides)
    return write_result(result_folder(root, "aptos2019", model, model * 64, "probe_linear", settings), **kwargs)


def _break(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("metric"), "no 'metric'"),
        (lambda d: d.pop("summary"), "no 'summary'"),
        (lambda d: d.pop("dataset"), "no 'dataset'"),
        (lambda d: d.update(summary={}), "summary lacks 'best_lr'"),
        (lambda d: d.update(metric=None), "'metric' is None"),
        (lambda d: d.update(protocol="nope"), "'protocol'"),
        (lambda d: d.update(settings=[1]), "'settings' is [1]"),
        (lambda d: d.update(model=""), "'model' is ''"),
    ],
    ids=[
        "no-metric",
        "no-summary",
        "no-dataset",
        "empty-summary",
        "null-metric",
        "unknown-protocol",
        "list-settings",
        "empty-model",
    ],
)
def test_a_result_json_that_breaks_the_contract_is_skipped_and_named(tmp_path, change, field):
    root = tmp_path / "results"
    _result(root, "m1")
    bad = _result(root, "m2")
    _break(bad, change)
    problems: list = []
    assert [d["model"] for d in find_results(root, problems)] == ["m1"]
    assert problems[0][0] == bad and field in problems[0][1]
    assert not is_complete(bad.parent) and field in incomplete(bad.parent)  # the grid reruns it
    report = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "r"), "--resamples", "5"])
    assert report.exit_code == 0, report.output
    warning = next(line for line in report.output.splitlines() if line.startswith("warning: skipped"))
    assert str(bad) in warning and field in warning
    assert "(None)" not in (tmp_path / "r" / "report.md").read_text()
    strict = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "s"), "--strict"])
    assert strict.exit_code == 2 and str(bad) in _one_error_line(strict.output)
    assert not (tmp_path / "s").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"metric": None}, "'metric'"), ({"summary": {}}, "best_lr"), ({"dataset": ""}, "'dataset'")],
    ids=["no-metric", "empty-summary", "empty-dataset"],
)
def test_the_writer_refuses_what_the_readers_would_skip(tmp_path, overrides, field):
    with pytest.raises(ContractError, match=field):
        _result(tmp_path, "m1", **overrides)
    assert not list(tmp_path.rglob(RESULT_JSON))


@pytest.fixture
def curve(tiny_cache: Path, tmp_path: Path) -> list[Path]:
    """A k-NN label-efficiency run on the tiny cache: a 0.5 subset run, then the whole split."""
    return [
        Path(f)
        for f in knn(tiny_cache, tmp_path / "results", ks=[3], train_fraction=[0.5, 1.0], plots=False)["folders"]
    ]


def test_subsets_npz_is_recorded_and_a_damaged_one_is_named(curve: list[Path], tmp_path: Path):
    subset = curve[0]
    doc = json.loads((subset / RESULT_JSON).read_text())
    data = (subset / SUBSETS).read_bytes()
    assert doc["subsets_sha256"] == hashlib.sha256(data).hexdigest() and is_complete(subset)
    (subset / SUBSETS).write_bytes(data[: len(data) // 2])  # truncated
    assert not is_complete(subset) and str(subset / SUBSETS) in incomplete(subset)
    root = tmp_path / "results"
    report = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "r"), "--resamples", "5"])
    assert report.exit_code == 0, report.output
    assert any(str(subset / SUBSETS) in line for line in report.output.splitlines() if line.startswith("warning:"))
    strict = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "s"), "--strict"])
    assert strict.exit_code == 2 and str(subset / SUBSETS) in _one_error_line(strict.output)


def test_a_result_without_the_record_still_needs_a_readable_subsets_file(curve: list[Path]):
    subset = curve[0]
    _break(subset / RESULT_JSON, lambda d: d.pop("subsets_sha256"))  # a result written before the record
    assert is_complete(subset)
    (subset / SUBSETS).write_bytes(b"PK\x03\x04 not a zip")
    assert "does not open" in incomplete(subset)
    (subset / SUBSETS).unlink()
    assert "is missing" in incomplete(subset)


def test_the_grid_redoes_a_curve_whose_subsets_file_changed(curve: list[Path], tmp_path: Path):
    """The grid's ledger names every run of a label-efficiency job: one damaged subsets.npz makes it not done."""
    job = _job("knn", ks=[3], train_fraction=[0.5, 1.0])
    job = replace(job, results=str(tmp_path / "results"))
    path = ledger_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"job": job.id, "folder": str(curve[-1]), "folders": [str(f) for f in curve]}))
    assert is_done(job) and damage(job) is None
    (curve[0] / SUBSETS).write_bytes(b"")
    assert not is_done(job) and str(curve[0] / SUBSETS) in damage(job)
