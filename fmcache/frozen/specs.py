"""Stage two's requests: one frozen dataclass per protocol, checked once, filled from flags, ``--config`` or the grid.

Every spec follows :class:`fmcache.config.Spec`'s idiom: path, integer and choice fields are named in class
attributes, and :meth:`check` coerces what text flags and YAML give (``"1e-5,1e-4"``, ``[1e-5, 1e-4]``, a seed count
or a list) and refuses bad values with one line, before any cache is opened. The two head grids (linear, token heads)
share :class:`HeadGridSpec`; every protocol that trains on the train split shares the label-efficiency fields of
:class:`SubsetSpec`. Checks that need the cache (layers, pools, token layers) stay with the runners.

This module imports no torch, so the CLI reads its defaults for ``--help`` at no cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fmcache.choices import (
    BEST_EPOCH_RULES,
    CKA_ESTIMATORS,
    CKA_SPLITS,
    DEIT_DEPTH,
    PRELOAD,
    SCHEDULES,
    TOKEN_HEADS,
    TOKEN_NORMS,
    VIEW_MODES,
)
from fmcache.config import Spec, as_floats, as_ints, as_seeds, as_text
from fmcache.errors import FmcacheError
from fmcache.frozen.knn import DEFAULT_KS, DEFAULT_TEMPERATURE
from fmcache.frozen.overlap import DEFAULT_NEAR_BITS, check_near_bits
from fmcache.labels import UNCERTAIN
from fmcache.results import RESULT_JSON

DEFAULT_LRS = (1e-5, 3e-5, 1e-4, 1e-3)
VIEWS = (None, "auto", *VIEW_MODES)
EVAL_SPLITS = ("val", "test")


def _layer_text(spec: Spec, name: str = "layer") -> None:
    value = getattr(spec, name)
    if value is not None:
        spec.set(name, str(value))


def check_head_depth(head: str, depth: int) -> None:
    """The stacked DeiT head keeps the first ``depth`` of DeiT-B's blocks."""
    if head == "deit" and not 1 <= depth <= DEIT_DEPTH:
        raise FmcacheError(f"--head-depth must lie in 1..{DEIT_DEPTH} (DeiT-B's blocks), got {depth}")


@dataclass(frozen=True)
class CacheSpec(Spec):
    """What every stage-two request names: the cache it reads and the results root it writes under."""

    cache: Path
    out: Path = Path("results")

    PATHS: ClassVar[tuple[str, ...]] = ("cache", "out")


@dataclass(frozen=True)
class LabelledSpec(CacheSpec):
    """A protocol that reads the cache's labels, under a label policy (CheXpert's uncertain observations: the cache
    keeps the raw annotations, so one cache serves every policy; None: the seed's U-Zeros)."""

    uncertain: str | None = None

    CHOICES: ClassVar[dict[str, tuple]] = {"uncertain": (None, *UNCERTAIN)}


@dataclass(frozen=True)
class SubsetSpec(LabelledSpec):
    """The label-efficiency options (``--train-fraction``/``--train-per-class``; :mod:`fmcache.frozen.subsets`)."""

    train_fraction: tuple[float, ...] | None = None  # one run per fraction × repeat
    train_per_class: tuple[int, ...] | None = None  # ... or per count of train samples per class
    subset_repeats: int = 1
    val_fraction_follows: bool = False  # val is subset like train (default: full val for model selection)

    def check(self) -> None:
        """Ascending distinct fractions in (0, 1] or counts >= 1, never both."""
        fractions, counts = self.train_fraction, self.train_per_class
        if fractions is not None and counts is not None:
            raise FmcacheError("pass either --train-fraction or --train-per-class, not both")
        if fractions is not None:
            fractions = as_floats("train_fraction", fractions, example="0.01,0.1,1.0")
            if any(not 0 < f <= 1 for f in fractions) or len(set(fractions)) != len(fractions):
                raise FmcacheError(f"--train-fraction must be distinct numbers in (0, 1], got {list(fractions)}")
            self.set("train_fraction", tuple(sorted(fractions)))  # the curve's order; each run is independent
        if counts is not None:
            counts = as_ints("train_per_class", counts, low=1, example="1,5,10")
            if len(set(counts)) != len(counts):
                raise FmcacheError(f"--train-per-class repeats a count: {list(counts)}")
            self.set("train_per_class", tuple(sorted(counts)))
        self.set("val_fraction_follows", bool(self.val_fraction_follows))
        if fractions is None and counts is None and (self.subset_repeats != 1 or self.val_fraction_follows):
            what = "--subset-repeats" if self.subset_repeats != 1 else "--val-fraction-follows"
            raise FmcacheError(f"{what} applies to label-efficiency runs; add --train-fraction or --train-per-class")


