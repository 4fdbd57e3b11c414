"""Protocol points of the transforms: the seed's grayscale handling and its train-augmentation order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fmcache.data.transforms import build_transform, train_augmentation, train_augmentation_spec
from fmcache.errors import FmcacheError
from tests.test_models import tiny


def _gray_image(size: int = 80) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).convert("RGB")


def test_gray_seed_equals_the_seeds_red_channel_kernel():
    """The seed feeds one normalised channel to a first layer cut to its red-channel kernel; fmcache's ``--gray seed``
    feeds (gray, 0, 0) to the whole layer. Both give the same features."""
    model = tiny("dinov2_vits14")
    mean, std = (0.286,) * 3, (0.267,) * 3
    ours, spec = build_transform(56, None, mean, std, gray="seed")
    x = ours(_gray_image()).unsqueeze(0)
    assert spec["steps"][-1] == "gray_seed" and torch.all(x[:, 1:] == 0)

    one_channel = build_transform(56, None, mean, std)[0](_gray_image())[:1].unsqueeze(0)
    vit = model.adapter.model
    red = torch.nn.Conv2d(1, vit.patch_embed.proj.out_channels, 14, 14)
    red.weight.data = vit.patch_embed.proj.weight.data[:, :1].clone()
    red.bias.data = vit.patch_embed.proj.bias.data.clone()
    with torch.no_grad():
        seed_tokens = red(one_channel).flatten(2).transpose(1, 2)
        our_tokens = vit.patch_embed(x)
        our_tokens = our_tokens.flatten(1, 2) if our_tokens.dim() == 4 else our_tokens  # dynamic size: (B, H, W, C)
        assert torch.allclose(seed_tokens, our_tokens, atol=1e-5)
        repeat = model(build_transform(56, None, mean, std)[0](_gray_image()).unsqueeze(0)).pooled
        assert not torch.allclose(model(x).pooled, repeat)  # the two modes really differ


def test_gray_mode_is_validated_and_keyed():
    with pytest.raises(FmcacheError, match="--gray"):
        build_transform(56, gray="red")
    assert build_transform(56)[1] != build_transform(56, gray="seed")[1]


def test_train_augmentation_resizes_and_center_crops_first():
    steps = [type(t).__name__ for t in train_augmentation(224).transforms]
    assert steps[:3] == ["Resize", "CenterCrop", "RandomResizedCrop"]
    assert train_augmentation(224).transforms[0].size == (256, 256)
    spec = train_augmentation_spec(224)
    assert spec["steps"][:3] == ["resize", "center_crop", "random_resized_crop"] and spec["resize"] == [256, 256]
    torch.manual_seed(0)
    assert train_augmentation(56)(_gray_image(200)).shape == (3, 56, 56)


def test_random_resized_crop_draws_the_seeds_boxes_fallback_included():
    """Same seed → the same boxes as torchvision's RandomResizedCrop(224, scale=(0.8, 1.2)) with the seed's defaults;
    about 12 % of them are torchvision's full-image fallback (a clamped (0.8, 1.0) gives under 1 %)."""
    from torchvision import transforms as T

    ours = train_augmentation(224).transforms[2]
    seeds = T.RandomResizedCrop(224, scale=(0.8, 1.2))  # the seed's call: default ratio, bilinear
    image = Image.new("RGB", (224, 224))
    draws = 4000
    full = 0
    for seed in range(draws):
        torch.manual_seed(seed)
        box = T.RandomResizedCrop.get_params(image, ours.scale, ours.ratio)
        torch.manual_seed(seed)
        assert box == T.RandomResizedCrop.get_params(image, seeds.scale, seeds.ratio)
        full += box == (0, 0, 224, 224)
    assert 0.10 < full / draws < 0.14, full / draws
    assert ours.interpolation == seeds.interpolation and train_augmentation_spec(224)["crop_scale"] == [0.8, 1.2]
