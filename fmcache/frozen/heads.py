"""Token heads on a frozen foundation's cached tokens: the seed's stacked DeiT-B and a V-JEPA-style attentive probe.

Both take (B, T, D) tokens (prefix tokens already dropped) and return (B, classes) logits.

- :class:`DeiTHead` is PROTOCOLS.md's "stacked DeiT head": ``Linear(d, 768)`` + ``LayerNorm(768)``, then the first
  ``depth`` DeiT-B blocks (timm's ``Block``, width 768, 12 heads, MLP ×4, LayerNorm eps 1e-6, dropout and drop-path 0)
  with DeiT's own CLS token and 14 × 14 position table, the table bicubic-interpolated (align_corners False) to the
  token grid on every forward, the CLS position kept; then the final LayerNorm, DeiT's CLS → ``Linear(768, classes)``.
  The projection and the classifier keep PyTorch's default initialisation, as in the seed.
  Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``, ``blocks.*``, ``norm.*``,
  ``head.*``), so DeiT's release file and timm's state dict load by name; the projection is ``proj.*``.
- :class:`AttentiveHead`: one learnable query attends over LayerNorm'd tokens (heads = width / 64), then residual +
  LayerNorm + MLP ×4 (residual) and a Linear classifier, as V-JEPA's attentive probe.

Pretrained DeiT-B weights (:func:`deit_pretrained_state`) come from the hub (timm's ``deit_base_patch16_224.fb_in1k``,
the seed's supervised ImageNet-1k DeiT-B/16) or a file (DeiT's release ``{'model': {...}}`` or a timm state dict),
always through :func:`fmcache.weightfiles.load_weights_file`'s strict checks; the classifier and patch embedding are
dropped. fmcache never falls back to random weights: random init is a separate, explicit choice.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from fmcache.choices import DEIT_DEPTH
from fmcache.errors import FmcacheError
from fmcache.frozen.specs import check_head_depth
from fmcache.weightfiles import load_weights_file

DEIT_WIDTH = 768
DEIT_HEADS = 12
DEIT_GRID = (14, 14)  # DeiT-B/16 at 224: the position table the checkpoint holds
DEIT_HUB_ID = "timm/deit_base_patch16_224.fb_in1k"
DEIT_EPS = 1e-6


def _init_linear_and_norm(module: nn.Module) -> None:
    # timm's ViT init (trunc normal 0.02, zero bias; LayerNorm 1/0), so random-init heads start like timm's DeiT.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def token_grid(num_tokens: int) -> tuple[int, int]:
    """The square grid of ``num_tokens`` patch tokens (maps are flattened row-major), or a clear error."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise FmcacheError(
            f"{num_tokens} patch tokens do not form a square grid; the DeiT head needs the token map's grid"
        )
    return side, side


class _DeiTBody(nn.Module):
    """The parts of DeiT-B that the head takes from a checkpoint, under timm's names (the strict-load template)."""

    def __init__(self, depth: int):
        super().__init__()
        check_head_depth("deit", depth)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DEIT_WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + DEIT_GRID[0] * DEIT_GRID[1], DEIT_WIDTH))
        norm = partial(nn.LayerNorm, eps=DEIT_EPS)
        # dropout and drop-path 0, as the seed's head
        block = partial(
            Block, DEIT_WIDTH, DEIT_HEADS, mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0, attn_drop=0.0, drop_path=0.0
        )
        self.blocks = nn.Sequential(*[block(norm_layer=norm) for _ in range(depth)])
        self.norm = norm(DEIT_WIDTH)


class DeiTHead(_DeiTBody):
    """The seed's stacked DeiT head on (B, T, in_dim) patch tokens; see the module doc.

    ``grid`` is the token map's (rows, cols); None infers a square grid from T on each forward. The position table
    stays 14 × 14 (the learnable parameter, as in the checkpoint) and is resampled to the grid on every forward.
    Construction draws from the global torch RNG (seed it for a reproducible init).
    """

    def __init__(self, in_dim: int, num_classes: int, depth: int = DEIT_DEPTH, grid: tuple[int, int] | None = None):
        super().__init__(depth)
        if in_dim < 1 or num_classes < 1:
            raise FmcacheError(
                f"the DeiT head needs a positive token width and class count, got {in_dim}, {num_classes}"
            )
        self.in_dim, self.num_classes, self.depth = in_dim, num_classes, depth
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        # the seed's new layers keep PyTorch's default init (kaiming-uniform Linear, LayerNorm eps 1e-5); only the
        # DeiT-B parts, which a checkpoint overwrites, start as timm initialises DeiT
        self.proj = nn.Sequential(nn.Linear(in_dim, DEIT_WIDTH), nn.LayerNorm(DEIT_WIDTH))
        self.head = nn.Linear(DEIT_WIDTH, num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.blocks.apply(_init_linear_and_norm)
        self.norm.apply(_init_linear_and_norm)

    def pos_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + rows·cols, 768): the CLS position, then the 14 × 14 table resampled bicubically to ``grid``."""
        if tuple(grid) == DEIT_GRID:
            return self.pos_embed
        # antialias off: the seed interpolates with plain F.interpolate (bicubic, align_corners False)
        return resample_abs_pos_embed(
            self.pos_embed,
            new_size=list(grid),
            old_size=list(DEIT_GRID),
            num_prefix_tokens=1,
            interpolation="bicubic",
            antialias=False,
            align_corners=False,
        )

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + T, 768) after the final norm, CLS first."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_dim:
            raise FmcacheError(f"the DeiT head expects (B, T, {self.in_dim}) tokens, got {tuple(tokens.shape)}")
        grid = self.grid or token_grid(tokens.shape[1])
        if grid[0] * grid[1] != tokens.shape[1]:
            raise FmcacheError(f"{tokens.shape[1]} tokens do not fill the head's {grid[0]}×{grid[1]} grid")
        x = self.proj(tokens)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_table(grid)
        return self.norm(self.blocks(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(tokens)[:, 0])

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> None:
        """Load :func:`deit_pretrained_state`'s tensors; the projection and classifier keep their own init."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        wrong = [k for k in missing if not k.startswith(("proj.", "head."))] + list(unexpected)
        if wrong:
            raise FmcacheError(f"DeiT weights do not fit a {self.depth}-block head (e.g. {wrong[0]})")


