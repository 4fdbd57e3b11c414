"""`fmcache probe --head deit|attentive` on a tiny token cache: results, the layer sweep, resume, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fmcache.cache.reader import CacheReader
from fmcache.cli import app
from fmcache.frozen.common import results_dir
from fmcache.frozen.run_tokens import checkpoint_path
from fmcache.frozen.token_layers import LayerSpec, TokenNorm, layer_spec

FAST = ["--lrs", "1e-3,1e-2", "--seeds", "2", "--epochs", "2", "--batch-size", "16", "--no-plots"]


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _numbers(payload: dict) -> dict:
    """What must match between two runs: every per-layer number except timings (and settings such as passes)."""
    layers = payload["details"]["layers"]
    return {n: {k: v for k, v in e.items() if k not in ("timings", "settings")} for n, e in layers.items()}


def _json(folder: Path, head: str) -> dict:
    """The one ``probe_<head>-<hash>/result.json`` under the cache's results folder (``folder``)."""
    (path,) = folder.glob(f"probe_{head}-*/result.json")
    return json.loads(path.read_text())


def _folder(cache: Path, out: Path) -> Path:
    return results_dir(CacheReader(cache), out)


def _head_folders(cache: Path, out: Path, head: str) -> list[Path]:
    return sorted(_folder(cache, out).glob(f"probe_{head}-*"))


