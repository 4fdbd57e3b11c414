"""Evaluation transform (resize, center crop, normalise) and the paper's train augmentations."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
import torchvision.transforms as T
from PIL import Image

from fmcache.choices import GRAY_MODES
from fmcache.data.corruptions import Corruption
from fmcache.errors import FmcacheError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

INTERPOLATIONS: dict[str, T.InterpolationMode] = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "lanczos": T.InterpolationMode.LANCZOS,
}

# The seed's RandomResizedCrop: scale (0.8, 1.2), torchvision's default ratio (3/4, 4/3), bilinear. A crop cannot
# cover more than the whole image, so torchvision rejects the draws above 1 and, after 10 failures, falls back to a
# center crop of the whole image: about 12 % of the seed's crops are the full image. fmcache uses torchvision's class
# with exactly these arguments, so it draws the seed's boxes, fallback included (tests/test_transforms_protocol.py).
CROP_SCALE: tuple[float, float] = (0.8, 1.2)
CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)


def seed_random_resized_crop(img_size: int) -> T.RandomResizedCrop:
    """RandomResizedCrop(img_size, scale=(0.8, 1.2)) as the seed builds it (see :data:`CROP_SCALE`)."""
    return T.RandomResizedCrop(
        img_size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=T.InterpolationMode.BILINEAR, antialias=True
    )


# How a grayscale scan meets a model trained on RGB. "repeat" (fmcache's default) feeds the one channel three times.
# "seed" reproduces the original code, which keeps one channel and cuts the first layer down to its red-channel
# kernel: a first layer is linear in its input channels, so that equals feeding (gray, 0, 0) after normalisation.
def check_gray(gray: str) -> str:
    if gray not in GRAY_MODES:
        raise FmcacheError(f"unknown --gray {gray!r}; choose one of {', '.join(GRAY_MODES)}")
    return gray


def _red_channel_only(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    out[0] = x[0]
    return out


def default_resize(img_size: int) -> int:
    """The resize before the center crop that keeps the paper's 256→224 framing at any input size."""
    return round(img_size * 256 / 224)


