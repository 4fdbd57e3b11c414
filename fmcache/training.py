"""What every trainer shares: AdamW settings and parameter groups, warmup + schedule, clipping, best-epoch selection.

The linear grid (``frozen/linear.py``) uses these today; the token heads and fine-tuning are meant to use the same
functions, so the seed's recipe (PROTOCOLS.md, "Training") lives in one place:

- AdamW (betas 0.9/0.999, eps 1e-8), weight decay on weights only: biases and 1-D parameters get none;
- linear warmup (5 epochs, or 1000 iterations for ISIC/CheXpert), then constant (the seed's) or cosine;
- gradient clipping at 1.0;
- the best epoch is the first maximum of the validation metric;
- a resumable per-epoch checkpoint (:func:`save_checkpoint` / :func:`load_checkpoint`): atomic, with the RNG
  states and the settings it was made under, so a rerun continues exactly or refuses to mix settings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_with, disk_error

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
GRAD_CLIP = 1.0

# The paper's warmup: 5 epochs for the small datasets, 1000 iterations for the large ones.
PAPER_WARMUP = {"isic2019": {"warmup_iters": 1000}, "chexpert": {"warmup_iters": 1000}}
DEFAULT_WARMUP = {"warmup_epochs": 5}


# -- warmup and schedule ------------------------------------------------------------------------------------------


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the base LR for 0-based optimiser step ``step``.

    The seed's ``LinearWarmup`` (constant schedule): it steps once in its constructor, so optimiser step ``s`` runs
    at ``(s + 1) / W`` of the LR for ``s <= W`` (one step more than W) and then stays at ``(W + 1) / W``: the seed
    trains at ``lr · (1 + 1/W)`` after its warmup (+0.5 % for W = 200), not at ``lr``. fmcache follows it. (The seed
    also starts its ramp at 1e-8 rather than 0, which moves each warmup LR by at most 1e-8: not followed.)
    "cosine" (fmcache's option, not the seed's) reaches 1 at the last of W warmup steps and decays as
    0.5 (1 + cos(π p)) over the remaining steps.
    """
    if schedule == "constant":
        if warmup_steps <= 0:
            return 1.0
        return min(step + 1, warmup_steps + 1) / warmup_steps
    if schedule == "cosine":
        if step < warmup_steps:
            return (step + 1) / warmup_steps
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


