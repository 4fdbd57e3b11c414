"""`fmcache finetune --method lora`: adapters through peft, the closed-form count, the merged export, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fmcache.cli import app
from fmcache.dist import Dist
from fmcache.finetune.build import build_foundation, build_model
from fmcache.finetune.data import Data, online_data
from fmcache.finetune.loop import ADAPTER_EXPORT, EXPORT, LAST, RESULT, RunSettings, Trainer
from fmcache.finetune.run import result_settings, run_key
from fmcache.finetune.spec import FinetuneSpec
from fmcache.training import load_checkpoint
from tests.conftest import TINY_SIZE, one_thread, spec_kwargs
from tests.test_finetune import _cli, _config, _final, _spec
from tests.tiny_models import TINY

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
WIDTH = 384  # the tiny dinov2's width (ViT-S)
EXPORT_MODEL = "dino_vitb16"  # no LayerScale: at random init DINOv2's 1e-5 LayerScale hides what the adapters learn


def _lora_linears(width: int) -> list[tuple[int, int]]:
    return [(width, 3 * width), (width, width)]  # attn.qkv, attn.proj as (d_in, d_out)


@pytest.mark.parametrize(("freeze", "adapted_blocks"), [("none", 2), ("0", 2), ("1", 1)])
@pytest.mark.parametrize("rank", [1, 4])
def test_trainable_parameters_are_the_closed_form_count(aptos_root, tmp_path, freeze, adapted_blocks, rank):
    spec = _spec(aptos_root, tmp_path, method="lora", lora_rank=rank, freeze=freeze)
    model, _ = build_model(spec, TINY_SIZE, 5, 0)
    trainable = dict(model.trainable_named_parameters())
    adapters = adapted_blocks * sum(rank * (d_in + d_out) for d_in, d_out in _lora_linears(WIDTH))
    head = WIDTH * 5 + 5
    assert sum(p.numel() for p in trainable.values()) == adapters + head
    assert model.lora["adapter_parameters"] == adapters and model.lora["modules"] == 2 * adapted_blocks
    assert all(".lora_" in n for n in trainable if not n.startswith("head."))
    first = 2 - adapted_blocks
    assert {n.split(".blocks.")[1].split(".")[0] for n in trainable if ".blocks." in n} == {
        str(i) for i in range(first, 2)
    }
    # base weights, embedding and final norm are frozen; the adapters start at B = 0 (the foundation, unchanged)
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        assert torch.equal(model.foundation(x).pooled, build_foundation(spec, TINY_SIZE)(x).pooled)


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("sam_vit_b", ["attn.qkv", "attn.proj"]),
        ("blip_base", ["self_attn.qkv", "self_attn.projection"]),
        ("clip_vitb16", ["mlp.c_fc", "mlp.c_proj"]),  # open_clip's attention is an nn.MultiheadAttention
        ("aimv2_l14", ["attn.qkv", "attn.proj"]),
    ],
)
def test_each_block_family_has_default_targets_and_an_exact_merge(tmp_path, name, targets):
    from fmcache.finetune.lora import merged_state_dict

    size, overrides, *_ = TINY[name]
    spec = _spec(tmp_path, tmp_path, model=name, img_size=size, arch_overrides=overrides, method="lora", lora_rank=2)
    model, _ = build_model(spec, size, 3, 0)
    assert model.lora["targets"] == targets
    root = model.foundation.root
    with torch.no_grad():
        for n, p in root.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
        x = torch.randn(2, 3, size, size)
        adapted = model.foundation(x).pooled
        fresh = build_foundation(spec, size)
        fresh.root.load_state_dict(merged_state_dict(root))  # strict: the foundation's own keys, all of them
        assert torch.allclose(fresh(x).pooled, adapted, atol=1e-5)
        assert not torch.allclose(build_foundation(spec, size)(x).pooled, adapted, atol=1e-3)


def test_example_config_is_a_lora_spec():
    from fmcache.config import load_config

    spec = FinetuneSpec(**load_config(ROOT / "configs" / "finetune_lora.yaml"))
    assert spec.method == "lora" and spec.lora_rank == 8 and spec.freeze == "none"


def test_lora_composes_with_the_deit_head_and_trains_in_train_mode(aptos_root, tmp_path):
    spec = _spec(aptos_root, tmp_path, method="lora", lora_rank=2, freeze="1", head="deit", head_random_init=True,
                 head_depth=1)  # fmt: skip
    model, _ = build_model(spec, TINY_SIZE, 5, 0)
    trainable = {n for n, _ in model.trainable_named_parameters()}
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert head <= trainable and all(".blocks.1." in n and ".lora_" in n for n in trainable - head)
    model.train()
    assert model.stages.blocks[1].training and not model.stages.blocks[0].training
    assert not model.foundation.adapter.model.norm.training  # frozen final norm: eval mode


def test_merged_export_loads_in_extract_and_gives_the_adapted_features(aptos_root, tmp_path):
    from fmcache.cache.reader import CacheReader
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec

    size, overrides, *_ = TINY[EXPORT_MODEL]
    spec = _spec(aptos_root, tmp_path / "runs", model=EXPORT_MODEL, img_size=size, arch_overrides=overrides,
                 method="lora", lora_rank=4, epochs=1)  # fmt: skip
    data = online_data(spec)
    model, _ = build_model(spec, size, len(data.class_names), 0)
    settings = RunSettings(lr=1e-2, seed=0, epochs=1, batch_size=8, accum=1, clip=1.0, amp="off", schedule="constant",
                           warmup={"warmup_iters": 0}, weight_decay=1e-5, layer_decay=1.0, metric=data.metric,
                           multilabel=False)  # fmt: skip
    run = tmp_path / "run"
    with one_thread():
        trainer = Trainer(model, data.splits, settings, run, Dist(0, 1, torch.device("cpu")), log=lambda m: None)
        result = trainer.run()
        export = load_file(run / EXPORT)
        start = build_foundation(spec, size).adapter.model.state_dict()
        assert set(export) == set(start)  # the model's own key layout: no lora_* or base_layer keys
        ex = ExtractSpec(**spec_kwargs(aptos_root, tmp_path / "cache", model=EXPORT_MODEL, img_size=size,
                                       arch_overrides=overrides, weights=run / EXPORT, dtype="fp32"))  # fmt: skip
        cached = CacheReader(run_extract(ex, progress=False, log=lambda m: None)).pooled("val", "last", "cls")
        images = torch.stack([data.splits["val"][i][0] for i in range(len(data.splits["val"]))])
        model.eval()
        with torch.no_grad():
            adapted = model.foundation(images).pooled_cls[-1].numpy()  # peft's layers, unmerged
            base = build_foundation(spec, size)(images).pooled_cls[-1].numpy()
    np.testing.assert_allclose(cached, adapted, atol=1e-5)
    assert np.abs(cached - base).max() > 1e-3  # the adapters learned something, and the export carries it
    # only the adapted linears changed; the adapters alone and the checkpoint hold adapters + head only
    changed = {k for k in start if not torch.equal(export[k], start[k])}
    assert changed == {f"blocks.{i}.attn.{m}.weight" for i in range(2) for m in ("qkv", "proj")}
    adapters = load_file(run / ADAPTER_EXPORT)
    assert adapters and all(".lora_" in k for k in adapters)
    ckpt = load_checkpoint(run / LAST, trainer.settings_doc, restore_rng=False)
    assert ckpt is not None
    assert all(".lora_" in k or k.startswith("head.") for k in ckpt["trainable"])
    assert result["checkpoint_bytes"] == (run / LAST).stat().st_size > 0
    assert result["trainable_parameters"] == sum(p.numel() for _, p in model.trainable_named_parameters())


def test_cli_lora_run_reports_sizes_and_gets_its_own_folder(aptos_root, tmp_path):
    cfg = _config(tmp_path)
    out = tmp_path / "runs"
    full = runner.invoke(app, _cli(aptos_root, out, cfg, "--freeze", "1", "--epochs", "1"))
    assert full.exit_code == 0, full.output
    lora = runner.invoke(app, _cli(aptos_root, out, cfg, "--freeze", "1", "--epochs", "1", "--method", "lora",
                                   "--lora-rank", "2", "--lora-alpha", "4", "--lora-targets", "attn.qkv,mlp.fc2"))  # fmt: skip
    assert lora.exit_code == 0, lora.output
    assert "LoRA r=2 on attn.qkv, mlp.fc2 of blocks 2..2" in lora.output
    docs = {json.loads(p.read_text())["settings"].get("method", "full"): json.loads(p.read_text())
            for p in out.glob("*/*/*/finetune_linear-*/result.json")}  # fmt: skip
    assert set(docs) == {"full", "lora"}
    assert docs["full"]["run_key"] != docs["lora"]["run_key"]
    assert not any(k.startswith("lora") for k in docs["full"]["settings"])
    settings = docs["lora"]["settings"]
    assert (
        settings["lora_rank"] == 2
        and settings["lora_alpha"] == 4.0
        and settings["lora_targets"]
        == [
            "attn.qkv",
            "mlp.fc2",
        ]
    )
    details = docs["lora"]["details"]
    expected = 2 * (WIDTH + 3 * WIDTH) + 2 * (4 * WIDTH + WIDTH)  # attn.qkv 384→1152, mlp.fc2 1536→384
    assert details["lora"]["adapter_parameters"] == expected
    assert details["trainable_parameters"] == expected + WIDTH * 5 + 5
    assert details["checkpoint_bytes"] < docs["full"]["details"]["checkpoint_bytes"] / 10


def test_full_method_keys_ignore_the_lora_fields(aptos_root, tmp_path):
    """Result folders of full fine-tuning keep their names: the lora fields enter the keys only with --method lora."""
    data = Data({}, "aptos2019", ["a"], False, "kappa", TINY_SIZE, {"dataset": "aptos2019"})
    full = _spec(aptos_root, tmp_path)
    settings = result_settings(full, "off", {}, 1, 8, {"kind": "linear"})
    assert not {"method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"} & set(settings)
    info = {"targets": ["attn.qkv", "attn.proj"]}
    lora = _spec(aptos_root, tmp_path, method="lora")
    named = _spec(aptos_root, tmp_path, method="lora", lora_targets="attn.qkv,attn.proj")
    assert run_key(full, data, {}) != run_key(lora, data, {}, info) == run_key(named, data, {}, info)


def test_grid_yaml_runs_lora(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "results: out/results\ncache_root: out/cache\n"
        "models:\n  - {name: timm:vit_tiny_patch16_224, random_init: true, img_size: 32, "
        "arch_overrides: {patch_size: 8, depth: 2}}\n"
        "datasets:\n  - {name: imagefolder, root: data/digits, prepare: digits, per_class: 4}\n"
        "protocols:\n  finetune_linear:\n"
        "    - {method: lora, lora_rank: 2, freeze: 1, lrs: [1.0e-3], seeds: 1, epochs: 1, batch_size: 8, workers: 0}\n"
    )
    done = runner.invoke(app, ["grid", str(grid)])
    assert done.exit_code == 0, done.output
    doc = json.loads(next((tmp_path / "out" / "results").rglob("finetune_linear-*/result.json")).read_text())
    assert doc["settings"]["method"] == "lora" and doc["details"]["lora"]["blocks"] == [2, 2]


def test_lora_from_cache_adapts_the_blocks_after_k(aptos_root, tmp_path):
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from fmcache.finetune.run import run_finetune

    cache = run_extract(ExtractSpec(**spec_kwargs(aptos_root, tmp_path / "cache", tokens="1")), progress=False,
                        log=lambda m: None)  # fmt: skip
    spec = _spec(None, tmp_path / "runs", dataset=None, from_cache=cache, freeze="1", epochs=1, method="lora")
    result = run_finetune(spec, progress=False, log=lambda m: None)
    assert result["lora"]["blocks"] == [2, 2]
    export = load_file(next(Path(result["runs_folder"]).glob("lr*/" + EXPORT)))
    start = build_foundation(spec, TINY_SIZE).adapter.model.state_dict()
    assert set(export) == set(start)
    assert {k for k in start if not torch.equal(export[k], start[k])} <= {"blocks.1.attn.qkv.weight",
                                                                          "blocks.1.attn.proj.weight"}  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--method", "lora", "--lora-targets", "attn.q"], "they have: attn.qkv, attn.proj, mlp.fc1, mlp.fc2"),
        (["--method", "lora", "--freeze", "all"], "adapts no block"),
        (["--lora-rank", "4"], "--lora-rank applies to --method lora"),
        (["--method", "lora", "--lora-dropout", "1.5"], "--lora-dropout in [0, 1)"),
        (["--method", "dora"], "unknown --method"),
    ],
)
def test_bad_lora_input_is_one_line_exit_2_nothing_written(aptos_root, tmp_path, extra, needle):
    out = tmp_path / "runs"
    result = runner.invoke(app, _cli(aptos_root, out, _config(tmp_path), *extra))
    assert result.exit_code == 2, result.output
    assert needle in result.output and result.output.strip().count("\n") == 0, result.output
    assert not out.exists()


def test_stage_models_say_lora_does_not_apply(aptos_root, tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("img_size: 64\n")
    args = ["finetune", "--dataset", "aptos2019", "--data-root", str(aptos_root), "--model", "resnet50",
            "--random-init", "--method", "lora", "--config", str(cfg), "--out", str(tmp_path / "runs")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "resnet50 is made of stages" in result.output and "LoRA does not apply" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_lora_kill_9_then_rerun_ends_with_the_same_numbers(aptos_root, tmp_path):
    cfg = _config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--freeze", "1", "--epochs", "4", "--method", "lora", "--lora-rank", "4", "--lora-dropout", "0.1",
            "--checkpoint-every", "0"]  # fmt: skip

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "fmcache", *_cli(aptos_root, out, cfg, *args)]

    subprocess.run(cmd(tmp_path / "a"), env=env, check=True, capture_output=True, cwd=ROOT)
    proc = subprocess.Popen(cmd(tmp_path / "b"), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((tmp_path / "b").glob("*/*/*/*/last.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "b").glob("*/*/*/*/" + RESULT))
    resumed = subprocess.run(cmd(tmp_path / "b"), env=env, capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    assert _final(tmp_path / "a") == _final(tmp_path / "b")
    exports = [load_file(next((tmp_path / side).glob("*/*/*/*/" + EXPORT))) for side in ("a", "b")]
    assert all(torch.equal(exports[0][k], exports[1][k]) for k in exports[0])


@pytest.mark.slow
def test_lora_ddp_two_processes_gloo(aptos_root, tmp_path):
    cfg = _config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29519", "-m",
           "fmcache", *_cli(aptos_root, tmp_path / "runs", cfg, "--freeze", "1", "--epochs", "2", "--method", "lora",
                            "--lora-rank", "2")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(next((tmp_path / "runs").glob("*/*/*/finetune_linear-*/result.json")).read_text())
    assert doc["settings"]["world_size"] == 2 and doc["settings"]["method"] == "lora"
    assert len(list((tmp_path / "runs").glob("*/*/*/*/" + EXPORT))) == 1
    assert len(list((tmp_path / "runs").glob("*/*/*/*/" + ADAPTER_EXPORT))) == 1
    assert done.stdout.count("LoRA r=2") == 1  # only rank 0 reports
