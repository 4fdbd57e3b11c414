"""The paper's linear-probe grid (LRs × seeds) trained in one pass over cached features.

All H = len(lrs) × len(seeds) heads are one batched linear layer, weight (H, C, D) (nn.Linear's layout,
stacked) and bias (H, C), and every step computes all heads' logits with one batched matmul (the einsum
``hbd,hcd->hbc``). Each head is exactly what this would train on its own (``tests/test_probe.py`` checks
it):

- init: ``nn.Linear(D, C)`` created right after ``torch.manual_seed(seed)``;
- data order: a ``torch.Generator`` seeded with ``seed`` draws ``randperm(N)`` each epoch; batches of
  ``batch_size`` in that order, the last partial batch dropped as the seed's train loader drops it
  (``drop_last=False`` keeps it);
- loss: cross-entropy averaged over the batch, or for multi-label BCE-with-logits averaged over the
  batch's known (non-NaN) labels;
- ``torch.optim.AdamW`` (betas 0.9/0.999, eps 1e-8) over :func:`fmcache.training.adamw_param_groups`
  (decoupled weight decay on the weight, none on the bias, as the seed) after
  ``clip_grad_norm_(head.parameters(), grad_clip)``;
- lr = base lr × :func:`fmcache.training.lr_multiplier` (linear warmup, then cosine to 0 or constant), stepped per batch.

Heads that share a seed share init and data order, so within a seed the LR is the only difference.
Training runs in float32 without mixed precision: a linear head on cached features is cheap, and fp32
keeps CPU and GPU results comparable.

After every epoch all heads are evaluated on val; each head keeps the epoch with the best val paper
metric (the first such epoch on ties) and its test metric at that epoch. The best LR has the highest val
metric averaged over seeds (the first in ``lrs`` on ties); the headline is test mean ± std over seeds at
that LR. Standard deviations are sample std (ddof=1; 0 for one seed).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fmcache import metrics
from fmcache.choices import BEST_EPOCH_RULES
from fmcache.dist import pick_device, synchronize
from fmcache.errors import FmcacheError
from fmcache.headgrid import STD_DDOF, ProbeResult, check_lists, head_losses, labels_tensor, summarise
from fmcache.training import (
    ADAM_BETAS,
    ADAM_EPS,
    HeadRecords,
    batch_starts,
    clip_per_head,
    decays,
    lr_multiplier,
    warmup_steps_for,
)

# Rows per chunk when computing eval logits for all heads at once: bounds the (H, rows, C) block.
_EVAL_CHUNK = 16384


def init_linear(seed: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) of ``nn.Linear(D, C)`` created under ``torch.manual_seed(seed)``.

    The global RNG state is restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(in_features, out_features)
    return layer.weight.detach().clone(), layer.bias.detach().clone()


def _features_tensor(x: np.ndarray, split: str, dim: int | None = None) -> torch.Tensor:
    x = np.asarray(x)
    if x.ndim != 2 or len(x) == 0:
        raise FmcacheError(f"{split}: features must be a non-empty (N, D) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise FmcacheError(f"{split}: feature size {x.shape[1]} differs from train's {dim}")
    return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))


class _BatchedAdamW:
    """torch.optim.AdamW's update for stacked per-head parameters, with one LR per head.

    ``params`` maps a name to a stacked parameter (heads on dim 0); each gets weight decay by the shared rule
    (:func:`fmcache.training.decays` on one head's slice), so the bias gets none, as in the seed's AdamW groups.
    """

    def __init__(self, params: dict[str, torch.Tensor], weight_decay: float):
        self.params = list(params.values())
        self.weight_decays = [weight_decay if decays(n, p.shape[1:]) else 0.0 for n, p in params.items()]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.step_count = 0

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        beta1, beta2 = ADAM_BETAS
        self.step_count += 1
        bias1 = 1 - beta1**self.step_count
        bias2_sqrt = math.sqrt(1 - beta2**self.step_count)
        for p, m, v, decay in zip(self.params, self.exp_avg, self.exp_avg_sq, self.weight_decays, strict=True):
            head_lr = lr.view(-1, *([1] * (p.dim() - 1)))
            p.mul_(1 - head_lr * decay)
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / bias2_sqrt).add_(ADAM_EPS)
            p.sub_(m / denom * (head_lr / bias1))


def batched_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits (H, B, C) of heads ``weight`` (H, C, D), ``bias`` (H, C) on their own batches ``x`` (H, B, D).

    This is ``einsum("hbd,hcd->hbc")``, written as W @ xᵀ so both this product and its weight gradient
    have a long inner dimension (B or D, not C): about 6× faster on CPU BLAS than the (H, D, C) layout.
    """
    return torch.bmm(weight, x.transpose(1, 2)).transpose(1, 2) + bias[:, None, :]


def eval_probs(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, multilabel: bool) -> np.ndarray:
    """(H, N, C) class probabilities (softmax, or sigmoid for multi-label) of every head on ``x``."""
    h, c, d = w.shape
    parts = []
    with torch.no_grad():
        for start in range(0, len(x), _EVAL_CHUNK):
            # All heads at once as one (H*C, D) @ (D, n) product.
            chunk = x[start : start + _EVAL_CHUNK]
            logits = (w.reshape(h * c, d) @ chunk.T).reshape(h, c, -1).transpose(1, 2) + b[:, None, :]
            probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)
            parts.append(probs.cpu())
    return torch.cat(parts, dim=1).double().numpy()