def batch_starts(n: int, batch_size: int, drop_last: bool) -> range:
    """Where each train batch starts: every ``batch_size`` rows, without the last partial batch when ``drop_last``
    (the seed's train loader: ``drop_last: true``)."""
    if drop_last and n < batch_size:
        raise FmcacheError(
            f"the train split has {n} samples, fewer than the batch size {batch_size}, so the seed's drop_last would "
            "drop every batch; lower --batch-size, or pass --keep-last to train on the partial batch"
        )
    return range(0, (n // batch_size) * batch_size if drop_last else n, batch_size)


def fit_warmup(warmup: dict, epochs: int, n_train: int, batch_size: int, drop_last: bool = False) -> dict:
    """The paper's warmup, shortened to a tenth of training when a short run would otherwise be all warmup."""
    steps_per_epoch = max(1, n_train // batch_size if drop_last else -(-n_train // batch_size))
    total = steps_per_epoch * epochs
    steps = warmup.get("warmup_iters", round(warmup.get("warmup_epochs", 0) * steps_per_epoch))
    if steps < total:
        return warmup
    return {"warmup_iters": total // 10}


def warmup_note(dataset: str, warmup: dict) -> str | None:
    """Where :func:`fit_warmup` shortened the paper's warmup (a label-efficiency subset, a tiny run): what the result
    says about it; None when the paper's warmup ran as it is."""
    paper = paper_warmup(dataset)
    if warmup == paper:
        return None
    what = f"{paper['warmup_iters']} iterations" if "warmup_iters" in paper else f"{paper['warmup_epochs']} epochs"
    return (
        f"the paper's warmup ({what}) is not shorter than this run's training: the warmup is a tenth of it, "
        f"{warmup.get('warmup_iters')} iterations"
    )


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


# The seed rounds every val metric to 3 decimals before it compares (``round(value, 3)`` in its metrics) and keeps an
# epoch only when it is strictly better: on a 3-decimal tie the earlier epoch wins. None compares unrounded values.
VAL_DECIMALS = 3


def compared(values: np.ndarray | float, decimals: int | None) -> np.ndarray:
    """Val values as the best-epoch rule compares them (rounded to ``decimals``, or as they are for None)."""
    values = np.asarray(values, dtype=np.float64)
    return values if decimals is None else np.round(values, decimals)


def best_epochs(val_curves: np.ndarray, decimals: int | None = VAL_DECIMALS) -> np.ndarray:
    """Best epoch index per row of (heads, epochs) val curves: the first maximum of the compared values, so ties go
    to the earlier epoch."""
    return np.argmax(compared(np.atleast_2d(val_curves), decimals), axis=1)


def select_best(
    val_curves: np.ndarray, lrs: Sequence[float], n_seeds: int, decimals: int | None = VAL_DECIMALS
) -> tuple[np.ndarray, int]:
    """Best epoch index per head (first maximum of its compared val curve) and the index of the best LR.

    ``val_curves`` is (H, epochs) with heads ordered LR-major (head = lr_index × n_seeds + seed_index).
    The best LR has the highest mean over seeds of each head's val value at its best epoch (unrounded: the mean of
    the numbers the seed reports); ties go to the first LR.
    """
    best_epoch = best_epochs(val_curves, decimals)
    best_val = val_curves[np.arange(len(val_curves)), best_epoch]
    mean_by_lr = best_val.reshape(len(lrs), n_seeds).mean(1)
    return best_epoch, int(np.argmax(mean_by_lr))


# -- resumable checkpoints ----------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1


def rng_states() -> dict:
    """Every global RNG a trainer draws from (torch CPU and CUDA, numpy, Python), in a ``weights_only``-safe form."""
    import random

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def restore_rng_states(states: dict) -> None:
    """Put back what :func:`rng_states` saved (CUDA states only where this machine has as many devices)."""
    import random

    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))  # a checkpoint may hand tuples back as lists


def _canonical(settings: dict) -> str:
    import json

    return json.dumps(settings, sort_keys=True, default=str)


def save_checkpoint(path: Path, state: dict, settings: dict) -> None:
    """Write a resumable checkpoint atomically: ``state`` (tensors, numbers, strings, lists, dicts) with the
    ``settings`` it was made under and every global RNG state.

    The file is written under a temporary name, fsynced and renamed, so a kill at any instant leaves either the
    previous checkpoint or the new one, never a torn file. ``settings`` must be JSON-able; :func:`load_checkpoint`
    refuses a checkpoint whose settings differ, so a rerun with other settings never mixes two runs.
    """

    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "settings": _canonical(settings), "rng": rng_states(), "state": state}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    atomic_write_with(path, lambda fh: torch.save(payload, fh))


def _read_checkpoint(path: Path, mmap: bool) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        what = " ".join(str(exc).split())[:160]
        raise FmcacheError(f"cannot read checkpoint {path} ({what}); delete it or rerun with --no-resume") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise FmcacheError(f"{path} is not an fmcache checkpoint of format {CHECKPOINT_FORMAT}; rerun with --no-resume")
    return payload


def check_checkpoint(path: Path, settings: dict) -> bool:
    """Whether a checkpoint exists at ``path``; raises a one-line error when it was made with other settings.

    Cheap (the file is memory-mapped, tensors are not read), so a runner can check every checkpoint before it
    writes anything.
    """
    path = Path(path)
    if not path.is_file():
        return False
    import json

    saved = json.loads(_read_checkpoint(path, mmap=True)["settings"])
    if saved != json.loads(_canonical(settings)):
        keys = sorted(set(saved) | set(settings), key=str)
        diff = next((k for k in keys if saved.get(k) != json.loads(_canonical(settings)).get(k)), "?")
        raise FmcacheError(
            f"checkpoint {path} was made with other settings ({diff}: {saved.get(diff)!r} there, "
            f"{settings.get(diff)!r} now); rerun with the same settings, or pass --no-resume to start over"
        )
    return True


def checkpoint_position(path: Path) -> dict:
    """The numbers at the top of a checkpoint's ``state`` (epoch, pass, ...), read cheaply (memory-mapped), so a
    runner can say where it resumes before it loads the tensors."""
    state = _read_checkpoint(Path(path), mmap=True)["state"]
    return {k: v for k, v in state.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def load_checkpoint(path: Path, settings: dict, restore_rng: bool = True) -> dict | None:
    """The ``state`` saved by :func:`save_checkpoint` at ``path`` (None when there is none), after checking that it
    was made with the same ``settings``; restores the global RNG states too unless ``restore_rng`` is False."""
    if not check_checkpoint(path, settings):
        return None
    payload = _read_checkpoint(Path(path), mmap=False)
    if restore_rng:
        restore_rng_states(payload["rng"])
    return payload["state"]


# -- best-epoch records of a head grid ------------------------------------------------------------------------


class HeadRecords:
    """Best-epoch selection for a grid of heads: per-head val curves, the first maximum and its epoch, the test
    metrics and probabilities at that epoch, and the inference time; resumable through :meth:`state`/:meth:`load`.

    Every trainer of a head grid keeps these (the linear grid, the token heads), so the rule "the best epoch is the
    first maximum of val; test is read only there" is written once.
    """

    def __init__(self, n_heads: int, epochs: int, decimals: int | None = VAL_DECIMALS):
        self.decimals = decimals  # how val values are compared (VAL_DECIMALS: the seed's 3 decimals)
        self.curves = np.full((n_heads, epochs), np.nan)
        self.best_val = np.full(n_heads, -np.inf)
        self.best_epoch = np.zeros(n_heads, dtype=np.int64)
        self.test_metrics: list[dict | None] = [None] * n_heads
        # each head's val and test probabilities at its best epoch so far (float32), for per-sample predictions
        self.best_val_probs: list[np.ndarray | None] = [None] * n_heads
        self.best_test_probs: list[np.ndarray | None] = [None] * n_heads
        self.forward_seconds = 0.0
        self.forward_samples = 0

    def observe(self, epoch: int, values: dict[int, float] | np.ndarray) -> list[int]:
        """Record val ``values`` (head → value, or one per head) for ``epoch``; return the heads that improved
        (strictly, on the compared values: the first maximum wins), whose test metric the caller then scores."""
        items = values.items() if isinstance(values, dict) else enumerate(values)
        improved = []
        for head, value in items:
            self.curves[head, epoch] = value
            if compared(value, self.decimals) > compared(self.best_val[head], self.decimals):
                self.best_val[head], self.best_epoch[head] = value, epoch
                improved.append(int(head))
        return improved

    def inference_seconds_per_sample(self) -> float:
        return self.forward_seconds / max(1, self.forward_samples)

    def state(self) -> dict:
        # JSON text: metric dicts hold numpy scalars that a weights_only checkpoint would not take
        return {
            "json": json.dumps(
                {
                    "curves": [[None if np.isnan(v) else float(v) for v in row] for row in self.curves],
                    "best_val": [None if np.isinf(v) else float(v) for v in self.best_val],
                    "best_epoch": self.best_epoch.tolist(),
                    "test_metrics": self.test_metrics,
                    "forward_seconds": self.forward_seconds,
                    "forward_samples": self.forward_samples,
                },
                default=_json_default,
            ),
            "best_val_probs": {str(h): torch.from_numpy(p) for h, p in enumerate(self.best_val_probs) if p is not None},
            "best_test_probs": {
                str(h): torch.from_numpy(p) for h, p in enumerate(self.best_test_probs) if p is not None
            },
        }

    def load(self, state: dict) -> None:
        d = json.loads(state["json"])
        self.curves = np.array([[np.nan if v is None else v for v in row] for row in d["curves"]], dtype=np.float64)
        self.best_val = np.array([-np.inf if v is None else v for v in d["best_val"]], dtype=np.float64)
        self.best_epoch = np.array(d["best_epoch"], dtype=np.int64)
        self.test_metrics = d["test_metrics"]
        self.forward_seconds, self.forward_samples = d["forward_seconds"], d["forward_samples"]
        for h, p in state.get("best_val_probs", {}).items():
            self.best_val_probs[int(h)] = p.numpy()
        for h, p in state.get("best_test_probs", {}).items():
            self.best_test_probs[int(h)] = p.numpy()


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def json_roundtrip(obj: object) -> object:
    """``obj`` as it reads back from JSON, so a resumed run (which reads metrics back from its checkpoint) reports
    exactly what an uninterrupted one does."""
    return json.loads(json.dumps(obj, default=_json_default))
