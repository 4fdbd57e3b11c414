"""`fmcache finetune`: block views, freezing that holds, exact resume, export → extract, DDP, from-cache, bad input."""

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
from fmcache.errors import FmcacheError
from fmcache.finetune.build import build_foundation, build_model
from fmcache.finetune.data import online_data
from fmcache.finetune.loop import RESULT, RunSettings, Trainer
from fmcache.finetune.run import run_finetune
from fmcache.finetune.spec import FinetuneSpec
from fmcache.metrics import evaluate
from tests.conftest import TINY_MODEL, TINY_OVERRIDES, TINY_SIZE, one_thread
from tests.tiny_models import TINY

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _spec(data_root: Path, out: Path, **kw) -> FinetuneSpec:
    base = dict(dataset="aptos2019", data_root=data_root, model=TINY_MODEL, random_init=True, img_size=TINY_SIZE,
                arch_overrides=dict(TINY_OVERRIDES), lrs=(1e-3,), epochs=2, batch_size=8, workers=0, out=out)  # fmt: skip
    return FinetuneSpec(**{**base, **kw})


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(f"img_size: {TINY_SIZE}\narch_overrides: {{depth: 2}}\nbatch_size: 8\nworkers: 0\nlrs: [1e-3]\n")
    return path


def _cli(data_root: Path, out: Path, cfg: Path, *extra: str) -> list[str]:
    return ["finetune", "--dataset", "aptos2019", "--data-root", str(data_root), "--model", TINY_MODEL,
            "--random-init", "--config", str(cfg), "--out", str(out), "--quiet", *extra]  # fmt: skip


@pytest.mark.parametrize("name", ["dinov2_vits14", "sam_vit_b", "clip_vitb16", "blip_base"])
def test_block_view_matches_foundation(name):
    size, overrides, *_ = TINY[name]
    torch.manual_seed(0)
    from fmcache.models import create_foundation

    foundation = create_foundation(name, random_init=True, img_size=size, arch_overrides=overrides)
    stages = foundation.block_layout()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = foundation(x)
        h = stages.embed(x)
        for i in range(stages.depth):
            h = stages.run_block(i, h)
            assert torch.equal(stages.to_tokens(h), out.tokens[i])
        assert torch.allclose(stages.pooled(h, last=True), out.pooled, atol=1e-6)
        # the from-cache path: layer-1 tokens back into block 2
        assert torch.equal(stages.to_tokens(stages.run_block(1, stages.from_tokens(out.tokens[0]))), out.tokens[1])


def test_frozen_tensors_bit_identical_and_trainable_changed(aptos_root, tmp_path):
    spec = _spec(aptos_root, tmp_path / "runs", freeze="1")
    with one_thread():
        result = run_finetune(spec, progress=False, log=lambda m: None)
    export = load_file(next(Path(result["runs_folder"]).glob("lr*/foundation.safetensors")))
    start = build_foundation(spec, TINY_SIZE).adapter.model.state_dict()
    assert set(export) == set(start)  # the model's own key layout, every tensor
    frozen = [k for k in start if not k.startswith("blocks.1.")]  # embedding, block 1 and the final norm
    assert all(torch.equal(export[k], start[k]) for k in frozen)
    changed = [k for k in start if k.startswith("blocks.1.") and not torch.equal(export[k], start[k])]
    assert len(changed) > 5
    entry = result["layers"][2]
    assert {"best_lr", "val_mean", "test_mean", "test_std", "per_lr", "curves", "timings"} <= set(entry)
    assert entry["timings"]["train_s_per_epoch"] > 0 and entry["timings"]["peak_memory_bytes"] > 0
    folder = Path(result["folder"])
    assert folder.parent == Path(result["runs_folder"]) and folder.name.startswith("finetune_linear-")
    saved = json.loads((folder / "result.json").read_text())
    assert saved["settings"]["effective_batch_size"] == 8 and saved["cache_key"] is None
    assert saved["protocol"] == "finetune_linear" and saved["settings"]["freeze"] == "1"
    assert "drop_after" in saved["settings"] and saved["run_key"].startswith(folder.parent.name)
    assert saved["summary"]["test_mean"] == pytest.approx(entry["test_mean"])
    assert saved["timings"]["train_seconds"] > 0 and saved["timings"]["inference_seconds_per_sample"] > 0
    assert (folder / "result.csv").read_text().startswith("layer,head,freeze,lr,seed")
    # predictions.npz: the best LR's run per seed at its best epoch, rescored to the JSON's numbers
    best = entry["per_lr"][entry["best_lr"]]
    with np.load(folder / "predictions.npz") as npz:
        assert npz["test_scores"].shape == (len(best["test_per_seed"]), len(npz["test_ids"]), 5)
        for i, value in enumerate(best["test_per_seed"]):
            rescored = evaluate(saved["metric"], npz["test_labels"], npz["test_scores"][i], False)["value"]
            assert rescored == pytest.approx(value, abs=1e-6)


