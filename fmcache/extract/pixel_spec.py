"""``fmcache pixels``'s request: one frozen dataclass, filled from flags, ``--config`` or the grid, checked once.

It imports no torch (the CLI reads its defaults for ``--help``); :mod:`fmcache.extract.pixels` plans and writes the
pixel cache it describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fmcache.choices import GRAY_MODES, INTERPOLATIONS, PIXEL_CHANNELS
from fmcache.config import Spec
from fmcache.errors import FmcacheError


@dataclass(frozen=True)
class PixelSpec(Spec):
    """Everything ``fmcache pixels`` needs: which images, and the prefix (resize, center crop) to store."""

    dataset: str
    data_root: Path
    img_size: int = 224  # the crop the model sees (the size a fine-tune's --img-size names)
    resize: int | None = None  # before the crop; default round(img_size * 256 / 224), the seed's framing
    interpolation: str = "bilinear"  # the seed's (train and eval); part of the key
    channels: str = "auto"  # auto: 1 for a grayscale dataset, else 3 (fmcache.choices.PIXEL_CHANNELS)
    gray: str = "repeat"  # checked against the dataset as finetune checks it; it changes no stored byte
    batch_size: int = 64
    workers: int = 4  # processes decoding images: the whole work of this command
    shard_size: int = 1024
    cache_root: Path = Path("cache")
    limit: int | None = None
    verify: bool = False  # hash-check every finished shard before trusting or resuming the cache
    dataset_options: dict = field(default_factory=dict)

    PATHS: ClassVar[tuple[str, ...]] = ("data_root", "cache_root")
    INTS: ClassVar[dict[str, int]] = {
        "img_size": 1,
        "resize": 1,
        "batch_size": 1,
        "workers": 0,
        "shard_size": 1,
        "limit": 1,
    }
    CHOICES: ClassVar[dict[str, tuple]] = {
        "interpolation": INTERPOLATIONS,
        "channels": PIXEL_CHANNELS,
        "gray": GRAY_MODES,
    }

    def check(self) -> None:
        if self.resize is not None and self.resize < self.img_size:
            raise FmcacheError(f"--resize ({self.resize}) must be at least --img-size ({self.img_size})")
