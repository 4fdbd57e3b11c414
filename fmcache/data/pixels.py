"""The deterministic prefix of the seed's transforms (decode → resize → center crop) as uint8 crops, and datasets that
start the rest of the transforms from such a crop instead of the image file.

Every train and eval transform of :mod:`fmcache.data.transforms` begins with ``Resize((r, r))`` then
``CenterCrop(img_size)``, which draw no random number. A crop stored as uint8 pixels (``fmcache pixels``) and turned
back into the same PIL image therefore enters the remaining steps (:func:`transform_suffix`) exactly as the decoded
image's crop did: for the same RNG state the result is bit-identical (``tests/test_pixels.py`` shows it for every
dataset layout). A grayscale dataset's crops have three equal channels (:func:`fmcache.data.images.load_image`
repeats the gray one); one is stored and repeated on the way back.

Where the crops come from is a *source*: anything with ``read(global_index) -> (H, W, C) uint8`` (a pixel cache's
reader, :class:`fmcache.cache.pixels.PixelReader`, or :class:`DecodedCrops`, which decodes the image file).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from fmcache.data.images import load_image
from fmcache.data.index import DatasetIndex
from fmcache.data.torch_dataset import ImageDataset
from fmcache.data.transforms import INTERPOLATIONS, default_resize
from fmcache.errors import FmcacheError

PREFIX_STEPS = 2  # Resize, CenterCrop: the transforms' deterministic first steps


class CropSource(Protocol):
    def read(self, sample_id: int) -> np.ndarray: ...


def prefix_spec(img_size: int, resize: int | None = None, interpolation: str = "bilinear") -> dict:
    """The prefix a pixel cache stores (its key's ``prefix``): resize to r × r (antialiased), center crop."""
    if interpolation not in INTERPOLATIONS:
        raise FmcacheError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
    resize = default_resize(img_size) if resize is None else int(resize)
    if resize < img_size:
        raise FmcacheError(f"resize ({resize}) must be at least img_size ({img_size}); the crop would pad")
    return {"resize": [resize, resize], "crop": int(img_size), "interpolation": interpolation, "antialias": True}


def prefix_of(transform_desc: dict) -> dict:
    """The prefix part of a transform description (:func:`fmcache.data.transforms.build_transform`'s)."""
    return {k: transform_desc[k] for k in ("resize", "crop", "interpolation")} | {"antialias": True}


def prefix_transform(prefix: dict) -> T.Compose:
    """PIL image → PIL crop, exactly the first two steps of the train and eval transforms."""
    return T.Compose(
        [
            T.Resize(tuple(prefix["resize"]), interpolation=INTERPOLATIONS[prefix["interpolation"]], antialias=True),
            T.CenterCrop(prefix["crop"]),
        ]
    )


def transform_suffix(transform: Callable, prefix: dict) -> T.Compose:
    """The steps of ``transform`` (a ``T.Compose`` of :mod:`fmcache.data.transforms`) after its resize and center crop,
    which must be ``prefix``'s: a crop stored with another prefix would silently feed other pixels."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < PREFIX_STEPS or not isinstance(steps[0], T.Resize) or not isinstance(steps[1], T.CenterCrop):
        raise FmcacheError("this transform does not start with resize and center crop; it cannot start from pixels")
    resize, crop = steps[0], steps[1]
    size = [int(v) for v in (resize.size if isinstance(resize.size, (list, tuple)) else [resize.size] * 2)]
    mode = next(name for name, m in INTERPOLATIONS.items() if m == resize.interpolation)
    have = {"resize": size, "crop": int(crop.size[0]), "interpolation": mode, "antialias": bool(resize.antialias)}
    want = {**prefix, "resize": [int(v) for v in prefix["resize"]], "crop": int(prefix["crop"])}
    if have != want:
        raise FmcacheError(f"the transform's prefix {have} is not the pixel cache's {want}")
    return T.Compose(steps[PREFIX_STEPS:])


def crop_array(image: Image.Image, channels: int, path: object = "") -> np.ndarray:
    """A PIL RGB crop as (H, W, channels) uint8; one channel only when the three are equal (else one clear error)."""
    arr = np.array(image.convert("RGB") if image.mode != "RGB" else image)  # a writable copy
    if channels == 3:
        return np.ascontiguousarray(arr)
    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        raise FmcacheError(
            f"image {path} has colour (its channels differ) in a dataset stored as one channel; write the pixel "
            "cache with --channels 3"
        )
    return np.ascontiguousarray(arr[..., :1])


def crop_image(arr: np.ndarray) -> Image.Image:
    """The PIL RGB image a stored crop came from (a one-channel crop is repeated, as ``load_image`` repeats it)."""
    if arr.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[..., 0])).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(arr))


class DecodedCrops:
    """A crop source that decodes the image file and applies the prefix (what a pixel cache stores)."""

    def __init__(self, index: DatasetIndex, prefix: dict, channels: int):
        self.index, self.prefix, self.channels = index, prefix, channels
        self.transform = prefix_transform(prefix)

    def read(self, sample_id: int) -> np.ndarray:
        path = self.index.paths[int(sample_id)]
        return crop_array(self.transform(load_image(path)), self.channels, path)


class CroppedImageDataset(ImageDataset):
    """Items ``(transform(crop image), global_index)``: :class:`ImageDataset` with the crop read from ``source``
    and ``transform`` the steps after the prefix (:func:`transform_suffix`)."""

    def __init__(self, index: DatasetIndex, indices: np.ndarray, transform: Callable, source: CropSource):
        super().__init__(index, indices, transform)
        self.source = source

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        global_index = int(self.indices[i])
        return self.transform(crop_image(self.source.read(global_index))), global_index


class CropDataset(ImageDataset):
    """Items ``(crop, global_index)`` with the crop a (H, W, C) uint8 tensor, for augmentation on the device."""

    def __init__(self, index: DatasetIndex, indices: np.ndarray, source: CropSource):
        super().__init__(index, indices, transform=_unchanged)
        self.source = source

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        global_index = int(self.indices[i])
        return torch.from_numpy(self.source.read(global_index)), global_index


def _unchanged(image):
    return image