def test_frozen_prefix_keeps_no_graph(aptos_root, tmp_path):
    model, _ = build_model(_spec(aptos_root, tmp_path, freeze="1"), TINY_SIZE, 5, 0)
    seen = []
    model.stages.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    model.stages.blocks[1].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    model.train()
    model(torch.randn(2, 3, TINY_SIZE, TINY_SIZE)).sum().backward()
    assert seen == [False, True]  # block 1 ran under no_grad; block 2 builds the graph
    assert not model.foundation.training  # the seed's eval-mode backbone
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("head.", "foundation.adapter.model.blocks.1.")) for n in trainable)


def test_export_loads_in_extract_and_gives_the_finetuned_features(aptos_root, tmp_path):
    from fmcache.cache.reader import CacheReader
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import spec_kwargs

    spec = _spec(aptos_root, tmp_path / "runs", freeze="none", epochs=1)
    data = online_data(spec)
    model, _ = build_model(spec, TINY_SIZE, len(data.class_names), 0)
    settings = RunSettings(lr=1e-3, seed=0, epochs=1, batch_size=8, accum=1, clip=1.0, amp="off", schedule="constant",
                           warmup={"warmup_iters": 0}, weight_decay=1e-5, layer_decay=1.0, metric=data.metric,
                           multilabel=False)  # fmt: skip
    from fmcache.dist import Dist

    with one_thread():
        Trainer(
            model, data.splits, settings, tmp_path / "run", Dist(0, 1, torch.device("cpu")), log=lambda m: None
        ).run()
        export = tmp_path / "run" / "foundation.safetensors"
        ex = ExtractSpec(**spec_kwargs(aptos_root, tmp_path / "cache", weights=export, dtype="fp32"))
        reader = CacheReader(run_extract(ex, progress=False, log=lambda m: None))
        cached = reader.pooled("val", "last", "cls")
        images = torch.stack([data.splits["val"][i][0] for i in range(len(data.splits["val"]))])
        with torch.no_grad():
            model.eval()
            mine = model.foundation(images).pooled_cls[-1].numpy()
    np.testing.assert_allclose(cached, mine, atol=1e-5)
    assert not np.allclose(cached, build_foundation(spec, TINY_SIZE)(images).pooled_cls[-1].detach().numpy())


def _final(out: Path) -> dict:
    doc = json.loads(next(out.glob("*/*/*/finetune_linear-*/result.json")).read_text())
    entry = next(iter(doc["details"]["layers"].values()))
    return {"curves": entry["curves"], "test": entry["test_mean"], "per_lr": entry["per_lr"]}


@pytest.mark.slow
def test_kill_9_then_rerun_ends_with_the_same_numbers(aptos_root, tmp_path):
    cfg = _config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--freeze", "1", "--epochs", "4", "--checkpoint-every", "0"]  # last.pt after every epoch

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
    # a rerun with another training setting in the same --out is refused, naming it
    other = subprocess.run([*cmd(tmp_path / "b"), "--clip", "0.5"], env=env, capture_output=True,
                           text=True, cwd=ROOT)  # fmt: skip
    assert other.returncode == 2 and "other settings (clip" in other.stderr