@dataclass
class _Split:
    x: torch.Tensor
    y: np.ndarray


def _prepare(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    multilabel: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, _Split, _Split]:
    tx = _features_tensor(train[0], "train")
    ty = labels_tensor(train[1], len(tx), num_classes, multilabel, "train")
    splits = []
    for name, (x, y) in (("val", val), ("test", test)):
        xt = _features_tensor(x, name, tx.shape[1])
        labels_tensor(y, len(xt), num_classes, multilabel, name)
        splits.append(_Split(xt.to(device), np.asarray(y)))
    return tx.to(device), ty.to(device), splits[0], splits[1]


def train_linear_grid(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    lrs: Sequence[float],
    seeds: Sequence[int] | int,
    num_classes: int,
    metric: str,
    multilabel: bool = False,
    epochs: int = 100,
    batch_size: int = 64,
    weight_decay: float = 1e-5,
    warmup_epochs: float | None = None,
    warmup_iters: int | None = None,
    grad_clip: float | None = 1.0,
    schedule: str = "constant",
    label_names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    on_epoch: Callable[[int], None] | None = None,
    train_views: np.ndarray | None = None,
    drop_last: bool = True,
    best_epoch: str = "seed",
) -> ProbeResult:
    """Train the linear-probe grid (every LR × every seed) in one pass; see the module doc.

    Features are (N, D) arrays (any float dtype; used as float32 on ``device``, default CUDA if
    available else CPU). Labels are (N,) class indices, or (N, C) 0/1 with NaN = unknown when
    ``multilabel``. ``on_epoch(epochs_done)`` is called after each epoch (progress display). ``seeds`` is a list or a count n (seeds 0..n-1). ``metric`` is the paper metric used
    for model selection (``metrics.METRICS``). ``grad_clip`` None or 0 disables clipping.
    ``train_views`` (N, K, D): cached augmented views of the train rows; each epoch every head trains on one view
    per sample (:func:`fmcache.frozen.views.epoch_views`) instead of ``train_x``. None trains on ``train_x``.
    """
    metrics.check_metric(metric)
    lrs, seeds = check_lists(lrs, seeds)
    if epochs < 1 or batch_size < 1:
        raise FmcacheError(f"epochs and batch size must be >= 1, got {epochs} and {batch_size}")
    lr_multiplier(0, 1, 0, schedule)  # rejects an unknown schedule before any work
    dev = pick_device(device)
    x, y, val, test = _prepare((train_x, train_y), (val_x, val_y), (test_x, test_y), num_classes, multilabel, dev)
    views = None
    if train_views is not None:
        views = torch.as_tensor(np.ascontiguousarray(train_views, dtype=np.float32))
        if views.ndim != 3 or views.shape[0] != len(x) or views.shape[2] != x.shape[1] or views.shape[1] < 1:
            raise FmcacheError(f"train views must be ({len(x)}, K, {x.shape[1]}), got {tuple(views.shape)}")
        views = views.to(dev)
    steps_per_epoch = len(batch_starts(len(x), batch_size, drop_last))
    total_steps = steps_per_epoch * epochs
    warmup = warmup_steps_for(warmup_epochs, warmup_iters, steps_per_epoch, total_steps)
    settings = {
        "epochs": epochs,
        "batch_size": batch_size,
        "drop_last": drop_last,
        "weight_decay": weight_decay,
        "warmup_steps": warmup,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "schedule": schedule,
        "grad_clip": grad_clip,
        "optimizer": f"AdamW(betas={ADAM_BETAS}, eps={ADAM_EPS})",
        "std_ddof": STD_DDOF,
        "device": str(dev),
        "n_train": len(x),
        "n_val": len(val.x),
        "n_test": len(test.x),
        "views": 0 if views is None else int(views.shape[1]),
    }
    run = LinearHeadGrid(x, y, lrs, seeds, num_classes, multilabel, weight_decay, grad_clip, dev, views=views)
    evaluator = _Evaluator(val, test, metric, multilabel, label_names, len(lrs) * len(seeds), epochs)
    evaluator.decimals = BEST_EPOCH_RULES[best_epoch]
    for epoch in range(epochs):
        run.train_epoch(batch_size, lambda step: lr_multiplier(step, total_steps, warmup, schedule), drop_last)
        evaluator.evaluate_epoch(epoch, run.weight.detach(), run.bias.detach())
        if on_epoch is not None:
            on_epoch(epoch + 1)
    result = summarise(metric, lrs, seeds, evaluator, settings, run.train_seconds)
    # the heads transfer applies: every seed of the best LR, each at its own best val epoch (heads are LR-major)
    best = slice(lrs.index(result.best_lr) * len(seeds), (lrs.index(result.best_lr) + 1) * len(seeds))
    heads = {"weight": evaluator.best_weight[best].cpu(), "bias": evaluator.best_bias[best].cpu()}
    return dataclasses.replace(result, heads=heads)


