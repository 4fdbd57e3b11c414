"""Round 3 of "numbers you can publish": the recipe details that change published cells follow the seed by default.

Each test fails on the recipe fmcache had before: the linear probe z-scored its input, the warmup plateaued at the
base LR, and the best epoch was chosen on unrounded val values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fmcache.frozen.specs import ProbeSpec
from fmcache.headgrid import summarise
from fmcache.training import HeadRecords, lr_multiplier

REPO = Path(__file__).resolve().parents[1]


def test_the_linear_probe_trains_on_the_raw_feature_by_default():
    """The seed's linear layer reads the raw feature; z-scoring is fmcache's option, and paper.yaml keeps the seed's."""
    assert ProbeSpec(cache=Path("c")).standardize is False
    assert ProbeSpec(cache=Path("c"), standardize=True).standardize is True
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    variants = paper["protocols"]["probe_linear"]
    assert all(not v.get("standardize", False) for v in variants)


class _SeedLinearWarmup(torch.optim.lr_scheduler.LRScheduler):
    """The seed's ``LinearWarmup`` (utils/_utils.py of joanaapa/Foundation-Medical), rewritten from its arithmetic:
    every group starts at ``eta_min``; each call of ``step()`` (the constructor's included) adds
    ``(max_lr - eta_min) / W`` while ``last_epoch <= W``, then keeps the LR."""

    def __init__(self, optimizer, max_lr: float, warmup_iters: int, eta_min: float = 1e-8):
        self.max_lr, self.warmup_iters, self.eta_min = max_lr, warmup_iters, eta_min
        for group in optimizer.param_groups:
            group["lr"] = eta_min
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch > self.warmup_iters:
            return [g["lr"] for g in self.optimizer.param_groups]
        return [g["lr"] + (self.max_lr - self.eta_min) / self.warmup_iters for g in self.optimizer.param_groups]


@pytest.mark.parametrize("warmup", [1, 5, 200])
def test_the_warmup_follows_the_seeds_scheduler_to_its_plateau_above_the_lr(warmup):
    """The seed steps its scheduler once in the constructor, so it reaches lr · (1 + 1/W) and stays there."""
    lr = 1e-4
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    seed = _SeedLinearWarmup(opt, lr, warmup)
    used = []
    for _ in range(3 * warmup + 5):
        used.append(opt.param_groups[0]["lr"])  # what the optimiser step runs at
        opt.step()
        seed.step()
    ours = [lr * lr_multiplier(s, 10**6, warmup, "constant") for s in range(len(used))]
    # the seed's ramp starts at 1e-8 rather than 0 (documented, not followed): each LR differs by at most 1e-8
    assert np.allclose(used, ours, rtol=0, atol=1.01e-8)
    assert used[-1] == pytest.approx(lr * (1 + 1 / warmup), abs=1e-8)


def test_the_best_epoch_compares_three_decimals_and_keeps_the_earlier_on_a_tie():
    curve = [0.8101, 0.8104, 0.8099, 0.8096]  # 0.810 at epochs 0, 1 and 2: the seed keeps epoch 0
    seed, exact = HeadRecords(1, 4), HeadRecords(1, 4, decimals=None)
    for epoch, value in enumerate(curve):
        seed.observe(epoch, [value])
        exact.observe(epoch, [value])
        for records in (seed, exact):
            records.test_metrics[0] = records.test_metrics[0] or {"value": 0.5}
    assert seed.best_epoch[0] == 0 and exact.best_epoch[0] == 1
    for records, epoch in ((seed, 1), (exact, 2)):
        result = summarise("accuracy", [1e-3], [0], records, {}, 0.0)
        assert result.per_lr[1e-3]["best_epochs"] == [epoch]


def test_extraction_precision_is_a_choice_in_the_key_and_fp16_needs_a_gpu(aptos_root, tmp_path):
    """The seed extracts under fp16 autocast: --precision names the forward's precision; auto keeps every old key."""
    from fmcache.dist import autocast_for
    from fmcache.errors import FmcacheError
    from fmcache.extract.plan import plan
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import quiet, spec_kwargs

    keys = {p: plan(ExtractSpec(**spec_kwargs(aptos_root, tmp_path, precision=p)), log=quiet).key
            for p in ("auto", "fp16", "bf16", "fp32")}  # fmt: skip
    assert len(set(keys.values())) == 4
    assert "precision" not in plan(ExtractSpec(**spec_kwargs(aptos_root, tmp_path)), log=quiet).inputs
    with pytest.raises(FmcacheError, match="fp16 needs a GPU"):
        autocast_for("fp16", torch.device("cpu"))
    with pytest.raises(FmcacheError, match="unknown --precision"):
        ExtractSpec(**spec_kwargs(aptos_root, tmp_path, precision="fp8"))
    with autocast_for("bf16", torch.device("cpu")):
        assert torch.ones(2, 2) @ torch.ones(2, 2) is not None


def test_fine_tuning_evaluates_in_its_own_precision():
    from fmcache.finetune.spec import FinetuneSpec

    spec = FinetuneSpec(dataset="aptos2019", data_root=Path("r"), model="resnet50", eval_precision="fp32")
    assert spec.eval_precision == "fp32" and FinetuneSpec.default("eval_precision") == "auto"
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    assert paper["extract"]["precision"] == "fp16"  # the seed's, for the paper's grid
