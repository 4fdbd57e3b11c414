"""``fmcache finetune``'s request: one frozen dataclass, filled from flags, ``--config`` or the grid, checked once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fmcache.config import as_floats, as_path, as_seeds, as_text, check_int
from fmcache.errors import FmcacheError
from fmcache.finetune.loop import AMP_MODES
from fmcache.finetune.model import parse_freeze
from fmcache.training import SCHEDULES

HEADS = ("linear", "deit")


@dataclass(frozen=True)
class FinetuneSpec:
    """Everything ``fmcache finetune`` needs; a YAML config or the CLI flags fill it in."""

    dataset: str | None = None
    data_root: Path | None = None
    model: str | None = None
    weights: Path | None = None
    random_init: bool = False
    head: str = "linear"
    head_weights: str | None = None  # deit: "imagenet" (default) or a file
    head_random_init: bool = False
    head_depth: int = 12  # DeiT blocks in the stacked head (the seed's 12; tests use fewer)
    freeze: str = "none"
    drop_after: int | None = None
    lrs: tuple[float, ...] = (1e-4,)
    seeds: tuple[int, ...] = (0,)  # a count N (seeds 0..N-1) or a list
    epochs: int = 100
    batch_size: int = 64
    accum: int = 1
    img_size: int | None = None
    workers: int = 2
    schedule: str = "constant"
    clip: float = 1.0
    amp: str = "auto"
    layer_decay: float = 1.0
    weight_decay: float = 1e-5
    out: Path = Path("runs")
    resume: bool = True
    from_cache: Path | None = None
    tensorboard: bool = False
    device: str | None = None
    norm: str = "dataset"
    gray: str = "repeat"
    limit: int | None = None
    metric: str | None = None
    dataset_options: dict = field(default_factory=dict)
    arch_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # what flags (text) and YAML (lists, numbers) give, coerced once, here
        object.__setattr__(self, "lrs", as_floats("lrs", self.lrs))
        object.__setattr__(self, "seeds", as_seeds(self.seeds))
        for name in ("freeze", "head_weights"):
            object.__setattr__(self, name, as_text(getattr(self, name)))
        for name in ("data_root", "weights", "out", "from_cache"):
            object.__setattr__(self, name, as_path(getattr(self, name)))
        for name, low in (("epochs", 1), ("batch_size", 1), ("accum", 1), ("workers", 0), ("head_depth", 1)):
            check_int(name, getattr(self, name), low)
        for name in ("img_size", "limit"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        choices = {"head": HEADS, "schedule": SCHEDULES, "amp": AMP_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise FmcacheError(
                    f"unknown --{name.replace('_', '-')} '{getattr(self, name)}'; use {', '.join(allowed)}"
                )
        parse_freeze(self.freeze)
        if not self.lrs or any(not (lr > 0) for lr in self.lrs):
            raise FmcacheError(f"--lrs must be positive numbers, got {list(self.lrs)}")
        if self.clip < 0 or self.weight_decay < 0 or not 0 < self.layer_decay <= 1:
            raise FmcacheError("--clip and --weight-decay must be >= 0 and --layer-decay in (0, 1]")
        if self.weights is not None and self.random_init:
            raise FmcacheError("--weights and --random-init exclude each other; pass one")
        if self.head == "linear" and (self.head_weights is not None or self.head_random_init):
            raise FmcacheError("--head-weights / --head-random-init apply to --head deit; a linear head starts random")
        if self.head_weights is not None and self.head_random_init:
            raise FmcacheError("--head-weights and --head-random-init exclude each other; pass one")
        if self.from_cache is None:
            for required in ("dataset", "data_root", "model"):
                if getattr(self, required) is None:
                    raise FmcacheError(f"--{required.replace('_', '-')} is required (as a flag or in --config)")
        elif self.model is None:
            raise FmcacheError("--model is required with --from-cache (it must match the cache's model)")