@pytest.mark.slow
def test_long_checkpoint_interval_kill_9_and_sigterm_end_with_the_same_numbers(aptos_root, tmp_path):
    """--checkpoint-every 100000: last.pt only at the end or on SIGTERM. A kill -9 after a few epochs leaves no
    checkpoint, so the rerun starts over; a SIGTERM ends the epoch in flight, writes last.pt and exits 143, and the
    rerun resumes from it. Both end with the uninterrupted run's numbers."""
    cfg = _config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--freeze", "1", "--epochs", "8", "--checkpoint-every", "100000"]

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "fmcache", *_cli(aptos_root, out, cfg, *args)]

    def start_and_wait(out: Path) -> subprocess.Popen:
        proc = subprocess.Popen(cmd(out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        deadline = time.time() + 120
        while not list(out.glob("*/*/*/*/best_predictions.npz")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)  # the first epoch's val improved: an epoch is done, none was checkpointed
        assert proc.poll() is None, "the run ended before it could be stopped"
        return proc

    subprocess.run(cmd(tmp_path / "a"), env=env, check=True, capture_output=True, cwd=ROOT)
    killed = start_and_wait(tmp_path / "b")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not list((tmp_path / "b").glob("*/*/*/*/last.pt"))  # no checkpoint yet: the rerun starts over
    rerun = subprocess.run(cmd(tmp_path / "b"), env=env, capture_output=True, text=True, cwd=ROOT)
    assert rerun.returncode == 0 and "resumed" not in rerun.stderr, rerun.stderr
    assert _final(tmp_path / "a") == _final(tmp_path / "b")

    stopped = start_and_wait(tmp_path / "c")
    stopped.send_signal(signal.SIGTERM)
    _, stderr = stopped.communicate(timeout=120)
    assert stopped.returncode == 143 and "SIGTERM" in stderr and "rerun the same command" in stderr, stderr
    ckpt = torch.load(next((tmp_path / "c").glob("*/*/*/*/last.pt")), weights_only=False)["state"]
    assert 1 <= ckpt["loop"]["epoch"] < 8 and not list((tmp_path / "c").glob("*/*/*/*/" + RESULT))
    resumed = subprocess.run(cmd(tmp_path / "c"), env=env, capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0 and f"after epoch {ckpt['loop']['epoch']} of 8" in resumed.stderr, resumed.stderr
    assert _final(tmp_path / "a") == _final(tmp_path / "c")


def test_checkpoint_cadence_every_epoch_or_at_the_end(aptos_root, tmp_path, monkeypatch):
    """checkpoint_every 0 writes last.pt after every epoch (as before); a long interval only after the last one;
    neither changes the run's settings hash (a resume across the two is allowed)."""
    import fmcache.finetune.loop as loop
    from fmcache.dist import Dist

    writes: list[int] = []
    real = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda path, state, doc: (writes.append(state["loop"]["epoch"]),
                                                                           real(path, state, doc)))  # fmt: skip
    spec = _spec(aptos_root, tmp_path / "runs", freeze="1", epochs=3, limit=8)
    data = online_data(spec)
    hashes = []
    for every, want in ((0.0, [1, 2, 3]), (1e6, [3])):
        writes.clear()
        model, _ = build_model(spec, TINY_SIZE, len(data.class_names), 0)
        settings = RunSettings(lr=1e-3, seed=0, epochs=3, batch_size=4, accum=1, clip=1.0, amp="off",
                               schedule="constant", warmup={"warmup_iters": 0}, weight_decay=1e-5, layer_decay=1.0,
                               metric=data.metric, multilabel=False, export=False, checkpoint_every=every)  # fmt: skip
        trainer = Trainer(model, data.splits, settings, tmp_path / f"run{every}", Dist(0, 1, torch.device("cpu")),
                          log=lambda m: None)  # fmt: skip
        with one_thread():
            trainer.run()
        assert writes == want
        hashes.append(trainer.settings_hash)
    assert hashes[0] == hashes[1]


@pytest.mark.slow
def test_ddp_two_processes_gloo(aptos_root, tmp_path):
    cfg = _config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517", "-m",
           "fmcache", *_cli(aptos_root, tmp_path / "runs", cfg, "--freeze", "1", "--epochs", "1")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(next((tmp_path / "runs").glob("*/*/*/finetune_linear-*/result.json")).read_text())
    assert doc["settings"]["world_size"] == 2 and doc["settings"]["effective_batch_size"] == 16
    assert len(list((tmp_path / "runs").glob("*/*/*/*/foundation.safetensors"))) == 1
    assert done.stdout.count("fine-tuning") == 1  # only rank 0 reports


def test_from_cache_trains_later_blocks_and_refuses_other_weights(aptos_root, tmp_path, tiny_weights):
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import spec_kwargs

    cache = run_extract(ExtractSpec(**spec_kwargs(aptos_root, tmp_path / "cache", tokens="1")), progress=False,
                        log=lambda m: None)  # fmt: skip
    spec = _spec(None, tmp_path / "runs", dataset=None, from_cache=cache, freeze="1", epochs=1)
    result = run_finetune(spec, progress=False, log=lambda m: None)
    assert "no augmentation" in result["notes"][0]
    export = load_file(next(Path(result["runs_folder"]).glob("lr*/foundation.safetensors")))
    start = build_foundation(spec, TINY_SIZE).adapter.model.state_dict()
    assert torch.equal(export["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    assert not torch.equal(export["blocks.1.attn.qkv.weight"], start["blocks.1.attn.qkv.weight"])
    cfg = _config(tmp_path)
    bad = runner.invoke(app, ["finetune", "--from-cache", str(cache), "--model", TINY_MODEL, "--weights",
                              str(tiny_weights), "--freeze", "1", "--config", str(cfg), "--out", str(tmp_path / "o")])  # fmt: skip
    assert bad.exit_code == 2 and "other weights" in bad.output
    missing = runner.invoke(app, ["finetune", "--from-cache", str(cache), "--model", TINY_MODEL, "--random-init",
                                  "--freeze", "2", "--config", str(cfg), "--out", str(tmp_path / "o")])  # fmt: skip
    assert missing.exit_code == 2 and "tokens for layers" in missing.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--freeze", "3"], "outside 0..2"),
        (["--drop-after", "3"], "outside 1..2"),
        (["--freeze", "1", "--amp", "fp16"], "needs a GPU"),
        (["--head", "linear", "--head-random-init"], "apply to --head deit"),
        (["--lrs", "abc"], "bad --lrs"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(aptos_root, tmp_path, extra, needle):
    out = tmp_path / "runs"
    result = runner.invoke(app, _cli(aptos_root, out, _config(tmp_path), *extra))
    assert result.exit_code == 2, result.output
    assert needle in result.output and result.output.strip().count("\n") == 0
    assert not out.exists()


def test_stage_models_refuse_block_freezing(aptos_root, tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("img_size: 64\n")
    args = ["finetune", "--dataset", "aptos2019", "--data-root", str(aptos_root), "--model", "resnet50",
            "--random-init", "--freeze", "2", "--config", str(cfg), "--out", str(tmp_path / "runs")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "stages" in result.output
    unwritable = runner.invoke(app, _cli(aptos_root, Path("/proc/fmcache-nope"), _config(tmp_path), "--freeze", "1"))
    assert unwritable.exit_code == 2 and "cannot write" in unwritable.output


def test_deit_head_on_decapitated_tokens(aptos_root, tmp_path):
    spec = _spec(aptos_root, tmp_path / "runs", head="deit", head_random_init=True, head_depth=1, freeze="all",
                 drop_after=1, epochs=1, limit=8)  # fmt: skip
    model, info = build_model(spec, TINY_SIZE, 5, 0)
    assert info["weights"] == "random" and model.used_blocks == 1
    assert not any(p.requires_grad for p in model.foundation.parameters())
    result = run_finetune(spec, progress=False, log=lambda m: None)
    assert result["rows"][0]["layer"] == 1 and result["rows"][0]["head"] == "deit"
    assert not list(
        Path(result["runs_folder"]).glob("lr*/foundation.safetensors")
    )  # a frozen foundation is not exported


# -- the seed's training modes (PROTOCOLS.md, "Details that change numbers") -----------------------------------------


def _one_epoch(spec: FinetuneSpec, size: int, folder: Path):
    """One real training epoch of ``spec``'s model through the Trainer; returns the trained model."""
    from fmcache.dist import Dist

    data = online_data(spec)
    model, _ = build_model(spec, size, len(data.class_names), 0)
    settings = RunSettings(lr=1e-3, seed=0, epochs=1, batch_size=8, accum=1, clip=1.0, amp="off", schedule="constant",
                           warmup={"warmup_iters": 0}, weight_decay=1e-5, layer_decay=1.0, metric=data.metric,
                           multilabel=False, export=False)  # fmt: skip
    with one_thread():
        Trainer(model, data.splits, settings, folder, Dist(0, 1, torch.device("cpu")), log=lambda m: None).run()
    return model


def _bn_stats(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.foundation.root.state_dict().items() if k.endswith("running_mean")}


def test_unfrozen_resnet_epoch_updates_batchnorm_statistics_frozen_does_not(aptos_root, tmp_path):
    size, overrides, *_ = TINY["resnet50"]
    changed = {}
    for freeze in ("none", "all"):
        spec = _spec(aptos_root, tmp_path / freeze, model="resnet50", img_size=size, arch_overrides=overrides,
                     freeze=freeze, limit=8)  # fmt: skip
        start = _bn_stats(build_model(spec, size, 5, 0)[0])
        after = _bn_stats(_one_epoch(spec, size, tmp_path / freeze / "run"))
        changed[freeze] = sum(not torch.equal(start[k], after[k]) for k in start)
    assert changed["none"] == len(start) > 0  # train mode: every BatchNorm's running statistics moved
    assert changed["all"] == 0  # eval mode: untouched


def test_modes_follow_what_trains(aptos_root, tmp_path):
    model, _ = build_model(_spec(aptos_root, tmp_path, freeze="1"), TINY_SIZE, 5, 0)
    model.train()
    assert model.head.training and not model.stages.blocks[0].training and model.stages.blocks[1].training
    assert not model.foundation.adapter.model.patch_embed.training  # frozen embedding: eval mode
    model.eval()
    assert not model.stages.blocks[1].training and not model.head.training
    full, _ = build_model(_spec(aptos_root, tmp_path, freeze="none"), TINY_SIZE, 5, 0)
    full.train()
    assert all(m.training for m in full.foundation.modules())


def test_freeze_zero_is_the_seeds_cutoff_zero(aptos_root, tmp_path):
    """--freeze 0 trains every block but keeps patch/position embedding, CLS and the final norm frozen."""
    zero, _ = build_model(_spec(aptos_root, tmp_path, freeze="0"), TINY_SIZE, 5, 0)
    none, _ = build_model(_spec(aptos_root, tmp_path, freeze="none"), TINY_SIZE, 5, 0)
    trainable = lambda m: {n for n, p in m.foundation.named_parameters() if p.requires_grad}  # noqa: E731
    frozen_in_zero = trainable(none) - trainable(zero)
    assert trainable(zero) < trainable(none)
    assert {n.split("model.", 1)[1].split(".")[0] for n in frozen_in_zero} >= {"cls_token", "pos_embed", "patch_embed"}
    assert any(n.endswith("model.norm.weight") for n in frozen_in_zero)
    assert all(".blocks." in n for n in trainable(zero))
    zero.train()
    assert all(b.training for b in zero.stages.blocks) and not zero.foundation.adapter.model.norm.training


def test_focalnet_has_seems_stochastic_depth_in_train_mode_only():
    from fmcache.models.seem_focal import SeemFocalNet

    torch.manual_seed(0)
    net = SeemFocalNet(embed_dim=16, depths=(2, 2, 6, 2))
    rates = [b.drop_path.drop_prob for stage in net.layers for b in stage.blocks if hasattr(b.drop_path, "drop_prob")]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 12).tolist()[1:])  # the first block's rate is 0
    x = torch.randn(2, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net.forward_stages(x)[-1], net.forward_stages(x)[-1])
        net.train()
        assert not torch.equal(net.forward_stages(x)[-1], net.forward_stages(x)[-1])


def test_seem_stages_are_the_seeds_blocks_for_freezing_and_decapitation():
    """The seed takes SEEM's four FocalNet stages as its "blocks" (backbone.layers): --freeze K freezes stages 1..K
    (their downsampling included), --drop-after I reads stage I's normed map (res{I+1})."""
    from fmcache.finetune.model import FineTuneModel
    from fmcache.models import create_foundation

    size, overrides, *_ = TINY["focal"]
    torch.manual_seed(0)
    foundation = create_foundation("focal", random_init=True, img_size=size, arch_overrides=overrides)
    stages = foundation.block_layout()
    x = torch.randn(2, 3, size, size)
    foundation.eval()
    with torch.no_grad():
        out = foundation(x)
        h = stages.embed(x)
        for i in range(stages.depth):
            h = stages.run_block(i, h)
            assert torch.equal(stages.to_tokens(h), out.tokens[i])
        assert torch.allclose(stages.pooled(h, last=True), out.pooled, atol=1e-6)
    model = FineTuneModel(foundation, torch.nn.Linear(foundation.adapter.model.num_features[-1], 3), "pooled", 2, None)
    model.train()
    model(x).sum().backward()
    grads = {n.split(".")[1]: p.grad is not None for n, p in foundation.adapter.model.named_parameters()
             if n.startswith("layers.")}  # fmt: skip
    assert grads == {"0": False, "1": False, "2": True, "3": True}
    assert all(p.grad is None for n, p in foundation.adapter.model.named_parameters() if n.startswith("norm"))
    torch.manual_seed(0)
    again = create_foundation("focal", random_init=True, img_size=size, arch_overrides=overrides)
    decapitated = FineTuneModel(again, torch.nn.Identity(), "tokens", "all", 2).eval()
    with torch.no_grad():
        assert torch.equal(decapitated.features(x), out.tokens[1])  # res3: the second stage's map
    with pytest.raises(FmcacheError, match="without --from-cache"):
        stages.from_tokens(out.tokens[0])