def test_deit_head_layer_sweep_writes_the_curve(tiny_cache, tmp_path):
    out = tmp_path / "res"
    result = cli("probe", tiny_cache, "--head", "deit", "--head-random-init", "--head-depth", "2", "--layer", "all",
                 "--lrs", "1e-3", "--seeds", "1", "--epochs", "2", "--batch-size", "16", "--preload", "no",
                 "--workers", "0", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output
    (folder,) = _head_folders(tiny_cache, out, "deit")
    payload = _json(folder.parent, "deit")
    assert payload["details"]["head_random_init"] and payload["settings"]["head_weights"]["source"] == "random"
    assert payload["settings"]["token_norm"] == "none"  # the seed's choice for DINOv2: pre-norm tokens
    assert set(payload["details"]["layers"]) == {"1", "2"} and payload["protocol"] == "probe_deit"
    assert set(payload["summary"]["per_layer"]) == {"1", "2"} and payload["summary"]["n_seeds"] == 1
    entry = payload["details"]["layers"]["2"]
    for key in ("best_lr", "val_mean", "test_mean", "test_std", "per_lr", "curves"):
        assert key in entry
    assert entry["settings"]["grid"] == [4, 4] and entry["settings"]["tokens"] == 16  # CLS dropped
    assert entry["timings"]["train_seconds"] > 0 and entry["timings"]["inference_seconds_per_sample"] > 0
    assert len(entry["curves"]["0.001"][0]) == 2
    vs_layer = (folder / "probe_deit_vs_layer.csv").read_text().splitlines()
    assert vs_layer[0].startswith("layer,best_lr") and len(vs_layer) == 3
    assert (folder / "probe_deit_vs_layer.png").stat().st_size > 0
    assert (folder / "result.csv").read_text().count("\n") == 3  # header + one head per layer
    # predictions.npz: the last layer's best-LR heads at their selected epoch, rescored to the JSON's test value
    from fmcache.metrics import evaluate

    with np.load(folder / "predictions.npz") as npz:
        assert npz["test_scores"].shape == (1, len(npz["test_ids"]), 5) and list(npz["seeds"]) == [0]
        rescored = evaluate(payload["metric"], npz["test_labels"], npz["test_scores"][0], False)["value"]
    assert rescored == pytest.approx(entry["per_lr"]["0.001"]["test_per_seed"][0], abs=1e-6)


def test_attentive_grid_preload_passes_and_lone_heads_agree(tiny_cache, tmp_path):
    runs = {
        "ram": ["--preload", "yes"],
        "stream": ["--preload", "no", "--workers", "0"],
        "passes": ["--preload", "yes", "--heads-per-pass", "1"],
    }
    numbers = {}
    for name, extra in runs.items():
        out = tmp_path / name
        result = cli("probe", tiny_cache, "--head", "attentive", "--layer", "2", *FAST, *extra, "--out", out)
        assert result.exit_code == 0, result.output
        numbers[name] = _numbers(_json(_folder(tiny_cache, out), "attentive"))
    assert numbers["ram"] == numbers["stream"] == numbers["passes"]
    # a head of the grid is what it would be on its own: seed 1 at lr 1e-2 alone
    out = tmp_path / "lone"
    args = ["--lrs", "1e-2", "--seeds", "2", "--epochs", "2", "--batch-size", "16", "--no-plots"]
    result = cli("probe", tiny_cache, "--head", "attentive", "--layer", "2", *args, "--out", out)
    assert result.exit_code == 0, result.output
    lone = _json(_folder(tiny_cache, out), "attentive")["details"]["layers"]["2"]
    grid = numbers["ram"]["2"]
    assert lone["curves"]["0.01"] == grid["curves"]["0.01"]
    assert lone["per_lr"]["0.01"]["test_per_seed"] == grid["per_lr"]["0.01"]["test_per_seed"]


def test_token_norm_final_applies_the_stored_norm(tiny_cache, tiny_weights):
    from fmcache.models import create_foundation
    from tests.conftest import TINY_MODEL, TINY_OVERRIDES, TINY_SIZE

    reader = CacheReader(tiny_cache)
    spec = layer_spec(reader, 2, "final", "deit")
    raw = torch.from_numpy(reader._gather("tokens/layer_02", "val")).float()
    model = create_foundation(TINY_MODEL, weights=tiny_weights, img_size=TINY_SIZE, arch_overrides=TINY_OVERRIDES)
    with torch.no_grad():
        expected = model.adapter.model.norm(raw)[:, 1:]
    torch.testing.assert_close(TokenNorm(spec, torch.device("cpu"))(raw), expected)
    plain = LayerSpec(2, 1, 16, 384, (4, 4), None)
    assert torch.equal(TokenNorm(plain, torch.device("cpu"))(raw), raw[:, 1:])


def _manifest_copy(cache: Path, tmp_path: Path, token_layers: list[int]) -> Path:
    copy = tmp_path / "cache_copy" / cache.name
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["token_layers"] = token_layers
    manifest["model"]["token_shapes"] = {k: v for k, v in manifest["model"]["token_shapes"].items()
                                         if int(k) in token_layers}  # fmt: skip
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_bad_input_one_line_exit_2_nothing_written(tiny_cache, tmp_path):
    out = tmp_path / "res"
    base = ["probe", tiny_cache, "--out", out, *FAST]
    cases = [
        (["--head", "deit", "--head-random-init", "--head-depth", "13"], "--head-depth"),
        (["--head", "deit", "--head-depth", "2", "--head-weights", tmp_path / "nope.pt"], "does not exist"),
        (["--head", "deit", "--head-random-init", "--head-weights", tmp_path / "x.pt"], "not both"),
        (["--head", "attentive", "--head-weights", tmp_path / "x.pt"], "attentive head has no pretrained"),
        (["--head", "attentive", "--layer", "3"], "layers 1..2"),
        (["--head", "attentive", "--token-norm", "bogus"], "--token-norm"),
        (["--head", "attentive", "--preload", "maybe"], "--preload"),
        (["--head", "attentive", "--schedule", "step"], "schedule"),
    ]
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x05print")
    cases.append((["--head", "deit", "--head-depth", "1", "--head-weights", tmp_path / "evil.pt"], "refused"))
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 768), "pos_embed": torch.zeros(1, 50, 768)}},
               tmp_path / "short.pth")  # fmt: skip
    cases.append((["--head", "deit", "--head-depth", "1", "--head-weights", tmp_path / "short.pth"], "missing"))
    for args, words in cases:
        result = cli(*base, *args)
        assert result.exit_code == 2, (args, result.output)
        (line,) = error_lines(result.output)
        assert words in line, (args, line)
    assert not out.exists()

    only_two = _manifest_copy(tiny_cache, tmp_path, [2])
    result = cli("probe", only_two, "--head", "attentive", "--layer", "1", "--out", out, *FAST)
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "no tokens of layer 1" in line and "cached token layers: 2" in line and "--tokens" in line
    no_tokens = _manifest_copy(tiny_cache, tmp_path / "b", [])
    result = cli("probe", no_tokens, "--head", "deit", "--head-random-init", "--out", out, *FAST)
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "holds no token layers" in line and "--tokens" in line
    assert not out.exists()


