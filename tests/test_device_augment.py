"""Device augmentation (fmcache.data.device_augment) against torchvision: the same parameter distributions, and on
the same parameters the same pixels as torchvision's tensor ops on float images."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from scipy import stats

from fmcache.data.device_augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    AugmentParams,
    DeviceAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    crop_flip_resize,
    sample_crop_boxes,
)
from fmcache.data.transforms import CROP_RATIO, CROP_SCALE
from fmcache.errors import FmcacheError

MEAN, STD = (0.415, 0.221, 0.073), (0.275, 0.150, 0.081)  # APTOS: small stds magnify any pixel difference
TV_OPS = {
    BRIGHTNESS: TF.adjust_brightness,
    CONTRAST: TF.adjust_contrast,
    SATURATION: TF.adjust_saturation,
    HUE: TF.adjust_hue,
}
OURS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation, HUE: adjust_hue}
# Float32 rounding only: our ops do torchvision's arithmetic, reordered in places (hue is written in closed form).
FLOAT_TOL = 1e-5
# Flips go before the resize (on the uint8 crop); torch's interpolate places output pixels with float32 rounding
# (about 1e-5 px at 224), so a flipped resize and a resized flip differ by up to that much times a pixel step.
RESIZE_TOL = 3e-5
PIPELINE_TOL = 5e-5  # after a resize and four ops in a row; one uint8 level, 1/255, is 3.9e-3
P_MIN = 1e-3  # seeded draws, so these statistical tests are deterministic; the threshold leaves room for changes


def _images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 images with smooth regions, edges, noise, gray and saturated pixels and exact channel ties."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2]).expand(n, 3, height, width)
    x = base * torch.rand(n, 3, 1, 1, generator=g) * 255 + torch.randn(n, 3, height, width, generator=g) * 20
    x = x.clamp(0, 255).round().to(torch.uint8)
    x[:, :, : height // 6] = x[:, :1, : height // 6]  # gray band: R = G = B
    x[:, 1, height // 3 : height // 2] = x[:, 0, height // 3 : height // 2]  # R = G ties
    x[:, :, -4:, :] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)  # saturated red
    return x


def _tv_reference(image: torch.Tensor, params: AugmentParams, k: int, size: int, mean, std) -> torch.Tensor:
    """The same draw through torchvision's v2 functional tensor ops on the float image."""
    x = TF.to_dtype(image, torch.float32, scale=True)
    x = TF.resized_crop(
        x,
        int(params.top[k]),
        int(params.left[k]),
        int(params.height[k]),
        int(params.width[k]),
        [size, size],
        antialias=True,
    )
    x = _flip(x, bool(params.vflip[k]), bool(params.hflip[k]))
    if params.jitter[k]:
        for op in params.order[k].tolist():
            x = TV_OPS[op](x, float(params.factors[k, op]))
    return TF.normalize(x, list(mean), list(std))


def _params(rows: list[tuple]) -> AugmentParams:
    """AugmentParams from rows of (top, left, h, w, vflip, hflip, jitter, order, factors)."""
    cols = list(zip(*rows, strict=True))
    return AugmentParams(
        *(torch.tensor(c, dtype=torch.long) for c in cols[:4]),
        *(torch.tensor(c, dtype=torch.bool) for c in cols[4:7]),
        torch.tensor(cols[7], dtype=torch.long),
        torch.tensor(cols[8], dtype=torch.float32),
    )


# ---- parameter distributions ----


def _tv_boxes(n: int, height: int, width: int) -> np.ndarray:
    image = torch.empty(3, height, width)
    torch.manual_seed(0)
    return np.array([T.RandomResizedCrop.get_params(image, list(CROP_SCALE), list(CROP_RATIO)) for _ in range(n)])


