"""The paper's linear-probe grid (LRs × seeds) trained in one pass over cached features.

All H = len(lrs) × len(seeds) heads are one batched linear layer, weight (H, C, D) (nn.Linear's layout,
stacked) and bias (H, C), and every step computes all heads' logits with one batched matmul (the einsum
``hbd,hcd->hbc``). Each head is exactly what this would train on its own (``tests/test_probe.py`` checks
it):

- init: ``nn.Linear(D, C)`` created right after ``torch.manual_seed(seed)``;
- data order: a ``torch.Generator`` seeded with ``seed`` draws ``randperm(N)`` each epoch; batches of
  ``batch_size`` in that order, the last partial batch kept;
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

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmcache import metrics
from fmcache.errors import FmcacheError
from fmcache.training import (
    ADAM_BETAS,
    ADAM_EPS,
    HeadRecords,
    clip_per_head,
    decays,
    lr_multiplier,
    pick_device,
    select_best,
    warmup_steps_for,
)

STD_DDOF = 1
# Rows per chunk when computing eval logits for all heads at once: bounds the (H, rows, C) block.
_EVAL_CHUNK = 16384


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`train_linear_grid`.

    ``per_lr[lr]`` holds ``val_mean``, ``val_std``, ``test_mean``, ``test_std``, ``val_per_seed``,
    ``test_per_seed`` (paper metric at each seed's best epoch), ``best_epochs`` (1-based, per seed) and
    ``test_metrics`` (full ``metrics.evaluate`` dict per seed). ``curves[lr]`` is the (seeds, epochs) val
    metric after each epoch. ``settings`` records the training settings used, including step counts and
    device. ``train_seconds`` is the whole grid's training time (evaluation excluded);
    ``inference_seconds_per_sample`` is eval forward time per sample per head.
    """

    metric: str
    lrs: list[float]
    seeds: list[int]
    per_lr: dict[float, dict]
    best_lr: float
    val_mean: float
    val_std: float
    test_mean: float
    test_std: float
    curves: dict[float, np.ndarray]
    settings: dict
    train_seconds: float
    inference_seconds_per_sample: float
    # the best LR's heads at their selected epochs: {"seeds": (S,), "val_scores": (S, n_val, C), "test_scores": ...}
    # float32 probabilities; kept out of to_dict (it goes to predictions.npz, not the JSON)
    predictions: dict[str, np.ndarray] | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict (curves as nested lists, LR keys as given)."""
        return {
            "metric": self.metric,
            "lrs": list(self.lrs),
            "seeds": list(self.seeds),
            "best_lr": self.best_lr,
            "val_mean": self.val_mean,
            "val_std": self.val_std,
            "test_mean": self.test_mean,
            "test_std": self.test_std,
            "per_lr": self.per_lr,
            "curves": {lr: c.tolist() for lr, c in self.curves.items()},
            "settings": self.settings,
            "timings": {
                "train_seconds": self.train_seconds,
                "inference_seconds_per_sample": self.inference_seconds_per_sample,
            },
        }

    def rows(self) -> list[dict]:
        """CSV rows: one per (lr, seed) with best epoch, val and test paper metric and test accuracy."""
        rows = []
        for lr in self.lrs:
            r = self.per_lr[lr]
            for i, seed in enumerate(self.seeds):
                rows.append(
                    {
                        "lr": lr,
                        "seed": seed,
                        "best_epoch": r["best_epochs"][i],
                        "metric": self.metric,
                        "val": r["val_per_seed"][i],
                        "test": r["test_per_seed"][i],
                        "test_accuracy": r["test_metrics"][i]["accuracy"],
                        "is_best_lr": lr == self.best_lr,
                    }
                )
                if "macro_recall_seed" in r["test_metrics"][i]:  # the seed's variant, beside ours
                    rows[-1]["test_macro_recall_seed"] = r["test_metrics"][i]["macro_recall_seed"]
        return rows


def init_linear(seed: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) of ``nn.Linear(D, C)`` created under ``torch.manual_seed(seed)``.

    The global RNG state is restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(in_features, out_features)
    return layer.weight.detach().clone(), layer.bias.detach().clone()


def _check_lists(lrs: Sequence[float], seeds: Sequence[int] | int) -> tuple[list[float], list[int]]:
    lrs = [float(lr) for lr in lrs]
    seeds = list(range(int(seeds))) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not lrs or any(not lr > 0 for lr in lrs):
        raise FmcacheError(f"learning rates must be a non-empty list of positive numbers, got {lrs}")
    if not seeds:
        raise FmcacheError("give at least one seed (or a positive number of seeds)")
    if len(set(lrs)) != len(lrs) or len(set(seeds)) != len(seeds):
        raise FmcacheError(f"learning rates and seeds must not repeat, got lrs={lrs} seeds={seeds}")
    return lrs, seeds


def _labels_tensor(y: np.ndarray, n: int, num_classes: int, multilabel: bool, split: str) -> torch.Tensor:
    y = np.asarray(y)
    if len(y) != n:
        raise FmcacheError(f"{split}: {n} features but {len(y)} labels")
    if multilabel:
        if y.ndim != 2 or y.shape[1] != num_classes:
            raise FmcacheError(f"{split}: multi-label labels must be (N, {num_classes}), got {y.shape}")
        return torch.as_tensor(y, dtype=torch.float32)
    if y.ndim != 1 or (y.dtype.kind == "f" and np.any(y != np.round(y))):
        raise FmcacheError(f"{split}: single-label labels must be (N,) class indices, got shape {y.shape}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise FmcacheError(f"{split}: labels must lie in 0..{num_classes - 1} (num_classes={num_classes})")
    return torch.as_tensor(y.astype(np.int64))


def _features_tensor(x: np.ndarray, split: str, dim: int | None = None) -> torch.Tensor:
    x = np.asarray(x)
    if x.ndim != 2 or len(x) == 0:
        raise FmcacheError(f"{split}: features must be a non-empty (N, D) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise FmcacheError(f"{split}: feature size {x.shape[1]} differs from train's {dim}")
    return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))


def head_losses(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Per-head mean loss (H,) for logits (H, B, C) and labels (H, B) or (H, B, C) with NaN = unknown."""
    if not multilabel:
        h, b, c = logits.shape
        ce = F.cross_entropy(logits.reshape(h * b, c), y.reshape(h * b), reduction="none")
        return ce.reshape(h, b).mean(1)
    known = ~torch.isnan(y)
    target = torch.where(known, y, torch.zeros_like(y))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * known
    return bce.sum((1, 2)) / known.sum((1, 2)).clamp(min=1)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batched_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits (H, B, C) of heads ``weight`` (H, C, D), ``bias`` (H, C) on their own batches ``x`` (H, B, D).

    This is ``einsum("hbd,hcd->hbc")``, written as W @ xᵀ so both this product and its weight gradient
    have a long inner dimension (B or D, not C): about 6× faster on CPU BLAS than the (H, D, C) layout.
    """
    return torch.bmm(weight, x.transpose(1, 2)).transpose(1, 2) + bias[:, None, :]


def _eval_probs(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, multilabel: bool) -> np.ndarray:
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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=STD_DDOF)) if len(arr) > STD_DDOF else 0.0
    return float(arr.mean()), std


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
    ty = _labels_tensor(train[1], len(tx), num_classes, multilabel, "train")
    splits = []
    for name, (x, y) in (("val", val), ("test", test)):
        xt = _features_tensor(x, name, tx.shape[1])
        _labels_tensor(y, len(xt), num_classes, multilabel, name)
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
    lrs, seeds = _check_lists(lrs, seeds)
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
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup = warmup_steps_for(warmup_epochs, warmup_iters, steps_per_epoch, total_steps)
    settings = {
        "epochs": epochs,
        "batch_size": batch_size,
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
    for epoch in range(epochs):
        run.train_epoch(batch_size, lambda step: lr_multiplier(step, total_steps, warmup, schedule))
        evaluator.evaluate_epoch(epoch, run.weight.detach(), run.bias.detach())
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return _summarise(metric, lrs, seeds, evaluator, settings, run.train_seconds)


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

    def train_epoch(self, batch_size: int, multiplier: Callable[[int], float]) -> None:
        """One pass over the data; ``multiplier(step)`` scales the base LRs at global step ``step``."""
        _sync(self.device)
        start = time.perf_counter()
        n = len(self.x)
        order = torch.stack([torch.randperm(n, generator=g) for g in self.generators]).to(self.device)
        head_order = order[self.head_seed]  # (H, N): each head's data order, by its seed
        if self.views is not None:
            from fmcache.frozen.views import epoch_views

            k = self.views.shape[1]
            # its own generator per (seed, epoch), so the data order is the same as without views
            chosen = torch.stack([epoch_views(s, self.epoch, n, k) for s in self.seeds]).to(self.device)
            head_view = chosen[self.head_seed]  # (H, N): the view of each sample, by the head's seed
        for begin in range(0, n, batch_size):
            idx = head_order[:, begin : begin + batch_size]
            xb = self.x[idx] if self.views is None else self.views[idx, head_view.gather(1, idx)]
            self._train_step(xb, self.y[idx], multiplier(self.step))
            self.step += 1
        self.epoch += 1
        _sync(self.device)
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
    """Per-epoch val metric of every head; test metric at each head's best val epoch so far."""

    def __init__(self, val: _Split, test: _Split, metric, multilabel, label_names, n_heads, epochs):
        super().__init__(n_heads, epochs)
        self.val, self.test = val, test
        self.metric, self.multilabel, self.label_names = metric, multilabel, label_names

    def _probs(self, split: _Split, w: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        probs = _eval_probs(split.x, w, b, self.multilabel)
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
        test_probs = self._probs(self.test, w[rows], b[rows])
        for head, probs in zip(improved, test_probs, strict=True):
            self.test_metrics[head] = self._evaluate(self.test.y, probs)
            self.best_test_probs[head] = probs.astype(np.float32)
            self.best_val_probs[head] = val_probs[head].astype(np.float32)


def _summarise(metric, lrs, seeds, evaluator: _Evaluator, settings, train_seconds) -> ProbeResult:
    n_seeds = len(seeds)
    if np.isnan(evaluator.curves).any():
        raise FmcacheError(f"the val {metric} was NaN for some epoch; check the val labels")
    best_epoch, best_lr_index = select_best(evaluator.curves, lrs, n_seeds)
    per_lr, curves = {}, {}
    for i, lr in enumerate(lrs):
        heads = range(i * n_seeds, (i + 1) * n_seeds)
        val_values = [float(evaluator.curves[h, best_epoch[h]]) for h in heads]
        test_dicts = [evaluator.test_metrics[h] for h in heads]
        test_values = [float(d["value"]) for d in test_dicts]
        val_mean, val_std = _mean_std(val_values)
        test_mean, test_std = _mean_std(test_values)
        per_lr[lr] = {
            "val_mean": val_mean,
            "val_std": val_std,
            "test_mean": test_mean,
            "test_std": test_std,
            "val_per_seed": val_values,
            "test_per_seed": test_values,
            "best_epochs": [int(best_epoch[h]) + 1 for h in heads],
            "test_metrics": test_dicts,
        }
        curves[lr] = evaluator.curves[list(heads)]
    best = per_lr[lrs[best_lr_index]]
    best_heads = range(best_lr_index * n_seeds, (best_lr_index + 1) * n_seeds)
    predictions = {
        "seeds": np.asarray(seeds, dtype=np.int64),
        "val_scores": np.stack([evaluator.best_val_probs[h] for h in best_heads]),
        "test_scores": np.stack([evaluator.best_test_probs[h] for h in best_heads]),
    }
    return ProbeResult(
        metric=metric,
        lrs=lrs,
        seeds=seeds,
        per_lr=per_lr,
        best_lr=lrs[best_lr_index],
        val_mean=best["val_mean"],
        val_std=best["val_std"],
        test_mean=best["test_mean"],
        test_std=best["test_std"],
        curves=curves,
        settings=settings,
        train_seconds=train_seconds,
        inference_seconds_per_sample=evaluator.inference_seconds_per_sample(),
        predictions=predictions,
    )


def fit_sklearn_reference(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    metric: str = "accuracy",
    num_classes: int | None = None,
    Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    max_iter: int = 5000,
) -> dict:
    """Sanity reference: scikit-learn ``LogisticRegression`` (lbfgs, no feature scaling) over ``Cs``.

    Single-label only (a multi-label reference would be a different model, one-vs-rest, so it is
    refused). The best C maximises the val ``metric``. Returns ``{"metric", "best_C", "val_by_C": {C:
    value}, "val": best val value, "test": metrics.evaluate dict at best C, "value": test value}``.
    """
    from sklearn.linear_model import LogisticRegression

    metrics.check_metric(metric)
    train_y = np.asarray(train_y)
    if train_y.ndim != 1:
        raise FmcacheError("the scikit-learn reference is single-label only; use the probe for multi-label data")
    num_classes = int(num_classes or max(np.max(train_y), np.max(val_y), np.max(test_y)) + 1)
    val_by_c, models = {}, {}
    for c in Cs:
        model = LogisticRegression(C=c, max_iter=max_iter).fit(train_x, train_y)
        models[c] = model
        val_by_c[c] = metrics.evaluate(metric, val_y, _full_proba(model, val_x, num_classes), False)["value"]
    best_c = max(Cs, key=lambda c: val_by_c[c])  # first C on ties
    test = metrics.evaluate(metric, test_y, _full_proba(models[best_c], test_x, num_classes), False)
    return {
        "metric": metric,
        "best_C": best_c,
        "val_by_C": val_by_c,
        "val": val_by_c[best_c],
        "test": test,
        "value": test["value"],
    }


def _full_proba(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    # Classes absent from train get probability 0, so columns stay aligned with class indices.
    proba = np.zeros((len(x), num_classes))
    proba[:, model.classes_.astype(np.int64)] = model.predict_proba(x)
    return proba