def test_imagenet_head_offline_says_what_to_pass(tiny_cache, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    result = cli("probe", tiny_cache, "--head", "deit", "--head-depth", "2", "--out", tmp_path / "r", *FAST)
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "--head-weights FILE" in line and "--head-random-init" in line
    assert not (tmp_path / "r").exists()


def test_resume_refuses_other_settings_and_no_resume_starts_over(tiny_cache, tmp_path):
    out = tmp_path / "res"
    args = ["probe", tiny_cache, "--head", "attentive", "--layer", "2", "--out", out]
    assert cli(*args, *FAST).exit_code == 0
    (first_folder,) = _head_folders(tiny_cache, out, "attentive")
    before = (first_folder / "result.json").read_bytes()
    # other numbers-changing settings get their own folder: no conflict, the first result stays as it was
    assert cli(*args, *FAST[:4], "--epochs", "3", *FAST[6:]).exit_code == 0
    assert len(_head_folders(tiny_cache, out, "attentive")) == 2
    assert (first_folder / "result.json").read_bytes() == before
    # a setting that only changes how heads are trained (passes) keeps the folder; its checkpoint refuses a resume
    changed = [*FAST, "--heads-per-pass", "1"]
    result = cli(*args, *changed)
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "other settings" in line and "heads_per_pass" in line and "--no-resume" in line
    assert (first_folder / "result.json").read_bytes() == before  # nothing written
    result = cli(*args, *changed, "--no-resume")
    assert result.exit_code == 0, result.output
    after = json.loads((first_folder / "result.json").read_text())
    assert len(after["details"]["layers"]["2"]["curves"]["0.001"][0]) == 2
    # a rerun of a finished command reads its checkpoint and reports the same numbers without training
    first = _numbers(after)
    assert cli(*args, *changed).exit_code == 0
    assert _numbers(json.loads((first_folder / "result.json").read_text())) == first


@pytest.mark.slow
@pytest.mark.parametrize("head", ["attentive", "deit"])
def test_kill_9_then_rerun_gives_identical_numbers(tiny_cache, tmp_path, head):
    extra = ["--head-random-init", "--head-depth", "1"] if head == "deit" else []
    epochs = "4" if head == "attentive" else "3"
    args = ["probe", str(tiny_cache), "--head", head, "--layer", "2", "--lrs", "1e-3,1e-2", "--seeds", "2",
            "--epochs", epochs, "--batch-size", "8", "--no-plots", "--device", "cpu", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fmcache", *args, "--out", str(out)], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fmcache", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # the run's folder is named by its settings: the same as the whole run's, under the other --out
    (whole_folder,) = _head_folders(tiny_cache, tmp_path / "whole", head)
    ckpt = checkpoint_path(_folder(tiny_cache, out) / whole_folder.name, head, 2)
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; give it more epochs"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(ckpt, weights_only=True)["state"]
    assert state["epoch"] < int(epochs) and "heads" in state  # killed mid-run, not after the last epoch
    again = run(out)
    assert again.returncode == 0, again.stderr
    a, b = _json(_folder(tiny_cache, tmp_path / "whole"), head), _json(_folder(tiny_cache, out), head)
    assert _numbers(a) == _numbers(b)
    assert np.isfinite(a["details"]["layers"]["2"]["val_mean"])
    # the best heads kept through the kill (one state file per head) are the uninterrupted run's, byte for byte
    assert a["heads"]["sha256"] == b["heads"]["sha256"] and a["heads"]["bytes"] > 0


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory, aptos_root, tiny_weights) -> Path:
    """The APTOS fixture with 2 augmented views per train image and last-layer tokens."""
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import quiet, spec_kwargs

    root = tmp_path_factory.mktemp("views_tokens")
    spec = ExtractSpec(**spec_kwargs(aptos_root, root, weights=tiny_weights, views=2, tokens="last", shard_size=16))
    return run_extract(spec, progress=False, log=quiet)


def test_views_train_on_a_seeded_view_per_epoch(views_cache, tmp_path):
    args = ["probe", views_cache, "--head", "attentive", "--lrs", "1e-3", "--seeds", "1", "--epochs", "2",
            "--batch-size", "16", "--no-plots"]  # fmt: skip
    numbers = {}
    for name, extra in {"ram": ["--preload", "yes"], "stream": ["--preload", "no", "--workers", "0"],
                        "off": ["--views", "off"]}.items():  # fmt: skip
        result = cli(*args, *extra, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        payload = _json(_folder(views_cache, tmp_path / name), "attentive")
        assert payload["settings"]["views"] == {"used": name != "off", "k": 0 if name == "off" else 2}
        numbers[name] = _numbers(payload)
    assert numbers["ram"] == numbers["stream"]
    from fmcache.frozen.tokens import TokenSplit

    reader = CacheReader(views_cache)
    train = TokenSplit(reader, "train", 2, preload=True, workers=0, views=True)
    assert train.k == 2 and len(train.x) == 2 * train.n  # items are views: i * k + v
    view = reader.view_tokens(2)[3 * 2 + 1][0]
    assert torch.equal(train.x[7].float(), view) and not torch.equal(view, reader.tokens("train", 2)[3][0])


def test_deit_head_from_a_release_file_records_it(tiny_cache, tmp_path):
    from tests.test_token_heads import _deit_state

    path = tmp_path / "deit_base_patch16_224.pth"
    torch.save({"model": _deit_state(depth=1)}, path)
    out = tmp_path / "res"
    result = cli("probe", tiny_cache, "--head", "deit", "--head-weights", path, "--head-depth", "1", "--layer", "2",
                 "--lrs", "1e-3", "--seeds", "1", "--epochs", "1", "--batch-size", "16", "--no-plots", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "random weights" not in result.output
    weights = _json(_folder(tiny_cache, out), "deit")["details"]["head_weights"]
    assert weights["source"] == "file" and len(weights["sha256"]) == 64 and weights["loaded"] == weights["total"]
    assert not _json(_folder(tiny_cache, out), "deit")["details"]["head_random_init"]


def test_paper_tokens_are_cached_and_probed_as_the_paper_feeds_them(aptos_root, tmp_path):
    """--tokens last,paper caches what the seed's DeiT head reads; --layer paper trains on it; both that and the last
    layer under the model's own rule (pre-norm for DINOv2) count as the paper's Table 1 input."""
    import json

    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import spec_kwargs, token_probe

    folder = run_extract(ExtractSpec(**spec_kwargs(aptos_root, tmp_path / "c", tokens="last,paper", limit=8)),
                         progress=False, log=lambda m: None)  # fmt: skip
    reader = CacheReader(folder)
    assert reader.has_paper_tokens and reader.manifest["model"]["head_tokens"] == "prenorm"
    assert reader.manifest["inputs"]["tokens"] == ["last", "paper"]
    paper = reader.tokens("test", "paper")
    last = reader.tokens("test", 2)
    assert torch.equal(paper[0][0], last[0][0][1:])  # DINOv2: the last block's patch tokens, before the norm
    options = {"lrs": (1e-3,), "seeds": 1, "epochs": 1, "batch_size": 4, "head_random_init": True, "head_depth": 1,
               "workers": 0, "plots": False}  # fmt: skip
    by_paper = token_probe(reader, tmp_path / "r", layer="paper", **options)
    doc = json.loads((Path(by_paper["folder"]) / "result.json").read_text())
    assert doc["settings"]["layers"] == ["paper"] and doc["paper_feature"] is True
    by_last = token_probe(reader, tmp_path / "r", layer="last", **options)
    assert json.loads((Path(by_last["folder"]) / "result.json").read_text())["paper_feature"] is True
    final = token_probe(reader, tmp_path / "r", layer="last", token_norm="final", **options)
    assert json.loads((Path(final["folder"]) / "result.json").read_text())["paper_feature"] is False
    from fmcache.errors import FmcacheError

    with pytest.raises(FmcacheError, match="no paper tokens"):
        plain = run_extract(ExtractSpec(**spec_kwargs(aptos_root, tmp_path / "c2", tokens="last", limit=8)),
                            progress=False, log=lambda m: None)  # fmt: skip
        token_probe(CacheReader(plain), tmp_path / "r", layer="paper", **options)


def test_verify_knows_the_paper_tokens(aptos_root, tmp_path):
    """``tokens/paper`` is a dataset the manifest promises: verify names a shard that lacks it."""
    import h5py

    from fmcache.cache.manifest import read_manifest
    from fmcache.cache.verify import verify_cache
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import spec_kwargs

    folder = run_extract(ExtractSpec(**spec_kwargs(aptos_root, tmp_path / "c", tokens="paper", limit=8)),
                         progress=False, log=lambda m: None)  # fmt: skip
    assert not verify_cache(folder, full=False).damaged
    first = sorted(folder.glob("shard-*.h5"))[0]
    with h5py.File(first, "a") as fh:
        del fh["tokens/paper"]
    manifest = read_manifest(folder)
    for entry in manifest["shards"]:
        entry.pop("size")  # the sizes no longer match either; check the layout problem itself
    problems = {c.file: c.problem for c in verify_cache(folder, full=False, manifest=manifest).damaged}
    assert "lacks dataset tokens/paper" in problems[first.name]