def _tv_fallback(height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's fallback box (top, left, height, width), written out from its documentation."""
    h, w = height, width
    if width / height < min(CROP_RATIO):
        h = round(width / min(CROP_RATIO))
    elif width / height > max(CROP_RATIO):
        w = round(height * max(CROP_RATIO))
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(("height", "width", "n"), [(224, 224, 12000), (180, 220, 6000), (150, 260, 300)])
def test_crop_boxes_follow_torchvisions_distribution(height, width, n):
    """Area, aspect ratio and offsets (KS) and the fallback rate (two-proportion test) match
    ``RandomResizedCrop.get_params``; at 224² about 12 % of boxes are the fallback. No box of area 0.8..1.2 fits
    150×260 (wider than 4/3), so every draw is the fallback, trimmed to 4/3."""
    ours = np.stack([t.numpy() for t in sample_crop_boxes(n, height, width, CROP_SCALE, CROP_RATIO, _gen(1))], 1)
    theirs = _tv_boxes(n, height, width)
    assert np.all(ours >= 0) and np.all(ours[:, 0] + ours[:, 2] <= height) and np.all(ours[:, 1] + ours[:, 3] <= width)
    rate_ours, rate_tv = [float(np.mean(np.all(b == _tv_fallback(height, width), axis=1))) for b in (ours, theirs)]
    if width / height > max(CROP_RATIO):
        assert rate_ours == rate_tv == 1.0
        return
    pooled = (rate_ours + rate_tv) / 2
    assert abs(rate_ours - rate_tv) < 3.3 * math.sqrt(2 * pooled * (1 - pooled) / n), (rate_ours, rate_tv)
    if (height, width) == (224, 224):
        assert 0.11 < rate_ours < 0.13, rate_ours
    for name, f in {
        "area": lambda b: b[:, 2] * b[:, 3],
        "aspect": lambda b: b[:, 3] / b[:, 2],
        "top": lambda b: b[:, 0],
        "left": lambda b: b[:, 1],
    }.items():
        assert stats.ks_2samp(f(ours), f(theirs)).pvalue > P_MIN, name


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_flip_and_jitter_rates_and_factor_ranges():
    n = 40000
    p = DeviceAugment(224, MEAN, STD).sample(n, 224, 224, _gen(2))
    for rate, expected in ((p.vflip, 0.5), (p.hflip, 0.5), (p.jitter, 0.8)):
        assert abs(rate.double().mean().item() - expected) < 3.3 * math.sqrt(expected * (1 - expected) / n)
    assert torch.corrcoef(torch.stack([p.vflip.double(), p.hflip.double()]))[0, 1].abs() < 0.02  # independent
    ranges = {BRIGHTNESS: (0.8, 1.2), CONTRAST: (0.8, 1.2), SATURATION: (0.9, 1.1), HUE: (-0.1, 0.1)}
    for op, (low, high) in ranges.items():
        f = p.factors[:, op].numpy().astype(np.float64)
        assert low <= f.min() < low + 1e-3 and high - 1e-3 < f.max() <= high, op
        assert stats.kstest(f, stats.uniform(low, high - low).cdf).pvalue > P_MIN, op
    # ColorJitter clips a multiplier's range at 0 and leaves an op of strength 0 alone.
    wide = DeviceAugment(224, jitter=(1.5, 0, 0.5, 0.5)).sample(5000, 224, 224, _gen(3))
    assert wide.factors[:, BRIGHTNESS].min() >= 0 and wide.factors[:, BRIGHTNESS].max() > 2.4
    assert torch.all(wide.factors[:, CONTRAST] == 1) and wide.factors[:, HUE].abs().max() > 0.49


def test_op_order_is_uniform_over_the_24_permutations():
    n = 24000
    order = DeviceAugment(224).sample(n, 224, 224, _gen(4)).order
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))  # each row is a permutation
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in order.tolist():
        counts[tuple(row)] += 1
    assert stats.chisquare(list(counts.values())).pvalue > P_MIN


# ---- each operation against torchvision on the same parameters ----


@pytest.mark.parametrize("op", [BRIGHTNESS, CONTRAST, SATURATION, HUE])
def test_each_color_op_matches_torchvisions_tensor_op(op):
    x = _images(8, 40, 56).float() / 255
    x[0] = torch.rand(3, 40, 56)  # also arbitrary floats, not only k/255
    if op == HUE:
        factors = torch.tensor([-0.5, -0.3, -0.1, -0.01, 0.0, 0.07, 0.25, 0.5])
    else:
        factors = torch.tensor([0.0, 0.5, 0.8, 0.95, 1.0, 1.1, 1.2, 2.0])
    ours = OURS[op](x.clone(), factors)
    theirs = torch.stack([TV_OPS[op](x[k], float(factors[k])) for k in range(8)])
    assert (ours - theirs).abs().max().item() <= FLOAT_TOL
    assert ours.min() >= 0 and ours.max() <= 1


