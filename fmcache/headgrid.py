"""What every grid of heads (LRs × seeds) shares, frozen or fine-tuned: its checks, its loss and its summary.

The linear grid (:mod:`fmcache.frozen.linear`), the token heads (:mod:`fmcache.frozen.tokens`) and fine-tuning
(:mod:`fmcache.finetune.run`) order their heads LR-major (head = lr_index × n_seeds + seed_index), keep each head's
best epoch on val in :class:`fmcache.training.HeadRecords`, and report them alike through :func:`summarise`: the best
LR by mean val, test mean ± std over seeds at that LR, as a :class:`ProbeResult`. Standard deviations are sample std
(ddof=1; 0 for one seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmcache.errors import FmcacheError
from fmcache.training import HeadRecords, select_best

STD_DDOF = 1


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of a head grid (:func:`fmcache.frozen.linear.train_linear_grid`, the token heads, fine-tuning).

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
    # the best LR's heads, one per seed at its selected epoch, as the trainer keeps them (the linear grid: stacked
    # "weight" (S, C, D) and "bias" (S, C)); kept out of to_dict (it goes to heads.safetensors, for fmcache transfer)
    heads: dict | None = None

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


def check_lists(lrs: Sequence[float], seeds: Sequence[int] | int) -> tuple[list[float], list[int]]:
    lrs = [float(lr) for lr in lrs]
    seeds = list(range(int(seeds))) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not lrs or any(not lr > 0 for lr in lrs):
        raise FmcacheError(f"learning rates must be a non-empty list of positive numbers, got {lrs}")
    if not seeds:
        raise FmcacheError("give at least one seed (or a positive number of seeds)")
    if len(set(lrs)) != len(lrs) or len(set(seeds)) != len(seeds):
        raise FmcacheError(f"learning rates and seeds must not repeat, got lrs={lrs} seeds={seeds}")
    return lrs, seeds


def labels_tensor(y: np.ndarray, n: int, num_classes: int, multilabel: bool, split: str) -> torch.Tensor:
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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=STD_DDOF)) if len(arr) > STD_DDOF else 0.0
    return float(arr.mean()), std


def summarise(metric, lrs, seeds, evaluator: HeadRecords, settings, train_seconds) -> ProbeResult:
    """The grid's :class:`ProbeResult` from its heads' val curves and test records (heads LR-major)."""
    n_seeds = len(seeds)
    if np.isnan(evaluator.curves).any():
        raise FmcacheError(f"the val {metric} was NaN for some epoch; check the val labels")
    best_epoch, best_lr_index = select_best(evaluator.curves, lrs, n_seeds, evaluator.decimals)
    per_lr, curves = {}, {}
    for i, lr in enumerate(lrs):
        heads = range(i * n_seeds, (i + 1) * n_seeds)
        val_values = [float(evaluator.curves[h, best_epoch[h]]) for h in heads]
        test_dicts = [evaluator.test_metrics[h] for h in heads]
        test_values = [float(d["value"]) for d in test_dicts]
        val_mean, val_std = mean_std(val_values)
        test_mean, test_std = mean_std(test_values)
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
    predictions = None  # a head without its best epoch's probabilities (a run of an older fmcache): none at all
    if all(evaluator.best_val_probs[h] is not None and evaluator.best_test_probs[h] is not None for h in best_heads):
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