def deit_pretrained_state(weights: str | Path, depth: int = DEIT_DEPTH) -> tuple[dict[str, torch.Tensor], dict]:
    """DeiT-B's CLS token, position table, first ``depth`` blocks and final norm, and a report of where they came from.

    ``weights`` is ``"imagenet"`` (timm's hub file for the seed's DeiT-B/16) or a file path. The file must hold every
    tensor of those parts with DeiT-B's shapes (missing or mis-shaped tensors are refused, pickles with code too);
    the patch embedding, the classifier and blocks past ``depth`` are left out and counted in the report.
    """
    template = _DeiTBody(depth)
    if str(weights) == "imagenet":
        path = _hub_file()
        source = {"source": "hub", "hub_id": DEIT_HUB_ID}
    else:
        path = Path(weights)
        if not path.is_file():
            raise FmcacheError(f"--head-weights file {path} does not exist; pass a DeiT-B checkpoint or 'imagenet'")
        source = {"source": "file"}
    try:
        report = load_weights_file(template, path)
    except FmcacheError as exc:
        raise FmcacheError(f"--head-weights: {exc}") from exc
    state = {k: v.detach().clone() for k, v in template.state_dict().items()}
    info = {
        **source,
        "path": report.path,
        "sha256": report.sha256,
        "loaded": report.loaded,
        "total": report.total,
        "depth": depth,
        "left_out": len(report.unexpected),  # patch embedding, classifier, blocks past depth
    }
    return state, info


def _hub_file() -> Path:
    """timm's DeiT-B/16 file from the Hugging Face hub (or its local cache); offline it is one clear line."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(DEIT_HUB_ID, "model.safetensors"))
    except Exception as exc:
        what = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise FmcacheError(
            f"cannot fetch the ImageNet DeiT-B head weights ({DEIT_HUB_ID}) from the hub ({what}); "
            "pass --head-weights FILE (DeiT's release file or a timm state dict) or --head-random-init"
        ) from None


def load_deit_weights(head: DeiTHead, weights: str | Path) -> dict:
    """Load ``weights`` (``"imagenet"`` or a file) into ``head``; returns the report recorded in results."""
    state, info = deit_pretrained_state(weights, head.depth)
    head.load_pretrained(state)
    return info


class AttentiveHead(nn.Module):
    """V-JEPA-style attentive probe on (B, T, in_dim) tokens: one query, cross-attention, MLP, Linear.

    The query attends over the LayerNorm'd tokens with ``in_dim / 64`` heads (at least one, and a divisor of the
    width); the attention output joins the query as a residual, then LayerNorm → MLP (×4, GELU) is added as a second
    residual, and a Linear maps the pooled vector to the classes.
    """

    def __init__(self, in_dim: int, num_classes: int, num_heads: int | None = None):
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise FmcacheError(f"the attentive head needs a positive token width and class count, got {in_dim}")
        heads = num_heads or max(1, in_dim // 64)
        while in_dim % heads:  # widths such as 1000 have no /64 split; take the nearest smaller divisor
            heads -= 1
        self.in_dim, self.num_classes, self.num_heads = in_dim, num_classes, heads
        self.query = nn.Parameter(torch.zeros(1, 1, in_dim))
        self.norm_kv = nn.LayerNorm(in_dim, eps=DEIT_EPS)
        self.q = nn.Linear(in_dim, in_dim)
        self.kv = nn.Linear(in_dim, 2 * in_dim)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm_mlp = nn.LayerNorm(in_dim, eps=DEIT_EPS)
        self.mlp = Mlp(in_dim, 4 * in_dim)
        self.head = nn.Linear(in_dim, num_classes)
        trunc_normal_(self.query, std=0.02)
        self.apply(_init_linear_and_norm)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_dim:
            raise FmcacheError(f"the attentive head expects (B, T, {self.in_dim}) tokens, got {tuple(tokens.shape)}")
        b, t, d = tokens.shape
        h = self.num_heads
        query = self.query.expand(b, -1, -1)
        q = self.q(query).reshape(b, 1, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(tokens)).reshape(b, t, 2, h, d // h).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        x = query + self.proj(attended)
        x = x + self.mlp(self.norm_mlp(x))
        return self.head(x[:, 0])


def build_head(
    kind: str, in_dim: int, num_classes: int, depth: int = DEIT_DEPTH, grid: tuple[int, int] | None = None
) -> nn.Module:
    """A freshly initialised head of ``kind`` (``deit`` or ``attentive``); the caller seeds the global RNG."""
    if kind == "deit":
        return DeiTHead(in_dim, num_classes, depth, grid)
    if kind == "attentive":
        return AttentiveHead(in_dim, num_classes)
    raise FmcacheError(f"unknown token head '{kind}'; use deit or attentive")
