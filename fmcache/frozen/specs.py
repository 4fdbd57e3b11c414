"""Stage two's requests: one frozen dataclass per protocol, checked once, filled from flags, ``--config`` or the grid.

Each spec names its cache and results root and every option its runner takes; ``__post_init__`` coerces what text
flags and YAML give (``"1e-5,1e-4"``, ``[1e-5, 1e-4]``, a seed count or a list) and refuses bad values with one line,
before any cache is opened. Checks that need the cache (layers, pools, token layers) stay with the runners.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fmcache.config import as_floats, as_ints, as_path, as_seeds, as_text, check_int
from fmcache.errors import FmcacheError
from fmcache.frozen.cka import ESTIMATORS
from fmcache.frozen.cka_read import SPLITS as CKA_SPLITS
from fmcache.frozen.knn import DEFAULT_KS, DEFAULT_TEMPERATURE
from fmcache.frozen.views import MODES as VIEW_MODES
from fmcache.training import SCHEDULES

# the token heads' choices live here, not in heads.py/tokens.py: the linear probe's spec must not import timm
TOKEN_HEADS = ("deit", "attentive")
TOKEN_NORMS = ("seed", "none", "final")
PRELOAD = ("auto", "yes", "no")
DEIT_DEPTH = 12  # DeiT-B's blocks

DEFAULT_LRS = (1e-5, 3e-5, 1e-4, 1e-3)
VIEWS = (None, "auto", *VIEW_MODES)
EVAL_SPLITS = ("val", "test")
CKA_ESTIMATORS = (None, *ESTIMATORS)


def _set(spec: object, name: str, value: object) -> None:
    object.__setattr__(spec, name, value)


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed if a is not None)
        raise FmcacheError(f"unknown --{name.replace('_', '-')} '{value}'; use {shown}")


def _layer_text(spec: object, name: str = "layer") -> None:
    value = getattr(spec, name)
    if value is not None:
        _set(spec, name, str(value))


@dataclass(frozen=True)
class KnnSpec:
    """``fmcache knn``: weighted k-NN with the train split as the bank."""

    cache: Path
    out: Path = Path("results")
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = DEFAULT_TEMPERATURE
    layer: str = "last"
    pool: str = "auto"
    eval_splits: tuple[str, ...] = EVAL_SPLITS
    metric: str | None = None
    use_gpu: bool | None = None  # None: FAISS on GPU when present; False: --cpu
    plots: bool = True
    train_fraction: tuple[float, ...] | None = None  # label efficiency: one run per fraction × repeat (subsets.py)
    train_per_class: tuple[int, ...] | None = None  # ... or per count of train samples per class
    subset_repeats: int = 1
    val_fraction_follows: bool = False  # val is subset like train (default: full val for model selection)

    def __post_init__(self) -> None:
        _set(self, "cache", as_path(self.cache))
        _set(self, "out", as_path(self.out))
        _set(self, "ks", as_ints("k", self.ks))
        _layer_text(self)
        splits = self.eval_splits.split(",") if isinstance(self.eval_splits, str) else list(self.eval_splits)
        splits = [s.strip() for s in splits if s and s.strip()]
        # the train split is the bank: querying it would let every sample find itself
        if not splits or any(s not in EVAL_SPLITS for s in splits):
            raise FmcacheError(f"bad --eval '{','.join(splits)}'; use val, test or val,test")
        _set(self, "eval_splits", tuple(splits))
        if not float(self.temperature) > 0:
            raise FmcacheError(f"--temperature must be > 0, got {self.temperature}")
        _set(self, "temperature", float(self.temperature))
        _subset_fields(self)


@dataclass(frozen=True)
class ProbeSpec:
    """``fmcache probe --head linear``: the LR × seed grid of linear heads on pooled features."""

    cache: Path
    out: Path = Path("results")
    head: str = "linear"
    lrs: tuple[float, ...] = DEFAULT_LRS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 100
    batch_size: int = 64
    drop_last: bool = True  # the seed's train loader drops its last partial batch
    layer: str = "last"
    pool: str = "auto"
    metric: str | None = None
    weight_decay: float = 1e-5
    schedule: str = "constant"
    sklearn: bool = False
    device: str | None = None
    standardize: bool = True
    plots: bool = True
    views: str | None = None
    train_fraction: tuple[float, ...] | None = None  # label efficiency: one run per fraction × repeat (subsets.py)
    train_per_class: tuple[int, ...] | None = None  # ... or per count of train samples per class
    subset_repeats: int = 1
    val_fraction_follows: bool = False  # val is subset like train (default: full val for model selection)

    def __post_init__(self) -> None:
        _head_grid_fields(self)
        if self.head != "linear":
            raise FmcacheError(f"unknown --head '{self.head}' for the linear probe; use linear, deit or attentive")


@dataclass(frozen=True)
class TokenProbeSpec:
    """``fmcache probe --head deit|attentive``: token heads on cached token layers (the decapitation study)."""

    cache: Path
    out: Path = Path("results")
    head: str = "deit"
    lrs: tuple[float, ...] = DEFAULT_LRS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 100
    batch_size: int = 64
    drop_last: bool = True  # the seed's train loader drops its last partial batch
    layer: str = "last"
    metric: str | None = None
    weight_decay: float = 1e-5
    schedule: str = "constant"
    head_weights: str | None = None  # deit: "imagenet" (timm's DeiT-B/16, the seed's; default) or a file
    head_random_init: bool = False
    head_depth: int = DEIT_DEPTH
    token_norm: str = "seed"
    preload: str = "auto"
    heads_per_pass: int = 0
    resume: bool = True
    workers: int = 2
    device: str | None = None
    plots: bool = True
    views: str | None = None
    train_fraction: tuple[float, ...] | None = None  # label efficiency: one run per fraction × repeat (subsets.py)
    train_per_class: tuple[int, ...] | None = None  # ... or per count of train samples per class
    subset_repeats: int = 1
    val_fraction_follows: bool = False  # val is subset like train (default: full val for model selection)

    def __post_init__(self) -> None:
        _head_grid_fields(self)
        _choice("head", self.head, TOKEN_HEADS)
        _choice("token_norm", self.token_norm, TOKEN_NORMS)
        _choice("preload", self.preload, PRELOAD)
        for name, low in (("heads_per_pass", 0), ("workers", 0), ("head_depth", 1)):
            check_int(name, getattr(self, name), low)
        _set(self, "head_weights", as_text(self.head_weights))
        if self.head == "attentive" and self.head_weights is not None:
            raise FmcacheError("--head-weights applies to --head deit; the attentive head has no pretrained weights")
        if self.head == "deit" and not 1 <= self.head_depth <= DEIT_DEPTH:
            raise FmcacheError(f"--head-depth must lie in 1..{DEIT_DEPTH} (DeiT-B's blocks), got {self.head_depth}")
        if self.head_random_init and self.head_weights is not None:
            raise FmcacheError("pass either --head-weights or --head-random-init, not both")


def _head_grid_fields(spec: ProbeSpec | TokenProbeSpec) -> None:
    """The fields every head grid shares, checked and coerced once (probe linear and token heads)."""
    _set(spec, "cache", as_path(spec.cache))
    _set(spec, "out", as_path(spec.out))
    lrs = as_floats("lrs", spec.lrs)
    if any(not lr > 0 for lr in lrs) or len(set(lrs)) != len(lrs):
        raise FmcacheError(f"--lrs must be distinct positive numbers, got {list(lrs)}")
    _set(spec, "lrs", lrs)
    _set(spec, "seeds", as_seeds(spec.seeds))
    for name in ("epochs", "batch_size"):
        check_int(name, getattr(spec, name), 1)
    if spec.weight_decay < 0:
        raise FmcacheError(f"--weight-decay must be >= 0, got {spec.weight_decay}")
    _set(spec, "weight_decay", float(spec.weight_decay))
    _choice("schedule", spec.schedule, SCHEDULES)
    _choice("views", spec.views, VIEWS)
    _layer_text(spec)
    _subset_fields(spec)


def _subset_fields(spec: KnnSpec | ProbeSpec | TokenProbeSpec) -> None:
    """The label-efficiency options: ascending distinct fractions in (0, 1] or counts >= 1, never both."""
    fractions, counts = spec.train_fraction, spec.train_per_class
    if fractions is not None and counts is not None:
        raise FmcacheError("pass either --train-fraction or --train-per-class, not both")
    if fractions is not None:
        fractions = as_floats("train_fraction", fractions)
        if any(not 0 < f <= 1 for f in fractions) or len(set(fractions)) != len(fractions):
            raise FmcacheError(f"--train-fraction must be distinct numbers in (0, 1], got {list(fractions)}")
        _set(spec, "train_fraction", tuple(sorted(fractions)))  # the curve's order; each run is independent
    if counts is not None:
        counts = as_ints("train_per_class", counts, low=1)
        if len(set(counts)) != len(counts):
            raise FmcacheError(f"--train-per-class repeats a count: {list(counts)}")
        _set(spec, "train_per_class", tuple(sorted(counts)))
    check_int("subset_repeats", spec.subset_repeats, 1)
    _set(spec, "val_fraction_follows", bool(spec.val_fraction_follows))
    if fractions is None and counts is None and (spec.subset_repeats != 1 or spec.val_fraction_follows):
        what = "--subset-repeats" if spec.subset_repeats != 1 else "--val-fraction-follows"
        raise FmcacheError(f"{what} applies to label-efficiency runs; add --train-fraction or --train-per-class")


@dataclass(frozen=True)
class CkaSpec:
    """``fmcache cka``: linear CKA between the layers of one cache, or of two caches aligned by sample id."""

    cache: Path
    cache_b: Path | None = None
    out: Path = Path("results")
    layers: str = "all"
    layers_b: str | None = None
    pool: str = "auto"
    split: str = "test"
    estimator: str | None = None  # None: exact for pooled features, minibatch for token maps
    debiased: bool = True
    batch_size: int = 256
    plots: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        _set(self, "cache", as_path(self.cache))
        _set(self, "cache_b", as_path(self.cache_b))
        _set(self, "out", as_path(self.out))
        _layer_text(self, "layers")
        _layer_text(self, "layers_b")
        _choice("split", self.split, CKA_SPLITS)
        _choice("estimator", self.estimator, CKA_ESTIMATORS)
        check_int("batch_size", self.batch_size, 1)
