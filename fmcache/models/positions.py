"""How a released position table meets another input size, the way each paper's seed code does it.

The rule is per family (``ModelSpec.positions``) because the seeds differ, and the difference changes every feature:

- ``timm``: the model is built at the input size and timm's checkpoint filter resamples the release's table once at
  load (bicubic, antialias on). The rule for the families whose seeds build at the input size (MAE, BLIP at 384, ...).
- ``dinov2_hub``: the WACV seed runs ``torch.hub.load('facebookresearch/dinov2', ...)``, a model built at 518 px whose
  37 × 37 table is resampled on *every forward* (``interpolate_pos_encoding``). fmcache builds timm's DINOv2 at 518
  too, keeps the 37 × 37 table as the parameter (so fine-tuning updates what the seed updates), and swaps timm's
  ``_pos_embed`` for :func:`dinov2_hub_table`'s arithmetic.
- ``sam_seed``: the WACV seed builds SAM's encoder at the input size and resizes the release's tables once at load
  (``filter_interpolate_weights``): the global blocks' relative-position tables with ``F.interpolate``'s default mode
  (nearest), the 64 × 64 absolute table bicubic with antialias. The windowed blocks' tables (14-token windows) keep
  their size. At 1024 px the tables load as released. :func:`sam_seed_tables` does the same resizing.

Facts used (no code copied): DINOv2's ``dinov2/models/vision_transformer.py`` (``interpolate_pos_encoding``) and
``dinov2/hub/backbones.py`` (torch.hub models: ``img_size=518``, ``interpolate_offset=0.1``,
``interpolate_antialias=False``, no register tokens); the WACV seed's ``utils/transformers/sam.py``.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn
from torch.nn import functional as F

from fmcache.errors import FmcacheError

# DINOv2's torch.hub models (dinov2/hub/backbones.py): the release's table is for 518 px (37 × 37 patches of 14) and is
# resampled with a scale factor of (n + 0.1) / 37, a historical offset the hub models keep (dino issue 8), no antialias.
DINOV2_HUB_OFFSET = 0.1
DINOV2_HUB_ANTIALIAS = False


def dinov2_hub_table(table: torch.Tensor, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """DINOv2's hub position table (1, 1 + M², D) for an (h, w) patch grid: (1, 1 + h·w, D), CLS row first.

    At the table's own grid it is returned as it is (the parameter itself, as the hub model does). Otherwise the
    patch rows are resampled in fp32, bicubic, with ``scale_factor=((h + 0.1) / M, (w + 0.1) / M)`` and no
    antialias, and the result is cast to ``dtype`` (the tokens' dtype), as ``interpolate_pos_encoding`` does.
    A scale factor rather than an output size matters: PyTorch then samples at the given scale, not at h / M.
    """
    rows = table.shape[1] - 1
    side = math.isqrt(rows)
    if side * side != rows:
        raise FmcacheError(f"DINOv2 position table of {rows} patch rows is not a square grid")
    h, w = grid
    if (h, w) == (side, side):
        return table
    full = table.float()
    patches = full[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = ((h + DINOV2_HUB_OFFSET) / side, (w + DINOV2_HUB_OFFSET) / side)
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=DINOV2_HUB_ANTIALIAS)
    if tuple(patches.shape[-2:]) != (h, w):  # the hub model asserts the same
        raise FmcacheError(f"DINOv2 position table resampled to {tuple(patches.shape[-2:])}, expected {(h, w)}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return torch.cat([full[:, :1], patches], dim=1).to(dtype)


def _dinov2_hub_pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ViT ``_pos_embed`` with DINOv2's hub arithmetic; ``x`` is the patch embedding's (B, H, W, D) map."""
    b, h, w, d = x.shape
    x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)
    x = x + dinov2_hub_table(self.pos_embed, (h, w), x.dtype)
    return self.pos_drop(x)


def use_dinov2_hub_positions(model: nn.Module) -> nn.Module:
    """Make a timm DINOv2 ViT (built at 518 px with ``dynamic_img_size=True``) add its position table the hub way.

    timm's own dynamic size would resample with an output size and antialias on; the instance's ``_pos_embed`` is
    replaced instead (``forward_intermediates``, ``forward_features`` and the block view all call it).
    """
    if getattr(model, "reg_token", None) is not None or getattr(model, "cls_token", None) is None:
        raise FmcacheError("DINOv2 hub positions need a ViT with a CLS token and no register tokens")
    if not getattr(model, "dynamic_img_size", False) or getattr(model, "no_embed_class", False):
        raise FmcacheError("DINOv2 hub positions need a ViT built with dynamic_img_size and a CLS position row")
    model._pos_embed = types.MethodType(_dinov2_hub_pos_embed, model)
    return model


def sam_seed_tables(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resize a SAM encoder's tables (timm names) to ``model``'s shapes the WACV seed's way; other tensors untouched.

    Relative-position tables (``blocks.N.attn.rel_pos_h/w``, (2n - 1, C)) whose length differs: ``F.interpolate``'s
    default mode (nearest). The absolute table ``pos_embed`` (1, H, W, D): bicubic with antialias. A state already
    at the model's shapes (a release at 1024 px into a 1024 px model, a fine-tuned export) is returned unchanged.
    """
    expected = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        target = expected.get(key)
        if target is None or tuple(value.shape) == tuple(target.shape):
            continue
        if key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")) and value.ndim == 2 == target.ndim:
            resized = F.interpolate(value.float().T[None], size=target.shape[0])  # nearest: the seed names no mode
            out[key] = resized[0].T.to(value.dtype)
        elif key == "pos_embed" and value.ndim == 4 == target.ndim:
            grid = value.float().permute(0, 3, 1, 2)
            resized = F.interpolate(grid, size=tuple(target.shape[1:3]), mode="bicubic", antialias=True)
            out[key] = resized.permute(0, 2, 3, 1).to(value.dtype)
    return out