def test_hue_of_gray_pixels_and_a_full_turn():
    gray = torch.rand(2, 1, 16, 16).expand(2, 3, 16, 16).clone()
    assert torch.equal(adjust_hue(gray.clone(), torch.tensor([0.3, -0.2])), gray)
    x = torch.rand(2, 3, 16, 16)
    back = adjust_hue(adjust_hue(x.clone(), torch.tensor([0.5, 0.25])), torch.tensor([-0.5, -0.25]))
    assert (back - x).abs().max() < FLOAT_TOL


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [(224, 224, 224), (64, 96, 80), (120, 90, 48)],  # upsampling; mixed; downsampling (antialias matters)
)
def test_crop_flip_resize_matches_torchvisions_resized_crop(height, width, size):
    images = _images(6, height, width)
    params = DeviceAugment(size).sample(6, height, width, _gen(5))
    flips = [(True, False), (False, True), (True, True), (False, False), (True, False), (False, False)]
    boxes = list(zip(*(v.tolist() for v in (params.top, params.left, params.height, params.width)), strict=True))
    boxes[-1] = (0, 0, height, width)  # the fallback's whole image (a no-op resize when it is already ``size``)
    out = crop_flip_resize(images, boxes, flips, out=torch.empty(6, 3, size, size))
    for k, (box, flip) in enumerate(zip(boxes, flips, strict=True)):
        ref = _flip(TF.resized_crop(TF.to_dtype(images[k], torch.float32, scale=True), *box, [size, size]), *flip)
        assert (out[k] - ref).abs().max().item() <= RESIZE_TOL, k
        # torchvision's uint8 tensor path (CPU) rounds to uint8 after its fixed-point resize: about one level.
        ref8 = _flip(TF.resized_crop(images[k], *box, [size, size]).float() / 255, *flip)
        assert (out[k] - ref8).abs().max().item() <= 1.01 / 255, k


def _flip(image, vflip: bool, hflip: bool):
    image = TF.vertical_flip(image) if vflip else image
    return TF.horizontal_flip(image) if hflip else image


@pytest.mark.parametrize(("height", "width", "size"), [(224, 224, 224), (72, 100, 96)])
def test_whole_pipeline_matches_torchvision_on_the_same_parameters(height, width, size):
    images = _images(12, height, width, seed=6)
    aug = DeviceAugment(size, MEAN, STD, chunk=5)
    params = aug.sample(12, height, width, _gen(7))
    assert params.jitter.any() and not params.jitter.all() and params.vflip.any() and params.hflip.any()
    out = aug.apply(images, params)
    ref = torch.stack([_tv_reference(images[k], params, k, size, MEAN, STD) for k in range(12)])
    assert out.shape == (12, 3, size, size) and out.dtype == torch.float32
    # Compared in [0, 1] units: normalising divides by std (0.081 here) and magnifies float rounding.
    assert ((out - ref) * torch.tensor(STD).view(1, 3, 1, 1)).abs().max().item() <= PIPELINE_TOL


def test_jitter_regrouped_or_in_runs_gives_the_same_pixels():
    """``regroup=True`` (the GPU's few-launches path) and the CPU's runs of rows compute the same thing."""
    x = _images(9, 32, 40, seed=8).float() / 255
    p = DeviceAugment(32).sample(9, 32, 40, _gen(9))
    orders = [
        tuple(o) if on and k not in (1, 4) else None
        for k, (o, on) in enumerate(zip(p.order.tolist(), p.jitter.tolist(), strict=True))
    ]
    runs = color_jitter(x.clone(), orders, p.factors.tolist())
    regrouped = color_jitter(x.clone(), orders, p.factors.tolist(), regroup=True)
    assert (runs - regrouped).abs().max() <= 1e-6
    skipped = [k for k, o in enumerate(orders) if o is None]
    assert skipped and torch.equal(runs[skipped], x[skipped])
    same = [(2, 0, 3, 1)] * 9  # nothing to regroup: the ops run on x itself
    assert torch.equal(
        color_jitter(x.clone(), same, p.factors.tolist(), regroup=True),
        color_jitter(x.clone(), same, p.factors.tolist()),
    )


def test_pil_path_differs_by_its_uint8_rounding_only():
    """The PIL path (fmcache's CPU augmentation) on the same parameters: it rounds to uint8 after the resize and
    after each colour op, and quantises the hue, so it is close but not equal."""
    images = _images(8, 224, 224, seed=10)
    aug = DeviceAugment(224, (0.0,) * 3, (1.0,) * 3)
    params = aug.sample(8, 224, 224, _gen(11))
    params = AugmentParams(**{**vars(params), "jitter": torch.ones(8, dtype=torch.bool)})
    out = aug.apply(images, params)
    diffs = []
    for k in range(8):
        img = Image.fromarray(images[k].permute(1, 2, 0).numpy())
        box = [int(v[k]) for v in (params.top, params.left, params.height, params.width)]
        img = TF.resized_crop(img, *box, [224, 224], antialias=True)
        img = _flip(img, bool(params.vflip[k]), bool(params.hflip[k]))
        for op in params.order[k].tolist():
            img = TV_OPS[op](img, float(params.factors[k, op]))
        diffs.append((out[k] - TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)).abs())
    diff = torch.stack(diffs) * 255
    assert diff.mean() < 2 and torch.quantile(diff.flatten()[::7], 0.99) <= 6, (diff.mean(), diff.max())


