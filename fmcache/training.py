"""What every trainer shares: AdamW settings and parameter groups, warmup + schedule, clipping, best-epoch selection.

The linear grid (``frozen/linear.py``) uses these today; the token heads and fine-tuning are meant to use the same
functions, so the seed's recipe (PROTOCOLS.md, "Training") lives in one place:

- AdamW (betas 0.9/0.999, eps 1e-8), weight decay on weights only: biases and 1-D parameters get none;
- linear warmup (5 epochs, or 1000 iterations for ISIC/CheXpert), then constant (the seed's) or cosine;
- gradient clipping at 1.0;
- the best epoch is the first maximum of the validation metric.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from fmcache.errors import FmcacheError

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
GRAD_CLIP = 1.0

# The paper's warmup: 5 epochs for the small datasets, 1000 iterations for the large ones.
PAPER_WARMUP = {"isic2019": {"warmup_iters": 1000}, "chexpert": {"warmup_iters": 1000}}
DEFAULT_WARMUP = {"warmup_epochs": 5}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given ("cpu", "cuda", "cuda:1", ...), else (None or "auto") CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FmcacheError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FmcacheError("device cuda was requested but CUDA is not available; use cpu or auto")
    return dev


# -- warmup and schedule ------------------------------------------------------------------------------------------


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the base LR for 0-based optimiser step ``step``.

    Warmup rises linearly (step + 1) / warmup_steps, reaching 1 at the last warmup step; then "cosine"
    decays as 0.5 (1 + cos(π p)) with p going from 0 towards 1 over the remaining steps, and
    "constant" stays at 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise FmcacheError(f"unknown LR schedule {schedule!r}; choose 'cosine' or 'constant'")


def warmup_steps_for(
    warmup_epochs: float | None, warmup_iters: int | None, steps_per_epoch: int, total_steps: int
) -> int:
    """Warmup length in optimiser steps from epochs (rounded) or iterations; at most one may be given."""
    if warmup_epochs is not None and warmup_iters is not None:
        raise FmcacheError("give either warmup epochs or warmup iterations, not both")
    if warmup_epochs is not None:
        if warmup_epochs < 0:
            raise FmcacheError(f"warmup epochs must be >= 0, got {warmup_epochs}")
        steps = round(warmup_epochs * steps_per_epoch)
    elif warmup_iters is not None:
        if warmup_iters < 0:
            raise FmcacheError(f"warmup iterations must be >= 0, got {warmup_iters}")
        steps = int(warmup_iters)
    else:
        steps = 0
    if steps >= total_steps and steps > 0:
        raise FmcacheError(
            f"warmup ({steps} steps) is not shorter than training ({total_steps} steps);"
            " lower the warmup or train for more epochs"
        )
    return steps


def paper_warmup(dataset: str) -> dict:
    """The paper's warmup for a dataset, as ``warmup_epochs`` or ``warmup_iters`` keyword arguments."""
    return dict(PAPER_WARMUP.get(dataset, DEFAULT_WARMUP))


def fit_warmup(warmup: dict, epochs: int, n_train: int, batch_size: int) -> dict:
    """The paper's warmup, shortened to a tenth of training when a short run would otherwise be all warmup."""
    steps_per_epoch = -(-n_train // batch_size)
    total = steps_per_epoch * epochs
    steps = warmup.get("warmup_iters", round(warmup.get("warmup_epochs", 0) * steps_per_epoch))
    if steps < total:
        return warmup
    return {"warmup_iters": total // 10}


# -- AdamW parameter groups and clipping --------------------------------------------------------------------------


def decays(name: str, shape: Sequence[int]) -> bool:
    """Whether a parameter gets weight decay: weights do; biases and 1-D parameters (norms, scales) don't.

    ``shape`` is the parameter's own shape; for stacked per-head parameters pass the shape of one head's slice.
    """
    return len(shape) > 1 and not name.endswith("bias")


def adamw_param_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """``torch.optim.AdamW`` groups: decay for weights, none for biases and 1-D parameters (frozen ones left out)."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (decay if decays(name, tuple(param.shape)) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_per_head(grads: Sequence[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` for stacked heads: dim 0 indexes heads, and each head's slices form its own vector."""
    sq = sum(g.pow(2).reshape(g.shape[0], -1).sum(1) for g in grads)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # torch's own epsilon, so a single head matches it
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


# -- best epoch ---------------------------------------------------------------------------------------------------


def best_epochs(val_curves: np.ndarray) -> np.ndarray:
    """Best epoch index per row of (heads, epochs) val curves: the first maximum, so ties go to the earlier epoch."""
    return np.argmax(np.atleast_2d(val_curves), axis=1)


def select_best(val_curves: np.ndarray, lrs: Sequence[float], n_seeds: int) -> tuple[np.ndarray, int]:
    """Best epoch index per head (first maximum of its val curve) and the index of the best LR.

    ``val_curves`` is (H, epochs) with heads ordered LR-major (head = lr_index × n_seeds + seed_index).
    The best LR has the highest mean over seeds of each head's best val value; ties go to the first LR.
    """
    best_epoch = best_epochs(val_curves)
    best_val = val_curves[np.arange(len(val_curves)), best_epoch]
    mean_by_lr = best_val.reshape(len(lrs), n_seeds).mean(1)
    return best_epoch, int(np.argmax(mean_by_lr))