@dataclass(frozen=True)
class KnnSpec(SubsetSpec):
    """``fmcache knn``: weighted k-NN with the train split as the bank."""

    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = DEFAULT_TEMPERATURE
    layer: str = "last"
    pool: str = "auto"
    eval_splits: tuple[str, ...] = EVAL_SPLITS
    metric: str | None = None
    use_gpu: bool | None = None  # None: FAISS on GPU when present; False: --cpu
    plots: bool = True

    INTS: ClassVar[dict[str, int]] = {"subset_repeats": 1}
    FLOATS: ClassVar[tuple[str, ...]] = ("temperature",)

    def check(self) -> None:
        self.set("ks", as_ints("k", self.ks, example="10,20,100,200"))
        _layer_text(self)
        splits = self.eval_splits.split(",") if isinstance(self.eval_splits, str) else list(self.eval_splits)
        splits = [s.strip() for s in splits if s and s.strip()]
        # the train split is the bank: querying it would let every sample find itself
        if not splits or any(s not in EVAL_SPLITS for s in splits):
            raise FmcacheError(f"bad --eval '{','.join(splits)}'; use val, test or val,test")
        self.set("eval_splits", tuple(splits))
        if not self.temperature > 0:
            raise FmcacheError(f"--temperature must be > 0, got {self.temperature}")
        self.set("temperature", float(self.temperature))  # a float in the settings hash, as it always was
        super().check()


@dataclass(frozen=True)
class HeadGridSpec(SubsetSpec):
    """What every LR × seed grid of heads on a cache takes: the linear probe and the token heads."""

    head: str = "linear"
    lrs: tuple[float, ...] = DEFAULT_LRS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 100
    batch_size: int = 64
    drop_last: bool = True  # the seed's train loader drops its last partial batch
    layer: str = "last"
    metric: str | None = None
    weight_decay: float = 1e-5
    schedule: str = "constant"
    device: str | None = None
    plots: bool = True
    views: str | None = None
    best_epoch: str = "seed"  # fmcache.choices.BEST_EPOCH_RULES

    INTS: ClassVar[dict[str, int]] = {"epochs": 1, "batch_size": 1, "subset_repeats": 1}
    FLOATS: ClassVar[tuple[str, ...]] = ("weight_decay",)
    CHOICES: ClassVar[dict[str, tuple]] = {
        **LabelledSpec.CHOICES,
        "schedule": SCHEDULES,
        "views": VIEWS,
        "best_epoch": tuple(BEST_EPOCH_RULES),
    }

    def check(self) -> None:
        lrs = as_floats("lrs", self.lrs, example="1e-5,1e-4")
        if any(not lr > 0 for lr in lrs) or len(set(lrs)) != len(lrs):
            raise FmcacheError(f"--lrs must be distinct positive numbers, got {list(lrs)}")
        self.set("lrs", lrs)
        self.set("seeds", as_seeds(self.seeds))
        if self.weight_decay < 0:
            raise FmcacheError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        self.set("weight_decay", float(self.weight_decay))  # a float in the settings hash, as it always was
        _layer_text(self)
        super().check()


@dataclass(frozen=True)
class ProbeSpec(HeadGridSpec):
    """``fmcache probe --head linear``: the LR × seed grid of linear heads on pooled features."""

    pool: str = "auto"
    sklearn: bool = False
    # the seed trains its linear layer on the raw feature; z-scoring with train statistics is fmcache's option
    standardize: bool = False

    def check(self) -> None:
        if self.head != "linear":
            raise FmcacheError(f"unknown --head '{self.head}' for the linear probe; use linear, deit or attentive")
        super().check()


