"""``fmcache extract``'s request: one frozen dataclass, filled from flags, ``--config`` or the grid, checked once.

It imports no torch, so the CLI reads its defaults for ``--help`` and the grid checks a YAML's ``extract:`` against
it at no cost; :mod:`fmcache.extract.plan` turns it into the samples, the key and the cache folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fmcache.choices import (
    COMPRESSIONS,
    DTYPES,
    FINGERPRINTS,
    GRAY_MODES,
    INTERPOLATIONS,
    NORMS,
    ON_BAD_IMAGE,
    PAPER_TOKENS,
    PRECISIONS,
)
from fmcache.config import Spec
from fmcache.errors import FmcacheError


@dataclass(frozen=True)
class ExtractSpec(Spec):
    """Everything ``fmcache extract`` needs; a YAML config or the CLI flags fill it in."""

    dataset: str
    data_root: Path
    model: str
    weights: Path | None = None
    random_init: bool = False
    img_size: int | None = None
    resize: int | None = None
    interpolation: str = "bilinear"
    gray: str = "repeat"  # repeat | seed (grayscale datasets: the seed's red-channel kernel, see data/transforms.py)
    norm: str = "dataset"  # dataset | model; csv/imagefolder have no dataset statistics and use the model's
    tokens: str = "none"  # none | last | all | comma-separated 1-based layer numbers
    dtype: str = "fp16"
    precision: str = (
        "auto"  # the forward's: auto (bf16 autocast on a GPU, fp32 on a CPU), fp16 (the seed's), bf16, fp32
    )
    batch_size: int = 64
    workers: int = 2
    shard_size: int = 1024
    cache_root: Path = Path("cache")
    limit: int | None = None
    on_bad_image: str = "error"
    compression: str | None = None  # None or gzip / lzf
    compile: bool = False
    device: str | None = None
    fingerprint: str = "stat"  # stat | content; content hashes every image's bytes into the key
    verify: bool = False  # hash-check every finished shard before trusting or resuming the cache
    allow_empty_split: bool = False  # an empty train/val/test split is refused unless the user means it
    views: int = 0  # K seeded augmented views of every train image, besides its center crop (cache/views.py)
    corrupt: str | None = None  # NAME:SEVERITY: a test-split cache of corrupted images (data/corruptions.py)
    dataset_options: dict = field(default_factory=dict)
    arch_overrides: dict = field(default_factory=dict)

    PATHS: ClassVar[tuple[str, ...]] = ("data_root", "weights", "cache_root")
    INTS: ClassVar[dict[str, int]] = {
        "batch_size": 1,
        "shard_size": 1,
        "workers": 0,
        "views": 0,
        "img_size": 1,
        "resize": 1,
        "limit": 1,
    }
    CHOICES: ClassVar[dict[str, tuple]] = {
        "norm": NORMS,
        "precision": PRECISIONS,
        "dtype": DTYPES,
        "on_bad_image": ON_BAD_IMAGE,
        "compression": COMPRESSIONS,
        "interpolation": INTERPOLATIONS,
        "fingerprint": FINGERPRINTS,
        "gray": GRAY_MODES,
    }

    def check(self) -> None:
        if self.tokens is not None and not isinstance(self.tokens, str):
            self.set("tokens", str(self.tokens))  # YAML reads `tokens: 12` as a number
        if self.device not in (None, "auto", "cpu") and not str(self.device).startswith("cuda"):
            raise FmcacheError(f"unknown --device '{self.device}'; use auto, cpu or cuda")
        parse_tokens(self.tokens)
        if self.corrupt is not None and self.views:
            raise FmcacheError("--corrupt caches the test split only and --views the train split: pass one of them")


def parse_tokens(tokens: str) -> str | list:
    """Normalise the --tokens request: 'none', 'last', 'all', or a list of 1-based layer numbers, 'last', 'all'
    and 'paper' (sorted numbers first; the one-word requests stay strings, as the keys of existing caches)."""
    text = str(tokens).strip().lower()
    if text in ("none", "last", "all", ""):
        return text or "none"
    parts = [t.strip() for t in text.split(",") if t.strip()]
    words = [p for p in ("last", "all", PAPER_TOKENS) if p in parts]
    try:
        layers = sorted({int(t) for t in parts if t not in words})
    except ValueError:
        raise FmcacheError(
            f"bad --tokens '{tokens}'; use none, last, all, paper or layer numbers like 4,8,12 (e.g. last,paper)"
        ) from None
    if (layers and layers[0] < 1) or not (layers or words):
        raise FmcacheError(f"bad --tokens '{tokens}'; layer numbers start at 1")
    return [*layers, *words] if words else layers


def token_layers(request: str | list, num_layers: int) -> list[int]:
    """The 1-based layers whose tokens a request caches (``paper`` is not a layer: see :func:`wants_paper_tokens`)."""
    if request == "none":
        return []
    if request == "last":
        return [num_layers]
    if request == "all":
        return list(range(1, num_layers + 1))
    numbers = {n for n in request if isinstance(n, int)}
    if "all" in request:
        numbers |= set(range(1, num_layers + 1))
    if "last" in request:
        numbers.add(num_layers)
    bad = [n for n in sorted(numbers) if n > num_layers]
    if bad:
        raise FmcacheError(f"--tokens asks for layer {bad[0]} but the model has {num_layers} layers")
    return sorted(numbers)


def wants_paper_tokens(request: str | list) -> bool:
    return isinstance(request, list) and PAPER_TOKENS in request
