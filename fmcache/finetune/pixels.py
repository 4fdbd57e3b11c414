"""Fine-tuning's data path: image files or a pixel cache (``--pixels``), the augmentation in the loader or on the
device (``--augment``).

- ``--augment cpu`` (default): the seed's PIL augmentation per image in the DataLoader. From a pixel cache the
  loader starts at the stored center crop instead of decoding the file; the same seed gives bit-identical batches
  (:mod:`fmcache.data.pixels`).
- ``--augment device``: the loader hands over uint8 crops (pinned, copied without blocking) and
  :class:`DeviceBatches` draws the random part for the whole batch where the model runs
  (:class:`fmcache.data.device_augment.DeviceAugment`), seeded per (run seed, epoch, step, rank), so a resumed run
  draws the same; val and test crops are only normalised (and, with ``--gray seed``, reduced to their red channel).
  The crops come from the pixel cache, or are decoded from the files when there is none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch

from fmcache.data.device_augment import DeviceAugment
from fmcache.data.index import DatasetIndex
from fmcache.data.pixels import CropDataset, CroppedImageDataset, DecodedCrops, prefix_of, transform_suffix
from fmcache.data.torch_dataset import ImageDataset
from fmcache.errors import FmcacheError
from fmcache.extract.pixels import find_pixels
from fmcache.finetune.spec import FinetuneSpec


class DeviceBatches:
    """What the training loop does to a batch of uint8 (B, H, W, C) crops once it is on the device."""

    def __init__(self, img_size: int, mean, std, gray: str):
        self.augment = DeviceAugment(img_size, mean, std, gray=gray)
        self.gray = gray
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def train(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """The seed's random augmentation of the batch, drawn from ``seed`` alone, normalised (float32 NCHW)."""
        return self.augment(x.permute(0, 3, 1, 2), seed)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """ToTensor + Normalize of the crops, as the eval transform after its center crop (float32 NCHW)."""
        mean, std = self._stats(x.device)
        images = x.permute(0, 3, 1, 2)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        out = images.contiguous().to(torch.float32).div_(255).sub_(mean).div_(std)
        if self.gray == "seed":
            out[:, 1:] = 0
        return out

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._norm:
            a = self.augment
            self._norm[device] = tuple(
                torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device) for v in (a.mean, a.std)
            )
        return self._norm[device]

    def spec(self) -> dict:
        return self.augment.spec()


@dataclass
class DataPath:
    """The datasets of a run's splits, and what the result records about where their pixels came from."""

    splits: dict[str, ImageDataset]
    source: str  # "images" or "pixels:<key>" (result details.data_source)
    batches: DeviceBatches | None = None  # --augment device: the loop's per-batch transform
    pixel_folder: str | None = None
    hints: list[str] = field(default_factory=list)  # said once at the start, not stored


def image_data_path(
    spec: FinetuneSpec,
    index: DatasetIndex,
    positions: dict[str, np.ndarray],
    transforms: dict[str, object],
    eval_desc: dict,
    norm: tuple,
    img_size: int,
    fingerprint: str,
) -> DataPath:
    """The datasets of an image run (``transforms``: train, eval) under ``spec.pixels`` and ``spec.augment``."""
    prefix = prefix_of(eval_desc)
    hints: list[str] = []
    reader, folder = None, None
    if spec.pixels != "off":
        match = find_pixels(spec.cache_root, index, prefix, spec.limit, fingerprint)
        if match.reader is None and spec.pixels == "on":
            raise FmcacheError(f"--pixels on: {match.why}")
        if match.reader is not None:
            reader, folder = match.reader, str(match.folder)
            hints += _version_hint(reader)
        elif match.folder is not None:  # pixel caches exist, none fits: say why
            hints.append(f"note: reading the image files: {match.why}")
    source = f"pixels:{reader.key}" if reader is not None else "images"
    if spec.augment == "cpu":
        if reader is None:
            splits = {s: ImageDataset(index, positions[s], transforms[_kind(s)]) for s in positions}
        else:
            suffixes = {k: transform_suffix(t, prefix) for k, t in transforms.items()}
            splits = {s: CroppedImageDataset(index, positions[s], suffixes[_kind(s)], reader) for s in positions}
        return DataPath(splits, source, None, folder, hints)
    crops = reader if reader is not None else DecodedCrops(index, prefix, channels=3)
    splits = {s: CropDataset(index, positions[s], crops) for s in positions}
    return DataPath(splits, source, DeviceBatches(img_size, norm[0], norm[1], spec.gray), folder, hints)


def _kind(split: str) -> str:
    return "train" if split == "train" else "eval"


def _version_hint(reader) -> list[str]:
    """A pixel cache written under another Pillow resizes as that Pillow did: said, since bit-identity with the
    images holds for the same resampling code only."""
    wrote = (reader.manifest.get("versions") or {}).get("pillow")
    try:
        here = version("pillow")
    except PackageNotFoundError:
        here = None
    if wrote and here and wrote != here:
        return [f"note: pixel cache {reader.folder} was written with Pillow {wrote}, this run has {here}"]
    return []