def test_normalisation_and_no_jitter_is_crop_and_flip_only():
    images = _images(4, 50, 50, seed=12)
    params = _params(
        [
            (0, 0, 50, 50, False, False, True, [0, 1, 2, 3], [1.2, 0.8, 1.1, 0.1]),
            (3, 5, 40, 44, True, False, True, [3, 2, 1, 0], [0.9, 1.1, 0.9, -0.1]),
            (1, 2, 48, 47, False, True, False, [0, 1, 2, 3], [2.0, 2.0, 2.0, 0.5]),
            (0, 0, 50, 50, True, True, True, [1, 3, 0, 2], [1.0, 1.0, 1.0, 0.0]),
        ]
    )
    still = DeviceAugment(50, MEAN, STD, jitter=(0, 0, 0, 0)).apply(images, params)
    no_jitter = AugmentParams(**{**vars(params), "jitter": torch.zeros(4, dtype=torch.bool)})
    assert torch.equal(still, DeviceAugment(50, MEAN, STD).apply(images, no_jitter))
    assert torch.allclose(still[0], TF.normalize(images[0].float() / 255, list(MEAN), list(STD)), atol=1e-6)
    plain = DeviceAugment(50, MEAN, STD).apply(images, params)
    assert torch.equal(plain[2], still[2])  # jitter=False: untouched by the colour ops
    assert not torch.allclose(plain[0], still[0])


# ---- determinism, sizes, gray modes ----


def test_same_seed_same_batch_and_each_sample_its_own_draw():
    images = _images(6, 64, 64, seed=13)
    aug = DeviceAugment(64, MEAN, STD)
    a, b = aug(images, 123), aug(images, _gen(123))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(images, 124))
    same = images[:1].expand(6, 3, 64, 64)
    out = aug(same, 5)
    assert len({tuple(out[k].flatten()[:4000:97].tolist()) for k in range(6)}) == 6
    p = aug.sample(6, 64, 64, 5)
    assert len(set(zip(p.top.tolist(), p.left.tolist(), p.height.tolist(), p.width.tolist(), strict=True))) > 1
    assert len(set(p.factors[:, HUE].tolist())) == 6
    # A generator carries on: two batches from one generator differ, and replaying its seed replays both.
    g = _gen(9)
    first, second = aug(images, g), aug(images, g)
    g = _gen(9)
    assert not torch.equal(first, second) and torch.equal(aug(images, g), first) and torch.equal(aug(images, g), second)


def test_chunk_size_does_not_change_the_result():
    images = _images(7, 40, 52, seed=14)
    params = DeviceAugment(48).sample(7, 40, 52, _gen(15))
    outs = [DeviceAugment(48, MEAN, STD, chunk=c).apply(images, params) for c in (1, 3, 7, None)]
    for other in outs[1:]:
        assert (outs[0] - other).abs().max() <= 1e-6


@pytest.mark.parametrize(("size", "height", "width"), [(96, 96, 96), (80, 60, 100), (112, 130, 120)])
def test_any_img_size_and_non_square_input(size, height, width):
    out = DeviceAugment(size, MEAN, STD)(_images(3, height, width, seed=16), 17)
    assert out.shape == (3, 3, size, size) and torch.isfinite(out).all()


def test_gray_batches_repeat_to_three_channels_and_seed_mode_keeps_channel_zero():
    images = _images(5, 48, 48, seed=18)[:, :1]
    aug = DeviceAugment(48, (0.286,) * 3, (0.267,) * 3)
    repeated = aug(images.expand(5, 3, 48, 48).contiguous(), 19)
    assert torch.equal(aug(images, 19), repeated)
    seed_mode = DeviceAugment(48, (0.286,) * 3, (0.267,) * 3, gray="seed")(images, 19)
    assert torch.equal(seed_mode[:, 0], repeated[:, 0]) and torch.all(seed_mode[:, 1:] == 0)
    assert DeviceAugment(48, gray="seed").spec()["steps"][-1] == "gray_seed"
    json.dumps(aug.spec())


