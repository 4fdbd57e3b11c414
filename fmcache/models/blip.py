"""BLIP's release checkpoint (LAVIS ``model_base.pth``, timm-style vision tower) in transformers' names."""

from __future__ import annotations

import torch
from torch import nn

from fmcache.errors import FmcacheError

# LAVIS names BLIP's vision tower the timm way; transformers' BlipVisionModel uses other names for the same tensors.
_LAVIS_TO_HF = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
)


# BLIP's own ViT (timm-style, LayerNorm eps 1e-6); transformers' port defaults to 1e-5.
BLIP_ORIGINAL_EPS = 1e-6


def _resample_grid_table(table: torch.Tensor, num_positions: int) -> torch.Tensor:
    """(1, 1 + g², D) position table → (1, num_positions, D): bicubic on the grid, the CLS row kept."""
    if table.shape[1] == num_positions:
        return table
    old, new = round((table.shape[1] - 1) ** 0.5), round((num_positions - 1) ** 0.5)
    if old * old + 1 != table.shape[1] or new * new + 1 != num_positions:
        raise FmcacheError(f"cannot resample a position table of {table.shape[1]} rows to {num_positions}")
    grid = table[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(table.dtype)
    return torch.cat([table[:, :1], grid], dim=1)


def is_blip_original(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("blocks.") for k in state) and "pos_embed" in state


def blip_to_hf(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """BLIP's release layout (``visual_encoder.`` stripped: timm-style ViT names) → transformers' names, with the
    position table resampled to the built image size (BLIP's model_base.pth is made at 224)."""
    if not is_blip_original(state):
        return state
    out = {}
    for key, value in state.items():
        new = key
        if new.startswith("blocks."):
            new = "encoder.layers." + new[len("blocks.") :]
        elif new.startswith("norm."):
            new = "post_layernorm." + new[len("norm.") :]
        for old, rep in _LAVIS_TO_HF:
            new = new.replace(old, rep)
        out[new] = value
    key = "embeddings.position_embedding"
    target = model.state_dict().get(key)
    if key in out and target is not None and out[key].ndim == 3:
        out[key] = _resample_grid_table(out[key], target.shape[1])
    return out
