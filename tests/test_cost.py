"""The grid's cost before it runs: exact FLOP counts against closed forms, rates, the dry run's cost table for the
paper's grid, ``fmcache calibrate``, and the demo grid's every job priced (the seconds against a measured run are
benchmarks/bench_cost.py's ratio)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fmcache.cli import app
from fmcache.cost import counting, rates
from fmcache.cost import estimate as cost
from fmcache.cost.sizes import dataset_sizes
from fmcache.errors import FmcacheError
from fmcache.grid.config import GridOptions, load_grid
from fmcache.grid.main import run_grid

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_files(tmp_path, monkeypatch):
    """Counts and calibrations in the test's own folder, never the user's."""
    monkeypatch.setenv("FMCACHE_CALIBRATION", str(tmp_path / "calibration.json"))
    monkeypatch.setenv("FMCACHE_FLOPS_CACHE", str(tmp_path / "flops.json"))


def vit_flops(tokens: int, width: int, depth: int) -> float:
    """A ViT's blocks: QKV, projection and the ×4 MLP (2·T·12·D² per block) plus attention's two products
    (4·T²·D per block)."""
    return depth * (2 * tokens * 12 * width**2 + 4 * tokens**2 * width)


@pytest.mark.parametrize(
    ("name", "size", "tokens", "width", "depth", "patch"),
    [("deit_base", 224, 197, 768, 12, 16), ("dinov2_vitb14", 224, 257, 768, 12, 14),
     ("dinov2_vitl14", 224, 257, 1024, 24, 14), ("dinov2_vitg14", 224, 257, 1536, 40, 14)],
)  # fmt: skip
def test_foundation_flops_match_the_closed_form(name, size, tokens, width, depth, patch):
    shape = counting.Counts().model({"name": name, "img_size": size})
    blocks = vit_flops(tokens, width, depth)
    if name == "dinov2_vitg14":  # ViT-g/14: SwiGLU MLP of hidden 4096 (3 matrices) instead of 4·D
        blocks = depth * (2 * tokens * (4 * width**2 + 3 * width * 4096) + 4 * tokens**2 * width)
    embed = 2 * (tokens - 1) * 3 * patch**2 * width
    assert shape.flops == pytest.approx(blocks + embed, rel=0.03)
    assert (shape.layers, shape.dims[-1], shape.tokens[-1]) == (depth, width, tokens)
    assert shape.head_tokens == (tokens - 1, width) and shape.prefix == 1 and not shape.conv


def test_head_and_resnet_flops_and_the_cache_row():
    counts = counting.Counts()
    flops, params = counts.head("deit", 196, 768, 5, 12)
    proj = 2 * 196 * 768 * 768
    assert flops == pytest.approx(vit_flops(197, 768, 12) + proj, rel=0.02)
    assert 85e6 < params < 87e6  # DeiT-B's blocks, position table, CLS, projection and classifier
    resnet = counts.model({"name": "resnet50", "img_size": 224})
    assert resnet.conv and resnet.flops == pytest.approx(2 * 4.11e9, rel=0.03)  # 4.11 GMACs, the published count
    # a ViT-B row: CLS + mean of 12 layers + the paper feature, fp16 (README P6 measured 38.9 KB with HDF5's own)
    row = cost.Estimator(rates.preset("h200"), {}, counts).row_bytes(counts.model({"name": "deit_base"}), {})
    assert row == pytest.approx((2 * 12 * 768 + 768) * 2, rel=0.01)
    with_tokens = cost.Estimator(rates.preset("h200"), {}, counts).row_bytes(
        counts.model({"name": "deit_base"}), {"tokens": "last,paper"}
    )
    assert with_tokens - row == (197 + 196) * 768 * 2


def test_counts_are_kept_and_reused(tmp_path, monkeypatch):
    counts = counting.Counts()
    counts.model({"name": "deit_base", "img_size": 224})  # counted, then kept
    counts.save()
    doc = json.loads((tmp_path / "flops.json").read_text())
    assert len(doc) == 1

    def refuse(*args):
        raise AssertionError("counted again")

    monkeypatch.setattr(counting, "_count_foundation", refuse)
    assert counting.Counts().model({"name": "deit_base", "img_size": 224}).layers == 12


def test_device_rate_choices(tmp_path):
    messages: list[str] = []
    assert rates.resolve_rates(None, messages.append).label == "H200 SXM"
    assert "no calibration for this machine" in messages[0] and "fmcache calibrate" in messages[0]
    h100, a100 = rates.resolve_rates("h100", print), rates.resolve_rates("A100", print)
    assert h100.fwd == pytest.approx(989e12 * rates.UTILISATION) and a100.fwd < h100.fwd
    assert "estimate" in h100.source and "published" in h100.source
    assert rates.resolve_rates("4e14", print).train == 4e14
    for bad in ("0", "nope"):
        with pytest.raises(FmcacheError, match="--device-rate"):
            rates.resolve_rates(bad, print)
    calibration = tmp_path / "other.json"
    fields = {f: 1.0 for f in rates.Rates.__dataclass_fields__ if f not in ("label", "overlap", "source")}
    calibration.write_text(json.dumps({"Some GPU": {**fields, "measured_at": "then"}}))
    assert rates.resolve_rates(str(calibration), print).label == "Some GPU"


def test_paper_dry_run_prints_the_cost_and_the_seeds(tmp_path):
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "paper.yaml", tmp_path / "configs" / "paper.yaml")
    messages: list[str] = []
    out = run_grid(
        tmp_path / "configs" / "paper.yaml", GridOptions(dry_run=True, device_rate="h200"), log=messages.append
    )
    text = "\n".join(messages)
    result = out["cost"]
    assert not result["not_estimated"], result["not_estimated"]
    assert len(result["jobs"]) == out["jobs"] and f"cost of the {out['jobs']} job(s) to run on H200 SXM" in text
    assert re.search(r"about [\d,.]+ device-hours on H200 SXM", text)
    assert "the seed's online protocol for the same results" in text
    # caching saves the seed's recomputation: every frozen protocol costs less than the seed's run of it
    for job_id, doc in result["jobs"].items():
        if job_id.startswith(("probe_", "knn")):
            assert doc["seed"]["seconds"] > doc["ours"]["seconds"], job_id
    assert result["seed_hours"] > result["hours"] > 0
    # the official counts, split by each dataset's rule (CheXpert: the seed's first int(0.2 n) + 15 held out)
    splits = dataset_sizes(load_grid(tmp_path / "configs" / "paper.yaml").datasets, print)
    n = 224316
    assert splits["chexpert"].train == n - (int(0.2 * n) + 15) and splits["aptos2019"].val == int(3662 * 0.3) // 2
    assert "split 80/10/10 assumed" in splits["cbis_ddsm"].note
    # extraction forwards: every image once plus K = 10 views of each train image
    extract = result["jobs"]["extract/chexpert/dinov2_vitb14"]["ours"]
    assert extract["forwards"] == n + 10 * splits["chexpert"].train


def test_grid_device_rate_flag_and_calibrate_quick(tmp_path):
    tiny = tmp_path / "grid.yaml"
    tiny.write_text(
        "models: [{name: resnet50, random_init: true, img_size: 32}]\n"
        "datasets: [{name: imagefolder, root: data/digits, prepare: digits, per_class: 8}]\n"
        "extract: {batch_size: 32, workers: 0}\nprotocols: {knn: {ks: [3]}, probe_linear: {seeds: 1, epochs: 2}}\n"
    )
    result = runner.invoke(app, ["grid", str(tiny), "--dry-run", "--device-rate", "a100"])
    assert result.exit_code == 0, result.output
    assert "cost of the 3 job(s) to run on A100 SXM 80GB" in result.output
    bad = runner.invoke(app, ["grid", str(tiny), "--dry-run", "--device-rate", "warp9"])
    assert bad.exit_code == 2 and "--device-rate warp9" in bad.output
    calibrated = runner.invoke(app, ["calibrate", "--quick"])
    assert calibrated.exit_code == 0, calibrated.output
    doc = json.loads((tmp_path / "calibration.json").read_text())
    (name, entry), *_ = doc.items()
    assert name.startswith("cpu") and entry["quick"] and entry["fwd"] > 0 and entry["train"] > 0
    mine = runner.invoke(app, ["grid", str(tiny), "--dry-run"])  # this machine's calibration by default
    assert f"to run on {name} (fmcache calibrate" in mine.output, mine.output


@pytest.mark.slow
def test_demo_grid_estimate_prices_every_job_it_ran(demo_grid_run):
    """The dry run of configs/demo_grid.yaml prices exactly the jobs the grid then runs, each with a positive time and
    (but CKA) FLOPs. How close the seconds come to a measured run depends on the machine's load: that ratio is
    benchmarks/bench_cost.py's, never a test's."""
    config, answer, _messages = demo_grid_run
    fresh = config.parent.parent / "fresh"  # an empty results tree and cache, so the dry run prices every job
    plan = run_grid(config, GridOptions(dry_run=True, results=fresh / "results", cache_root=fresh / "cache",
                                        device_rate="h100"), log=lambda m: None)  # fmt: skip
    jobs = plan["cost"]["jobs"]
    assert set(jobs) == set(answer["ran"]) and not plan["cost"]["not_estimated"]
    assert all(doc["ours"]["seconds"] > 0 for doc in jobs.values())
    assert all(doc["ours"]["flops"] > 0 for job, doc in jobs.items() if not job.startswith("cka"))