@dataclass(frozen=True)
class TokenProbeSpec(HeadGridSpec):
    """``fmcache probe --head deit|attentive``: token heads on cached token layers (the decapitation study)."""

    head: str = "deit"
    head_weights: str | None = None  # deit: "imagenet" (timm's DeiT-B/16, the seed's; default) or a file
    head_random_init: bool = False
    head_depth: int = DEIT_DEPTH
    token_norm: str = "seed"
    preload: str = "auto"
    heads_per_pass: int = 0
    resume: bool = True
    workers: int = 2

    INTS: ClassVar[dict[str, int]] = {**HeadGridSpec.INTS, "heads_per_pass": 0, "workers": 0, "head_depth": 1}
    CHOICES: ClassVar[dict[str, tuple]] = {
        **HeadGridSpec.CHOICES,
        "head": TOKEN_HEADS,
        "token_norm": TOKEN_NORMS,
        "preload": PRELOAD,
    }

    def check(self) -> None:
        super().check()
        self.set("head_weights", as_text(self.head_weights))
        if self.head == "attentive" and self.head_weights is not None:
            raise FmcacheError("--head-weights applies to --head deit; the attentive head has no pretrained weights")
        check_head_depth(self.head, self.head_depth)
        if self.head_random_init and self.head_weights is not None:
            raise FmcacheError("pass either --head-weights or --head-random-init, not both")


@dataclass(frozen=True)
class TransferSpec(LabelledSpec):
    """``fmcache transfer``: the heads a frozen result selected, applied with no refit to another cache (``cache``, the
    target) of the same model, weights, transform, layer and pool, scored by the target's metric over mapped classes.

    ``out`` None writes into the source result's own results tree; ``uncertain`` None takes the source result's label
    policy where the target has uncertain labels too.
    """

    out: Path | None = None
    result: Path | None = None  # the source result's folder (or its result.json); required
    label_map: Path | None = None  # None: the identity (same dataset) or the registry's shipped map
    drop_overlap: bool = False  # drop target samples found among the source's train/val ones instead of refusing
    near_duplicate_bits: int = DEFAULT_NEAR_BITS
    source_cache: Path | None = None  # None: the cache the result records
    metric: str | None = None  # None: the target dataset's paper metric
    device: str | None = None  # token and linear heads: auto, cpu or cuda
    use_gpu: bool | None = None  # k-NN: FAISS on GPU when present (None); False: --cpu

    PATHS: ClassVar[tuple[str, ...]] = ("cache", "out", "result", "label_map", "source_cache")
    INTS: ClassVar[dict[str, int]] = {"near_duplicate_bits": 0}

    def check(self) -> None:
        if self.result is None:
            raise FmcacheError("transfer needs RESULT: the folder of a knn or probe result (it holds result.json)")
        if self.result.name == RESULT_JSON:
            self.set("result", self.result.parent)
        check_near_bits(self.near_duplicate_bits)
        self.set("drop_overlap", bool(self.drop_overlap))


@dataclass(frozen=True)
class CkaSpec(CacheSpec):
    """``fmcache cka``: linear CKA between the layers of one cache, or of two caches aligned by sample id."""

    cache_b: Path | None = None
    layers: str = "all"
    layers_b: str | None = None
    pool: str = "auto"
    split: str = "test"
    estimator: str | None = None  # None: exact for pooled features, minibatch for token maps
    debiased: bool = True
    batch_size: int = 256
    plots: bool = True
    device: str | None = None

    PATHS: ClassVar[tuple[str, ...]] = ("cache", "cache_b", "out")
    INTS: ClassVar[dict[str, int]] = {"batch_size": 1}
    CHOICES: ClassVar[dict[str, tuple]] = {"split": CKA_SPLITS, "estimator": (None, *CKA_ESTIMATORS)}

    def check(self) -> None:
        _layer_text(self, "layers")
        _layer_text(self, "layers_b")
