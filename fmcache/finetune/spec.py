"""``fmcache finetune``'s request: one frozen dataclass, filled from flags, ``--config`` or the grid, checked once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fmcache.choices import (
    AMP_MODES,
    AUGMENT_PLACES,
    BEST_EPOCH_RULES,
    DEIT_DEPTH,
    GRAY_MODES,
    LORA_METHODS,
    NORMS,
    PIXEL_SOURCES,
    PRECISIONS,
    SCHEDULES,
)
from fmcache.config import Spec, as_floats, as_seeds, as_text
from fmcache.errors import FmcacheError
from fmcache.frozen.specs import check_head_depth

HEADS = ("linear", "deit")
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def parse_freeze(value: str | int) -> str | int:
    text = str(value).strip().lower()
    if text in ("none", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise FmcacheError(f"bad --freeze '{value}'; use none, all or a block count K") from None


@dataclass(frozen=True)
class FinetuneSpec(Spec):
    """Everything ``fmcache finetune`` needs; a YAML config or the CLI flags fill it in."""

    dataset: str | None = None
    data_root: Path | None = None
    model: str | None = None
    weights: Path | None = None
    random_init: bool = False
    head: str = "linear"
    head_weights: str | None = None  # deit: "imagenet" (default) or a file
    head_random_init: bool = False
    head_depth: int = DEIT_DEPTH  # DeiT blocks in the stacked head (the seed's 12; tests use fewer)
    freeze: str = "none"
    drop_after: int | None = None
    # full: every weight of the trainable parts (the paper's); lora: peft adapters in the trainable blocks only
    method: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # names inside a block; None: the family's attention qkv + projection
    lrs: tuple[float, ...] = (1e-4,)
    seeds: tuple[int, ...] = (0,)  # a count N (seeds 0..N-1) or a list
    epochs: int = 100
    batch_size: int = 64
    drop_last: bool = True  # the seed's train loader drops its last partial batch
    accum: int = 1
    img_size: int | None = None
    workers: int = 2
    schedule: str = "constant"
    clip: float = 1.0
    amp: str = "auto"
    best_epoch: str = "seed"  # fmcache.choices.BEST_EPOCH_RULES
    eval_precision: str = "auto"  # val/test forwards: auto (as --amp), fp32 (the seed's), bf16, fp16
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
    # the data path (README "Fine-tuning"): read the images' resized center crops from a pixel cache (fmcache pixels)
    # under cache_root when one matches (auto), always (on: a missing or mismatched one is refused) or never (off);
    # draw the random train augmentation per image with PIL in the loader (cpu: the seed's, bit-identical from
    # pixels or images) or on the uint8 batch on the training device (device: the same distribution, not the same
    # pixels; it enters the run's key)
    pixels: str = "auto"
    augment: str = "cpu"
    cache_root: Path = Path("cache")
    # last.pt is rewritten at most every this many seconds (0: after every epoch), and always after the last epoch
    # and on SIGTERM; a resume replays the epochs since the checkpoint to the same numbers
    checkpoint_every: int = 600

    PATHS: ClassVar[tuple[str, ...]] = ("data_root", "weights", "out", "from_cache", "cache_root")
    INTS: ClassVar[dict[str, int]] = {
        "epochs": 1,
        "batch_size": 1,
        "accum": 1,
        "workers": 0,
        "head_depth": 1,
        "img_size": 1,
        "limit": 1,
        "lora_rank": 1,
        "checkpoint_every": 0,
    }
    FLOATS: ClassVar[tuple[str, ...]] = ("clip", "layer_decay", "weight_decay", "lora_alpha", "lora_dropout")
    CHOICES: ClassVar[dict[str, tuple]] = {
        "head": HEADS,
        "schedule": SCHEDULES,
        "amp": AMP_MODES,
        "method": LORA_METHODS,
        "norm": NORMS,
        "gray": GRAY_MODES,
        "best_epoch": tuple(BEST_EPOCH_RULES),
        "eval_precision": PRECISIONS,
        "pixels": PIXEL_SOURCES,
        "augment": AUGMENT_PLACES,
    }

    def __post_init__(self) -> None:
        if isinstance(self.pixels, bool):  # YAML 1.1 reads a bare on/off as a boolean
            self.set("pixels", "on" if self.pixels else "off")
        super().__post_init__()

    def check(self) -> None:
        # what flags (text) and YAML (lists, numbers) give, coerced once, here
        self.set("lrs", as_floats("lrs", self.lrs, example="1e-5,1e-4"))
        self.set("seeds", as_seeds(self.seeds))
        for name in ("freeze", "head_weights"):
            self.set(name, as_text(getattr(self, name)))
        parse_freeze(self.freeze)
        check_head_depth(self.head, self.head_depth)
        self._check_lora()
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
        if self.from_cache is not None and (self.pixels == "on" or self.augment != "cpu"):
            raise FmcacheError("--pixels on and --augment device apply to images; --from-cache reads tokens")

    def _check_lora(self) -> None:
        self.set("lora_targets", _as_names("lora_targets", self.lora_targets))
        self.set("lora_alpha", float(self.lora_alpha))  # floats in the settings hash, as they always were
        self.set("lora_dropout", float(self.lora_dropout))
        if not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
            raise FmcacheError("--lora-alpha must be > 0 and --lora-dropout in [0, 1)")
        if self.method == "full":
            given = [name for name in LORA_FIELDS if getattr(self, name) != self.default(name)]
            if given:
                raise FmcacheError(f"--{given[0].replace('_', '-')} applies to --method lora; pass that or drop it")
        elif str(self.freeze).strip().lower() == "all":
            raise FmcacheError("--method lora with --freeze all adapts no block; use --freeze none or K")


def _as_names(name: str, value: object) -> tuple[str, ...] | None:
    """``attn.qkv,attn.proj`` (text) or a YAML list, as a tuple of names; None or empty stays None (the default)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise FmcacheError(f"bad --{name.replace('_', '-')} {value!r}; give comma-separated module names")
    names = tuple(v.strip() for v in items if v.strip())
    return names or None
