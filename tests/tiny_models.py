"""Tiny, random-init builds of the real registry architectures, shared by the tests."""

from __future__ import annotations

import open_clip

_CLIP = open_clip.get_model_config("ViT-B-16")
_COCA = open_clip.get_model_config("coca_ViT-B-32")


def _open_clip_tiny(cfg: dict, pooler: bool) -> dict:
    vision = dict(cfg["vision_cfg"], layers=2, width=64, head_width=32)
    text = dict(cfg["text_cfg"], layers=1, width=32, heads=2)
    out = {"vision_cfg": vision, "text_cfg": text, "embed_dim": 32}
    if pooler:
        vision["attn_pooler_heads"] = 2
        out["multimodal_cfg"] = dict(cfg["multimodal_cfg"], layers=1, width=32, heads=2, attn_pooler_heads=2)
    return out


# name -> (img_size, arch overrides, expected layers, prefix tokens, width of the last layer)
TINY = {
    "dinov2_vits14": (56, {"depth": 2}, 2, 1, 384),
    "sam_vit_b": (
        64,
        {"depth": 2, "embed_dim": 64, "num_heads": 2, "global_attn_indexes": (1,), "window_size": 2},
        2,
        0,
        64,
    ),
    "sam2_b": (64, {}, 4, 0, 896),
    "focal": (64, {"embed_dim": 16, "depths": (1, 1, 1, 1)}, 4, 0, 128),
    "clip_vitb16": (64, _open_clip_tiny(_CLIP, pooler=False), 2, 1, 64),
    "coca_vitb32": (64, _open_clip_tiny(_COCA, pooler=True), 2, 1, 64),
    "blip_base": (
        64,
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "initializer_range": 0.02,
        },
        2,
        1,
        64,
    ),
    "mae_vitb16": (64, {"depth": 2, "embed_dim": 64, "num_heads": 2}, 2, 1, 64),
    "aimv2_l14": (56, {"depth": 2, "embed_dim": 64, "num_heads": 2}, 2, 0, 64),
    "deit_base": (64, {"depth": 2, "embed_dim": 64, "num_heads": 2}, 2, 1, 64),
    "dino_vitb16": (64, {"depth": 2, "embed_dim": 64, "num_heads": 2}, 2, 1, 64),
    "resnet50": (64, {}, 5, 0, 2048),
}


_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
_SAM = {"depth": 2, "embed_dim": 64, "num_heads": 2, "global_attn_indexes": (1,)}  # block 1 windowed, block 2 global

# name -> tiny architecture in the official implementation's keyword names (fmcache.models.conformance maps them to
# fmcache's arch_overrides), for conformance at the release's image sizes: two blocks, every other shape as released.
CONFORMANCE_ARCH = {
    "dinov2_vits14": _VIT,
    "dinov2_vitg14": {"depth": 2, "embed_dim": 96, "num_heads": 2},  # fused SwiGLU: 96 keeps timm's width equal
    "sam_vit_b": _SAM,
    "sam2_b": {"stages": (1, 2, 2, 1), "global_att_blocks": (4,), "embed_dim": 16, "num_heads": 1},
    "clip_vitb16": _open_clip_tiny(_CLIP, pooler=False),
    "coca_vitb32": _open_clip_tiny(_COCA, pooler=True),
    "deit_base": _VIT,
    "dino_vitb16": _VIT,
    "mae_vitb16": _VIT,
    "blip_base": _VIT,
    "aimv2_l14": {**_VIT, "hidden": 176},  # SwiGLU width 2.75 x embed_dim, as the release
    "resnet50": {},
}