@pytest.mark.parametrize("chunk", [3, 64])  # in runs of rows (the CPU's way) and regrouped by op (one chunk)
def test_one_channel_path_is_bit_identical_to_repeating_first(chunk):
    """Gray pixels are cropped and jittered on their one channel: every op, in every order, gives exactly what the
    three equal channels would (hue leaves them alone), with per-channel normalisation after."""
    images = _images(9, 40, 52, seed=21)[:, :1]
    aug = DeviceAugment(32, (0.3, 0.4, 0.5), (0.2, 0.25, 0.3), jitter_p=1.0, chunk=chunk)
    params = aug.sample(9, 40, 52, 22)
    one = aug.apply(images, params)
    three = aug.apply(images.expand(9, 3, 40, 52).contiguous(), params)
    assert torch.equal(one, three)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for op in range(4):
        x = torch.rand(4, 1, 8, 8)
        factors = torch.tensor([0.9, 1.1, 0.95, 1.05]) if op != 3 else torch.tensor([0.05, -0.1, 0.0, 0.1])
        assert torch.equal(
            ops[op](x.clone(), factors).expand(4, 3, 8, 8), ops[op](x.expand(4, 3, 8, 8).clone(), factors)
        )


def test_an_empty_batch_gives_an_empty_batch():
    assert DeviceAugment(16)(torch.zeros(0, 3, 20, 20, dtype=torch.uint8), 0).shape == (0, 3, 16, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batch_matches_the_cpu_batch_for_the_same_seed():
    """Parameters come from the CPU generator, so a seed gives the same augmentation on every device."""
    images = _images(16, 96, 80, seed=20)
    aug = DeviceAugment(112, MEAN, STD)
    on_gpu = aug(images.cuda(), 21)
    assert on_gpu.device.type == "cuda" and on_gpu.shape == (16, 3, 112, 112)
    assert ((on_gpu.cpu() - aug(images, 21)) * torch.tensor(STD).view(1, 3, 1, 1)).abs().max() <= PIPELINE_TOL
    with pytest.raises(FmcacheError, match=r"CPU torch\.Generator"):
        aug(images.cuda(), torch.Generator(device="cuda"))


# ---- input checks ----


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(2, 3, 8, 8), "uint8"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), "shape"),
        (torch.zeros(2, 4, 8, 8, dtype=torch.uint8), "shape"),
        (torch.zeros(2, 3, 0, 8, dtype=torch.uint8), "shape"),
        (np.zeros((2, 3, 8, 8), dtype=np.uint8), "tensor"),
    ],
)
def test_bad_batches_are_refused_in_one_line(images, match):
    with pytest.raises(FmcacheError, match=match) as err:
        DeviceAugment(8)(images, 0)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"img_size": 0}, "img_size"),
        ({"img_size": 224.0}, "img_size"),
        ({"scale": (1.2, 0.8)}, "scale"),
        ({"ratio": (0, 1)}, "ratio"),
        ({"jitter": (0.2, -0.1, 0, 0)}, "jitter"),
        ({"jitter": (0.2, 0.2, 0.1, 0.6)}, "hue"),
        ({"jitter": (0.2, 0.2)}, "jitter"),
        ({"jitter_p": 1.5}, "jitter_p"),
        ({"flip_p": -0.1}, "flip_p"),
        ({"gray": "red"}, "gray"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"chunk": 0}, "chunk"),
    ],
)
def test_bad_settings_are_refused_in_one_line(kwargs, match):
    with pytest.raises(FmcacheError, match=match) as err:
        DeviceAugment(**{"img_size": 8, **kwargs})
    assert "\n" not in str(err.value)


def test_bad_seed_or_params_are_refused():
    images = _images(2, 16, 16)
    aug = DeviceAugment(16)
    for seed, match in ((1.5, "seed"), (True, "seed"), ("7", "seed")):
        with pytest.raises(FmcacheError, match=match):
            aug(images, seed)
    for n, height, match in ((-1, 16, "samples"), (2, 0, "height")):
        with pytest.raises(FmcacheError, match=match):
            aug.sample(n, height, 16, 0)
    params = aug.sample(3, 16, 16, 0)
    with pytest.raises(FmcacheError, match="3 samples"):
        aug.apply(images, params)
    outside = _params([(10, 0, 8, 16, False, False, False, [0, 1, 2, 3], [1, 1, 1, 0])] * 2)
    with pytest.raises(FmcacheError, match="outside"):
        aug.apply(images, outside)