class LinearHeadGrid:
    """The batched heads (``weight`` (H, C, D), ``bias`` (H, C)), their AdamW state and data order.

    ``x`` (N, D) float32 and ``y`` are tensors on ``device``. Heads are LR-major: head
    ``i * len(seeds) + j`` has ``lrs[i]`` and ``seeds[j]``. Each :meth:`train_epoch` call is one epoch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        lrs: Sequence[float],
        seeds: Sequence[int],
        num_classes: int,
        multilabel: bool,
        weight_decay: float,
        grad_clip: float | None,
        device: torch.device,
        views: torch.Tensor | None = None,
    ):
        self.x, self.y, self.multilabel, self.grad_clip, self.device = x, y, multilabel, grad_clip, device
        self.views, self.seeds, self.epoch = views, list(seeds), 0  # views (N, K, D): one per sample per epoch
        n_seeds = len(seeds)
        # Heads are LR-major: head = lr_index * n_seeds + seed_index.
        self.head_seed = torch.arange(n_seeds).repeat(len(lrs)).to(device)
        self.base_lr = torch.tensor(lrs, dtype=torch.float32).repeat_interleave(n_seeds).to(device)
        inits = [init_linear(s, x.shape[1], num_classes) for s in seeds]
        self.weight = torch.stack([w for w, _ in inits])[self.head_seed.cpu()].to(device).requires_grad_()
        self.bias = torch.stack([b for _, b in inits])[self.head_seed.cpu()].to(device).requires_grad_()
        self.optimizer = _BatchedAdamW({"weight": self.weight, "bias": self.bias}, weight_decay)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.step = 0
        self.train_seconds = 0.0

    def train_epoch(self, batch_size: int, multiplier: Callable[[int], float], drop_last: bool = True) -> None:
        """One pass over the data; ``multiplier(step)`` scales the base LRs at global step ``step``."""
        synchronize(self.device)
        start = time.perf_counter()
        n = len(self.x)
        order = torch.stack([torch.randperm(n, generator=g) for g in self.generators]).to(self.device)
        head_order = order[self.head_seed]  # (H, N): each head's data order, by its seed
        if self.views is not None:
            from fmcache.frozen.views import epoch_views  # deferred: h5py

            k = self.views.shape[1]
            # its own generator per (seed, epoch), so the data order is the same as without views
            chosen = torch.stack([epoch_views(s, self.epoch, n, k) for s in self.seeds]).to(self.device)
            head_view = chosen[self.head_seed]  # (H, N): the view of each sample, by the head's seed
        for begin in batch_starts(n, batch_size, drop_last):
            idx = head_order[:, begin : begin + batch_size]
            xb = self.x[idx] if self.views is None else self.views[idx, head_view.gather(1, idx)]
            self._train_step(xb, self.y[idx], multiplier(self.step))
            self.step += 1
        self.epoch += 1
        synchronize(self.device)
        self.train_seconds += time.perf_counter() - start

    def _train_step(self, xb: torch.Tensor, yb: torch.Tensor, multiplier: float) -> None:
        logits = batched_logits(xb, self.weight, self.bias)
        # Summing per-head mean losses keeps every head's gradient its own.
        head_losses(logits, yb, self.multilabel).sum().backward()
        if self.grad_clip:
            clip_per_head([self.weight.grad, self.bias.grad], self.grad_clip)
        self.optimizer.step(self.base_lr * multiplier)
        self.weight.grad = None
        self.bias.grad = None


class _Evaluator(HeadRecords):
    """Per-epoch val metric of every head; test metric, and the head's weight and bias, at each head's best val
    epoch so far (one (H, C, D) copy: what ``heads.safetensors`` saves for ``fmcache transfer``)."""

    def __init__(self, val: _Split, test: _Split, metric, multilabel, label_names, n_heads, epochs):
        super().__init__(n_heads, epochs)
        self.val, self.test = val, test
        self.metric, self.multilabel, self.label_names = metric, multilabel, label_names
        self.best_weight: torch.Tensor | None = None
        self.best_bias: torch.Tensor | None = None

    def _probs(self, split: _Split, w: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        probs = eval_probs(split.x, w, b, self.multilabel)
        self.forward_seconds += time.perf_counter() - start
        self.forward_samples += len(split.x) * len(w)
        return probs

    def _evaluate(self, y: np.ndarray, probs: np.ndarray) -> dict:
        return metrics.evaluate(self.metric, y, probs, self.multilabel, self.label_names)

    def evaluate_epoch(self, epoch: int, w: torch.Tensor, b: torch.Tensor) -> None:
        val_probs = self._probs(self.val, w, b)
        values = np.array([self._evaluate(self.val.y, p)["value"] for p in val_probs])
        improved = self.observe(epoch, values)
        if not improved:
            return
        # Test is only scored for heads whose val improved: that is the only test number reported.
        rows = torch.as_tensor(improved, device=w.device)
        if self.best_weight is None:
            self.best_weight, self.best_bias = torch.empty_like(w), torch.empty_like(b)
        self.best_weight[rows], self.best_bias[rows] = w[rows], b[rows]
        test_probs = self._probs(self.test, w[rows], b[rows])
        for head, probs in zip(improved, test_probs, strict=True):
            self.test_metrics[head] = self._evaluate(self.test.y, probs)
            self.best_test_probs[head] = probs.astype(np.float32)
            self.best_val_probs[head] = val_probs[head].astype(np.float32)