def _check_size(value: object, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FmcacheError(f"{option} must be a positive integer, got {value!r}")
    return value


def check_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    """Mean/std as three floats each (a single value is repeated); std must be positive."""
    try:
        mean_l, std_l = [float(m) for m in mean], [float(s) for s in std]
    except (TypeError, ValueError) as exc:
        raise FmcacheError(f"mean/std must be numbers, got mean={mean!r} std={std!r}") from exc
    mean_l, std_l = (mean_l * 3 if len(mean_l) == 1 else mean_l), (std_l * 3 if len(std_l) == 1 else std_l)
    if len(mean_l) != 3 or len(std_l) != 3 or min(std_l) <= 0:
        raise FmcacheError(f"mean/std need 1 or 3 values each and std > 0, got mean={mean!r} std={std!r}")
    return mean_l, std_l


def _interpolation(name: str) -> T.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise FmcacheError(f"unknown interpolation {name!r}; choose one of {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def build_transform(
    img_size: int = 224,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    gray: str = "repeat",
    corruption: Corruption | None = None,
) -> tuple[Callable[[Image.Image], torch.Tensor], dict]:
    """The evaluation transform and a JSON-able dict that fully describes it (for the cache key).

    Resize to a ``resize``×``resize`` square (default ``round(img_size*256/224)``, antialiased), center crop
    ``img_size``, convert to a float32 CHW tensor in [0, 1], normalise with ``mean``/``std``. ``gray="seed"``
    then keeps only the first channel (see :data:`GRAY_MODES`); use it for grayscale datasets only. A
    ``corruption`` (:mod:`fmcache.data.corruptions`) acts on the crop, before the tensor conversion.
    """
    gray = check_gray(gray)
    img_size = _check_size(img_size, "img_size")
    resize = default_resize(img_size) if resize is None else _check_size(resize, "resize")
    if resize < img_size:
        raise FmcacheError(f"resize ({resize}) must be at least img_size ({img_size}); the crop would pad")
    mean_l, std_l = check_norm(mean, std)
    transform = T.Compose(
        [
            T.Resize((resize, resize), interpolation=_interpolation(interpolation), antialias=True),
            T.CenterCrop(img_size),
            *([corruption] if corruption is not None else []),
            T.ToTensor(),
            T.Normalize(mean_l, std_l),
            *([T.Lambda(_red_channel_only)] if gray == "seed" else []),
        ]
    )
    steps = ["resize", "center_crop", *(["corrupt"] if corruption else []), "to_tensor", "normalize"]
    spec = {
        "steps": [*steps, *(["gray_seed"] if gray == "seed" else [])],
        "resize": [resize, resize],
        "crop": img_size,
        "interpolation": interpolation,
        "antialias": True,
        "mean": mean_l,
        "std": std_l,
        # only when asked for, so every existing key stays the same
        **({"corrupt": corruption.describe()} if corruption else {}),
    }
    return transform, spec


def train_augmentation(
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    gray: str = "repeat",
) -> Callable[[Image.Image], torch.Tensor]:
    """PROTOCOLS.md train augmentations, in the seed's order.

    The seed first resizes and center-crops exactly as the evaluation transform does (256 → 224 at the paper's
    size), then draws RandomResizedCrop(img_size, scale=(0.8, 1.2)) from that crop (:func:`seed_random_resized_crop`,
    torchvision's full-image fallback included), vertical and horizontal flips each with p=0.5,
    ColorJitter(0.2, 0.2, 0.1, 0.1) with p=0.8, then normalises. Randomness comes from torch's RNG; seed it (and each DataLoader worker) for
    reproducible views.
    """
    img_size = _check_size(img_size, "img_size")
    mean_l, std_l = check_norm(mean, std)
    gray = check_gray(gray)
    resize = default_resize(img_size)
    return T.Compose(
        [
            T.Resize((resize, resize), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(img_size),
            seed_random_resized_crop(img_size),
            T.RandomVerticalFlip(p=0.5),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.2, 0.2, 0.1, 0.1)], p=0.8),
            T.ToTensor(),
            T.Normalize(mean_l, std_l),
            *([T.Lambda(_red_channel_only)] if gray == "seed" else []),
        ]
    )


def train_augmentation_spec(
    img_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    gray: str = "repeat",
) -> dict:
    """JSON-able description of :func:`train_augmentation` (for the key of cached augmented views)."""
    mean_l, std_l = check_norm(mean, std)
    gray = check_gray(gray)
    steps = ["resize", "center_crop", "random_resized_crop", "vflip", "hflip", "color_jitter", "to_tensor"]
    return {
        "steps": [*steps, "normalize", *(["gray_seed"] if gray == "seed" else [])],
        "resize": [default_resize(_check_size(img_size, "img_size"))] * 2,
        "crop": _check_size(img_size, "img_size"),
        "crop_scale": list(CROP_SCALE),
        "crop_ratio": [round(r, 6) for r in CROP_RATIO],
        "flip_p": 0.5,
        "color_jitter": [0.2, 0.2, 0.1, 0.1],
        "color_jitter_p": 0.8,
        "interpolation": "bilinear",
        "mean": mean_l,
        "std": std_l,
    }


def view_seed(sample_id: int, view: int, seed: int) -> int:
    """The RNG seed of augmented view ``view`` of global sample ``sample_id`` under a cache's views ``seed``.

    A hash of the three numbers rather than one running generator: a view depends on nothing else, so a resumed,
    distributed or re-batched extraction draws every view bit for bit the same.
    """
    digest = hashlib.sha256(f"fmcache-view:{int(seed)}:{int(sample_id)}:{int(view)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: torch.manual_seed takes any non-negative int64


def draw_view(augment: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int) -> torch.Tensor:
    """One draw of ``augment`` (e.g. :func:`train_augmentation`) on ``image``, fully determined by ``seed``.

    torchvision's random transforms draw from torch's global CPU RNG, so the draw runs inside a forked RNG state:
    the caller's RNG (and every other view) is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return augment(image)
