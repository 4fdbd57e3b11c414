"""The seed's random train augmentation on uint8 batches, run where the batch lives (CPU or CUDA).

:func:`~fmcache.data.transforms.train_augmentation` draws, per PIL image, RandomResizedCrop(img_size, scale=(0.8, 1.2)),
vertical and horizontal flips (p=0.5 each), ColorJitter(0.2, 0.2, 0.1, 0.1) with p=0.8, then ToTensor and Normalize.
When the deterministic part (resize, center crop) is cached as uint8 pixels, :class:`DeviceAugment` draws the random
part for a whole (B, C, H, W) batch at once and returns the normalised float32 batch.

What it mirrors, and where it differs from the PIL path:

- **Parameters** follow torchvision's samplers exactly in distribution: RandomResizedCrop's 10 attempts (area fraction
  uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``, the first box that fits wins, else the center-crop
  fallback, which at scale (0.8, 1.2) is about 12 % of the crops), flips, RandomApply, ColorJitter's factor ranges and
  its random order of the four ops (a uniform permutation, as ``torch.randperm(4)``). They are drawn on the CPU from a
  CPU ``torch.Generator`` with a fixed number of draws per sample, so the same seed gives the same boxes and factors on
  every device and no step waits for the GPU. The draws are not the same *stream* as torchvision's (which draws one
  number at a time from the global RNG), so a seed does not reproduce the PIL path's images, only their distribution.
- **Pixels** follow torchvision's *tensor* ops on float32 images in [0, 1] (the ``ToDtype(float32, scale=True)``-first
  recipe): the crop is resized with bilinear, antialiased interpolation (``resized_crop``'s default; a crop of the
  output size is not resized, as torchvision skips that resize), each colour op clamps to [0, 1] and nothing is rounded
  to uint8 between ops. The PIL path rounds to uint8 after the resize and after every colour op (brightness, contrast
  and saturation then differ from ours by at most 1/255), and its hue goes through 8-bit HSV, which moves some
  pixels by up to ~15/255; over a whole draw the two paths differ by about 1.3/255 on average (99 % of pixels
  within 5/255), far inside the jitter's own range.
- Flips are applied to the crop before its resize, which saves a copy: bilinear resizing commutes with flips, up to
  the float32 rounding of interpolate's pixel positions (differences under 3e-5).

Grayscale-origin batches (one channel) are repeated to three channels, as fmcache's default ``gray="repeat"`` feeds
them. ``gray="seed"`` mirrors :data:`~fmcache.data.transforms.GRAY_MODES`'s seed mode as transforms.py builds it:
the same three-channel augmentation, then channels 1 and 2 are zeroed after normalisation, so a full first layer sees
(gray, 0, 0), which equals the seed's one-channel input to a first layer cut to its red kernel.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmcache.data.transforms import CROP_RATIO, CROP_SCALE, GRAY_MODES, IMAGENET_MEAN, IMAGENET_STD, check_norm
from fmcache.errors import FmcacheError

# ColorJitter(0.2, 0.2, 0.1, 0.1) as the seed builds it, and RandomApply's p.
SEED_JITTER: tuple[float, float, float, float] = (0.2, 0.2, 0.1, 0.1)
SEED_JITTER_P = 0.8
SEED_FLIP_P = 0.5

# ColorJitter's op ids, the order of its arguments; ``AugmentParams.order`` lists them in application order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# torchvision's RandomResizedCrop tries this many boxes before its center-crop fallback.
CROP_ATTEMPTS = 10
# Samples processed at a time (DeviceAugment's ``chunk``): on the CPU a few, whose temporaries stay in cache and
# are reused by the allocator (fresh multi-MB tensors cost page faults); on a GPU as many as keep the colour ops'
# temporaries near 1 GB (the whole batch at 224 px), as fewer, larger kernels launch faster.
CPU_CHUNK = 4
GPU_CHUNK_PIXELS = 2**24
# The ITU-R 601 luma weights torchvision's rgb_to_grayscale uses (they sum to 0.9999, not 1).
_LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentParams:
    """The random draws for one batch of ``n`` samples (CPU tensors, one row per sample).

    ``top``/``left``/``height``/``width`` are the crop boxes in input pixels (int64). ``vflip``/``hflip``/``jitter``
    are bool. ``order`` (n, 4) lists the colour op ids (:data:`BRIGHTNESS`, :data:`CONTRAST`, :data:`SATURATION`,
    :data:`HUE`) in the order they are applied; ``factors`` (n, 4) float32 holds each op's factor indexed by op id
    (brightness, contrast, saturation multipliers; hue shift in turns). Build one by hand to apply fixed parameters.
    """

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    vflip: torch.Tensor
    hflip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor

    def __len__(self) -> int:
        return int(self.top.shape[0])


class DeviceAugment:
    """The seed's random train augmentation for uint8 batches already on the training device.

    ``DeviceAugment(img_size, mean, std)(images, generator)`` takes ``images`` uint8 (B, 3, H, W), or (B, 1, H, W)
    for grayscale-origin pixels, on any device, and returns float32 (B, 3, img_size, img_size) on the same device,
    normalised with ``mean``/``std``. ``H``/``W`` are the cached center crop's size (usually ``img_size``), and may
    differ from each other. ``generator`` is a CPU ``torch.Generator`` or an int seed; it alone decides every draw,
    so a fixed seed per (run, epoch, step, rank) makes a resumed run bit-identical on the same device.

    The defaults are the seed's: crop ``scale`` (0.8, 1.2) and ``ratio`` (3/4, 4/3), ``flip_p`` 0.5 for each flip,
    ``jitter`` (brightness, contrast, saturation, hue) = (0.2, 0.2, 0.1, 0.1) applied with ``jitter_p`` 0.8. ``chunk``
    samples are processed at a time (default :data:`CPU_CHUNK` on the CPU; on a GPU the whole batch up to
    :data:`GPU_CHUNK_PIXELS` output pixels); it changes speed and memory, never the result.
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
        jitter: tuple[float, float, float, float] = SEED_JITTER,
        jitter_p: float = SEED_JITTER_P,
        flip_p: float = SEED_FLIP_P,
        gray: str = "repeat",
        chunk: int | None = None,
    ) -> None:
        self.img_size = _positive_int(img_size, "img_size")
        self.mean, self.std = check_norm(mean, std)
        self.scale = _range(scale, "scale", low=0.0)
        self.ratio = _range(ratio, "ratio", low=0.0)
        self.jitter = _jitter(jitter)
        self.jitter_p = _probability(jitter_p, "jitter_p")
        self.flip_p = _probability(flip_p, "flip_p")
        if gray not in GRAY_MODES:
            raise FmcacheError(f"unknown gray mode {gray!r}; choose one of {', '.join(GRAY_MODES)}")
        self.gray = gray
        self.chunk = None if chunk is None else _positive_int(chunk, "chunk")
        self._enabled = tuple(op for op in range(4) if self.jitter[op] > 0)  # ColorJitter skips strength-0 ops

    def __call__(self, images: torch.Tensor, generator: torch.Generator | int) -> torch.Tensor:
        """Draw this batch's parameters from ``generator`` and apply them (see the class docstring)."""
        _check_images(images)
        params = self.sample(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, params)

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | int) -> AugmentParams:
        """The random parameters of ``n`` samples of ``height``×``width`` input pixels (CPU tensors).

        Every call consumes the same amount of randomness for a given ``n``, whatever is drawn, in this order:
        crop areas and ratios (n × 10 each), crop offsets, flips, jitter on/off, op orders, factors. Changing that
        order changes every augmented batch of a seed.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise FmcacheError(f"number of samples must be a non-negative integer, got {n!r}")
        height, width = _positive_int(height, "image height"), _positive_int(width, "image width")
        gen = _cpu_generator(generator)
        top, left, h, w = sample_crop_boxes(n, height, width, self.scale, self.ratio, gen)
        flips = torch.rand(n, 2, generator=gen) < self.flip_p
        jitter = torch.rand(n, generator=gen) < self.jitter_p
        # argsort of i.i.d. uniforms is a uniformly random permutation per row, like torch.randperm(4).
        order = torch.rand(n, 4, generator=gen).argsort(dim=1)
        factors = torch.rand(n, 4, generator=gen)
        for op, (low, high) in enumerate(self._factor_ranges()):
            factors[:, op] = low + (high - low) * factors[:, op]
        return AugmentParams(top, left, h, w, flips[:, 0], flips[:, 1], jitter, order, factors)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply fixed ``params`` (from :meth:`sample` or built by hand) to uint8 ``images``."""
        _check_images(images)
        _check_params(params, images.shape)
        n, size, device = images.shape[0], self.img_size, images.device
        out = torch.empty(n, 3, size, size, dtype=torch.float32, device=device)
        # Grayscale-origin pixels: the crop and the jitter run on the one channel (its three copies would be equal
        # at every step: brightness, contrast and saturation act alike on equal channels and hue leaves them as they
        # are), then it is repeated for the per-channel normalisation. Bit-identical to repeating first, a third of
        # the work (the jitter is most of the augmentation's cost).
        work = torch.empty(n, 1, size, size, dtype=torch.float32, device=device) if images.shape[1] == 1 else out
        # The per-sample bookkeeping runs on Python lists: one host copy here instead of many tiny tensor ops.
        boxes = list(zip(*(v.tolist() for v in (params.top, params.left, params.height, params.width)), strict=True))
        flips = list(zip(params.vflip.tolist(), params.hflip.tolist(), strict=True))
        orders = [tuple(o) if on else None for o, on in zip(params.order.tolist(), params.jitter.tolist(), strict=True)]
        factors = params.factors.tolist()
        on_cpu = device.type == "cpu"
        chunk = self.chunk or (CPU_CHUNK if on_cpu else max(1, min(n, GPU_CHUNK_PIXELS // (size * size))))
        mean, std = _to_device(
            [torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (self.mean, self.std)], device
        )
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            part = work[rows]
            crop_flip_resize(images[rows], boxes[rows], flips[rows], out=part)
            color_jitter(part, orders[rows], factors[rows], self._enabled, regroup=not on_cpu)
            if work is not out:
                out[rows] = part  # broadcast over the three channels
            out[rows].sub_(mean).div_(std)  # torchvision's Normalize: subtract, then divide
        if self.gray == "seed":
            out[:, 1:] = 0
        return out

    def spec(self) -> dict:
        """A JSON-able description of this augmentation (for result records and keys)."""
        return {
            "steps": ["random_resized_crop", "vflip", "hflip", "color_jitter", "to_float", "normalize"]
            + (["gray_seed"] if self.gray == "seed" else []),
            "crop": self.img_size,
            "crop_scale": list(self.scale),
            "crop_ratio": [round(r, 6) for r in self.ratio],
            "interpolation": "bilinear",
            "antialias": True,
            "flip_p": self.flip_p,
            "color_jitter": list(self.jitter),
            "color_jitter_p": self.jitter_p,
            "arithmetic": "float32, torchvision tensor ops",
            "mean": self.mean,
            "std": self.std,
        }

    def _factor_ranges(self) -> list[tuple[float, float]]:
        # ColorJitter's ranges: [max(0, 1 - x), 1 + x] for the three multipliers, [-h, h] for the hue shift.
        b, c, s, h = self.jitter
        return [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)]


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = CROP_ATTEMPTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` boxes (top, left, height, width) drawn as torchvision's ``RandomResizedCrop.get_params`` draws one.

    Each sample gets ``attempts`` candidate boxes at once; the first that fits is used, and a sample with none
    gets torchvision's center-crop fallback. Area and ratio draws are float32 like torchvision's and the sizes are
    rounded half to even like Python's ``round``, so the same uniforms give torchvision's box size; the offset is
    ``floor(u * (height - h + 1))``, uniform over the same integers as its ``randint``.
    """
    area = height * width
    log_low, log_high = (float(v) for v in torch.log(torch.tensor(ratio)))
    target = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator).double()
    aspect = torch.exp(torch.empty(n, attempts).uniform_(log_low, log_high, generator=generator)).double()
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)
    offsets = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    fall_h, fall_w = _fallback_size(height, width, ratio)
    h = torch.where(found, h.gather(1, first).squeeze(1), fall_h)
    w = torch.where(found, w.gather(1, first).squeeze(1), fall_w)
    # A uniform integer in [0, height - h], as torch.randint(0, height - h + 1); the fallback is centered.
    top = torch.where(found, (offsets[:, 0] * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(found, (offsets[:, 1] * (width - w + 1)).long(), (width - w) // 2)
    return top, left, h, w


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback box: the whole image, trimmed to the nearest allowed aspect ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return round(width / min(ratio)), width
    if in_ratio > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def crop_flip_resize(
    images: torch.Tensor,
    boxes: Sequence[tuple[int, int, int, int]],
    flips: Sequence[tuple[bool, bool]],
    out: torch.Tensor,
) -> torch.Tensor:
    """Crop, flip and resize each of ``images`` (uint8, (n, C, H, W)) into ``out`` (float32 (n, C, S, S) in [0, 1]).

    ``boxes`` are (top, left, height, width) and ``flips`` (vertical, horizontal) per sample. Equals torchvision's
    ``resized_crop(image / 255, ..., bilinear, antialias=True)`` followed by the flips. One ``interpolate`` per
    sample, as crop sizes vary per sample (grouping equal sizes rarely finds two).
    """
    size = tuple(out.shape[-2:])
    for k, ((top, left, h, w), (vflip, hflip)) in enumerate(zip(boxes, flips, strict=True)):
        crop = images[k, :, top : top + h, left : left + w]
        dims = [d for d, on in ((-2, vflip), (-1, hflip)) if on]
        if dims:
            crop = crop.flip(dims)  # on the uint8 crop: a quarter of the bytes of flipping the float output
        if (h, w) == size:  # torchvision skips a resize to the same size
            out[k].copy_(crop).div_(255)
        else:
            # copy_ then div_: a mixed uint8/float op in one call (torch.div(crop, 255)) is several times slower.
            crop = torch.empty(crop.shape, dtype=out.dtype, device=out.device).copy_(crop).div_(255)
            resized = F.interpolate(crop.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True)
            out[k] = resized[0]
    return out


def color_jitter(
    x: torch.Tensor,
    orders: Sequence[tuple[int, ...] | None],
    factors: Sequence[Sequence[float]],
    enabled: Sequence[int] = (BRIGHTNESS, CONTRAST, SATURATION, HUE),
    regroup: bool = False,
) -> torch.Tensor:
    """ColorJitter in each sample's own op order, in place on ``x`` (float32 (n, 3, H, W) in [0, 1]).

    ``orders[i]`` lists sample i's op ids in application order, or is None to leave the sample as it is;
    ``factors[i]`` holds its four factors by op id. Ops not in ``enabled`` are skipped (ColorJitter's strength 0).
    At each position an op runs once per slice of samples that share it: ``regroup=False`` takes runs of
    neighbouring rows (no copies; best for a few rows on the CPU), ``regroup=True`` first reorders the rows by op
    (one gather per position; few kernel launches for a whole batch on a GPU). Both give the same result.
    """
    if all(order is None for order in orders):
        return x
    if regroup:
        return _jitter_regrouped(x, orders, factors, enabled)
    for position in range(4):
        for op, run in itertools.groupby(range(x.shape[0]), key=lambda i: _op_at(orders[i], position)):
            run = list(run)
            if op is not None and op in enabled:
                values = torch.tensor([factors[i][op] for i in run], dtype=x.dtype)
                _COLOR_OPS[op](x[run[0] : run[-1] + 1], values.to(x.device))
    return x


def _jitter_regrouped(
    x: torch.Tensor,
    orders: Sequence[tuple[int, ...] | None],
    factors: Sequence[Sequence[float]],
    enabled: Sequence[int],
) -> torch.Tensor:
    """color_jitter's ``regroup`` path. The whole plan (gathers, runs, factors) is built on the host first and
    sent in one non-blocking copy: a host-to-GPU copy per op would wait for the GPU each time."""
    rows = [i for i, order in enumerate(orders) if order is not None]
    at = list(range(x.shape[0]))  # at[k]: the row of x that the working copy's row k holds
    gathers, runs, tables = [], [], []
    for position in range(4):
        wanted = sorted(rows if position == 0 else at, key=lambda i: orders[i][position])
        if wanted != at:
            held = {row: k for k, row in enumerate(at)}
            gathers.append([held[i] for i in wanted])
            at = wanted
        else:
            gathers.append(None)
        runs.append([(op, len(list(run))) for op, run in itertools.groupby(orders[i][position] for i in at)])
        tables.append([factors[i] for i in at])
    gathered = any(g is not None for g in gathers)
    index = torch.tensor([g if g is not None else at for g in gathers] + [at], dtype=torch.long)
    index, table = _to_device([index, torch.tensor(tables, dtype=x.dtype)], x.device)
    y = x
    for position in range(4):
        if gathers[position] is not None:
            y = y.index_select(0, index[position])
        begin = 0
        for op, count in runs[position]:
            if op in enabled:
                _COLOR_OPS[op](y[begin : begin + count], table[position, begin : begin + count, op])
            begin += count
    if gathered:
        x.index_copy_(0, index[4], y)
    return x


def _to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU tensors on ``device`` without waiting for it: pinned memory and non-blocking copies on a GPU."""
    if device.type == "cpu":
        return tensors
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def _op_at(order: tuple[int, ...] | None, position: int) -> int | None:
    return None if order is None else order[position]


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's float ``rgb_to_grayscale`` of (N, 3, H, W): (N, 1, H, W), 0.2989 R + 0.587 G + 0.114 B. A
    one-channel (N, 1, H, W) batch stands for its three equal channels: the same products and sums, bit for bit."""
    if x.shape[1] == 1:
        return (x * _LUMA[0]).add_(x, alpha=_LUMA[1]).add_(x, alpha=_LUMA[2])
    return (x[:, 0:1] * _LUMA[0]).add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


def adjust_brightness(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """In place: ``clamp(f * x, 0, 1)`` per sample, as torchvision's ``adjust_brightness`` on a float image."""
    return x.mul_(_per_sample(factors)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """In place: blend each sample with the mean of its own grayscale image, ``clamp(f * x + (1 - f) * m, 0, 1)``."""
    mean = grayscale(x).mean(dim=(1, 2, 3))
    return x.mul_(_per_sample(factors)).add_(_per_sample((1 - factors) * mean)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """In place: blend each sample with its grayscale image, ``clamp(f * x + (1 - f) * gray, 0, 1)``."""
    gray = grayscale(x).mul_(_per_sample(1 - factors))
    return x.mul_(_per_sample(factors)).add_(gray).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """In place: rotate each sample's hue by ``shift`` turns (RGB → HSV, h += shift mod 1, → RGB), as torchvision.

    Value (the max channel) and the channel range (max - min) are kept; only where each channel sits between them
    moves. Each output channel is written straight from the shifted hue ``H`` (in sixths of a turn) with the closed
    form of HSV → RGB, ``c = max - range * clamp(||H - m| - 3| - 1, 0, 1)`` for H in [0, 6) and m = 3, 5, 1 for R, G,
    B, which gives torchvision's v/p/q/t selection. Branches are 0/1 masks that multiply (exact for 0 and 1), as
    ``torch.where`` and ``remainder`` run several times slower than arithmetic on the CPU.
    """
    if x.shape[1] == 1:  # three equal channels: range 0, so every pixel keeps its value (exactly, as below)
        return x
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    span = torch.minimum(r, g)
    torch.minimum(span, b, out=span)
    torch.sub(maxc, span, out=span)
    # Which channel holds the max, with torchvision's tie-break: red, then green, then blue.
    is_r = torch.eq(maxc, r, out=torch.empty_like(maxc))  # float 0/1 straight from the comparison
    is_g = torch.eq(maxc, g, out=torch.empty_like(maxc))
    is_g.addcmul_(is_g, is_r, value=-1)
    is_b = (1 - is_r).sub_(is_g)
    # Hue in sixths of a turn, in [-1, 5): the max channel's sector offset (0, 2, 4) + where the pixel sits in it.
    hue6 = torch.sub(g, b).mul_(is_r)
    hue6.addcmul_(torch.sub(b, r), is_g).addcmul_(torch.sub(r, g), is_b)
    span_or_one = torch.eq(span, 0, out=torch.empty_like(span)).add_(span)  # gray (range 0): hue 0, as torchvision
    hue6.div_(span_or_one)
    hue6.add_(is_g, alpha=2.0).add_(is_b, alpha=4.0).add_(shifts.reshape(-1, 1, 1) * 6)
    hue6.sub_(torch.floor(hue6 / 6).mul_(6))  # wrap into [0, 6)
    weight = torch.empty_like(x)
    for channel, center in enumerate(_HUE_CENTERS):
        torch.sub(hue6, center, out=weight[:, channel])
    weight.abs_().sub_(3).abs_().sub_(1).clamp_(0, 1)
    return torch.addcmul(maxc.unsqueeze(1), span.unsqueeze(1), weight, value=-1, out=x)


# Per output channel (R, G, B): the hue, in sixths of a turn, at the middle of the arc where that channel is at the
# minimum (it rises to the max over the next and previous sixth).
_HUE_CENTERS = (3.0, 5.0, 1.0)


_COLOR_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation, HUE: adjust_hue}


def _check_images(images: object) -> None:
    if not isinstance(images, torch.Tensor):
        raise FmcacheError(f"device augmentation takes a uint8 tensor batch, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise FmcacheError(
            f"device augmentation takes uint8 pixels (the cached center crops), got {images.dtype}; "
            "pass the cache's uint8 batch before any float conversion or normalisation"
        )
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[-1] < 1 or images.shape[-2] < 1:
        raise FmcacheError(
            f"device augmentation takes a (B, 3, H, W) or (B, 1, H, W) batch, got shape {tuple(images.shape)}"
        )


def _check_params(params: AugmentParams, shape: torch.Size) -> None:
    n, height, width = shape[0], shape[-2], shape[-1]
    if len(params) != n:
        raise FmcacheError(f"augmentation parameters are for {len(params)} samples, the batch has {n}")
    top, left, h, w = params.top, params.left, params.height, params.width
    inside = (top >= 0) & (left >= 0) & (h >= 1) & (w >= 1) & (top + h <= height) & (left + w <= width)
    if not bool(inside.all()):
        k = int((~inside).nonzero()[0])
        box = (int(top[k]), int(left[k]), int(h[k]), int(w[k]))
        raise FmcacheError(
            f"crop box {box} (top, left, height, width) of sample {k} is outside its {height}x{width} image"
        )


def _cpu_generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, bool):
        raise FmcacheError(f"augmentation seed must be an int or a CPU torch.Generator, got {generator!r}")
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    if not isinstance(generator, torch.Generator):
        raise FmcacheError(f"augmentation seed must be an int or a CPU torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise FmcacheError(
            f"augmentation parameters are drawn on the CPU; pass a CPU torch.Generator, not one on {generator.device}"
        )
    return generator


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FmcacheError(f"{name} must be a positive integer, got {value!r}")
    return value


def _range(values: Sequence[float], name: str, low: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise FmcacheError(f"{name} must be two numbers (low, high), got {values!r}") from exc
    if not (low < a <= b and math.isfinite(b)):
        raise FmcacheError(f"{name} must satisfy {low} < low <= high, got {values!r}")
    return a, b


def _jitter(values: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        b, c, s, h = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise FmcacheError(f"jitter must be 4 numbers (brightness, contrast, saturation, hue), got {values!r}") from exc
    if min(b, c, s, h) < 0 or h > 0.5 or not all(math.isfinite(v) for v in (b, c, s)):
        raise FmcacheError(f"jitter strengths must be >= 0 and hue <= 0.5, got {values!r}")
    return b, c, s, h


def _probability(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise FmcacheError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)
