"""SAM2's image encoder as the follow-up paper uses it: the Hiera trunk's four stages as layers, and the FPN neck's
stride-16 ``vision_features`` as the paper's pooled feature.

Facts used (from the SAM2 release: its configs and ``image_encoder`` / ``FpnNeck`` modules):
- the released ``sam2.1_hiera_{base_plus,large}.pt`` files hold ``{'model': {...}}`` with the encoder under
  ``image_encoder.trunk.`` (Hiera; MLP layers named ``mlp.layers.0/1``) and ``image_encoder.neck.`` beside the
  prompt encoder, mask decoder and memory modules;
- the neck has one 1×1 lateral conv to 256 channels per trunk stage, ``neck.convs.{i}.conv``, listed from the
  deepest stage to the shallowest (b+: 896, 448, 224, 112; l: 1152, 576, 288, 144);
- levels 2 and 3 (strides 16 and 32) fuse top-down: the deeper level is upsampled ×2 (nearest) and added to the
  lateral conv; levels 0 and 1 are lateral only;
- the encoder drops the stride-32 level (``scalp=1``), so ``vision_features`` is the fused stride-16 map.

The trunk is timm's HieraDet, whose own names match the release after the ``mlp.layers`` rename.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fmcache.models.blocks import Sam2Stages

ENCODER_PREFIX = "image_encoder."
NECK_WIDTH = 256


class Sam2Neck(nn.Module):
    """The lateral convs of SAM2's FPN neck and the one fused level the paper pools."""

    def __init__(self, stage_channels: Sequence[int], width: int = NECK_WIDTH):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(c, width, kernel_size=1))) for c in reversed(stage_channels)
        )

    def vision_features(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """The stride-16 map: lateral(stage 3) + nearest ×2 upsampling of lateral(stage 4)."""
        deepest = self.convs[0](stages[-1])
        lateral = self.convs[1](stages[-2])
        # SAM2 upsamples in fp32 even under autocast; keep that so bf16 runs stay close to the release
        up = nn.functional.interpolate(deepest.float(), scale_factor=2.0, mode="nearest")
        return lateral + up.to(lateral.dtype)


class Sam2Encoder(nn.Module):
    """Hiera trunk (classifier head removed) + neck, keyed like the release's ``image_encoder.*``."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        trunk.head = nn.Identity()  # the release has no classifier or head norm; nothing may stay at init
        self.trunk = trunk
        channels = [info["num_chs"] for info in trunk.feature_info]
        self.neck = Sam2Neck(channels)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.trunk.forward_intermediates(x, indices=None, norm=False, output_fmt="NCHW", intermediates_only=True)


class Sam2Adapter(nn.Module):
    """Trunk stages flattened to (B, H·W, C) tokens as layers; pooled = mean of ``vision_features`` (the paper's)."""

    num_prefix_tokens = 0

    def __init__(self, encoder: Sam2Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor):
        stages = self.encoder.forward_stages(x)
        tokens = [s.flatten(2).transpose(1, 2) for s in stages]
        neck = self.encoder.neck.vision_features(stages)  # (B, 256, H/16, W/16)
        # the follow-up pools these for its linear head and feeds them, flattened, to its DeiT head
        return tokens, tokens, neck.float().mean(dim=(2, 3)), neck.flatten(2).transpose(1, 2)

    root_attr = "encoder"
    layer_unit = "Hiera stages"

    def block_layout(self, foundation):
        """Hiera's blocks one by one (``--freeze K`` freezes blocks 1..K, as the follow-up); layers stay stages."""
        return Sam2Stages(foundation)


def convert_release(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The release layout (``image_encoder.trunk/neck``, ``mlp.layers.N``) → this module's names.

    Tensors outside the image encoder keep their names, so the loader reports them as unexpected.
    """
    out = {}
    for key, value in state.items():
        if key.startswith(ENCODER_PREFIX):
            key = key[len(ENCODER_PREFIX) :]
            if key.startswith("trunk."):
                key = key.replace(".mlp.layers.0.", ".mlp.fc1.").replace(".mlp.layers.1.", ".mlp.fc2.")
        out[key] = value
    return out


def build_encoder(arch: str, overrides: dict) -> Sam2Encoder:
    import timm  # deferred: timm

    return Sam2Encoder(timm.create_model(arch, pretrained=False, num_classes=0, **overrides))


def hub_file(tag: str) -> Path:
    """Download the release file named by a registry tag ``<repo>/<file>`` from the Hugging Face hub."""
    from huggingface_hub import hf_hub_download  # deferred: huggingface_hub

    repo, _, filename = tag.rpartition("/")
    return Path(hf_hub_download(repo, filename))
