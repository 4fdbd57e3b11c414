"""SEEM's FocalNet-T image backbone, written for fmcache so that SEEM's own checkpoint loads strictly.

The paper's "SEEM" foundation is the image backbone of SEEM (``seem_focalt_v0.pt`` in the Hugging Face repo
``xdecoder/SEEM``). That backbone is X-Decoder's detectron2 variant of FocalNet ("focal_dw"), a different network
from the ImageNet FocalNet that timm ships, so timm cannot load the checkpoint. This module re-implements it from
the published architecture; no code is copied.

Facts used, and where they come from:

* Configuration of the v0 focal-T model: ``configs/seem/focalt_unicl_lang_v0.yaml`` in
  github:UX-Decoder/Segment-Everything-Everywhere-All-At-Once (``MODEL.BACKBONE.NAME: focal_dw``):
  patch size 4, embed dim 96, depths (2, 2, 6, 2), focal levels (3, 3, 3, 3), focal windows (3, 3, 3, 3),
  MLP ratio 4, PATCH_NORM true, USE_CONV_EMBED true, SCALING_MODULATOR true, USE_POSTLN true,
  USE_POSTLN_IN_MODULATION false, USE_LAYERSCALE true, OUT_INDICES (0, 1, 2, 3) → res2..res5.
  The paper's seed (github:joanaapa/Foundation-Medical, ``utils/transformers/focal_dw.py``, class ``D2FocalNet``)
  hard-codes the same values, and ``defaults/models.py`` there loads the file's ``backbone.*`` tensors with the
  prefix stripped and ``strict=True`` and pools the mean of ``res5``.
* Architecture (``modeling/vision/backbone/focal_dw.py`` in the SEEM repo, identical to the seed's copy apart
  from its config plumbing):
  - stem ``patch_embed``: 7×7 convolution, stride 4, padding 3, with bias, then LayerNorm over channels
    (``patch_embed.norm``); between stages ``layers.i.downsample``: 3×3 convolution, stride 2, padding 1, doubling
    the width, then LayerNorm (``downsample.norm``). Inputs not divisible by the stride are zero-padded at the
    right/bottom first.
  - block (post-norm variant): x += dw1(x) (3×3 depthwise conv with bias); x = norm1(x + gamma_1 · modulation(x));
    x += dw2(x); x = norm2(x + gamma_2 · mlp(x)). Layer scale ``gamma_1``/``gamma_2`` are (C,) parameters
    (initial value 1e-4). MLP: fc1 (C → 4C), exact GELU, fc2.
  - focal modulation: ``f`` Linear(C, 2C + L + 1) splits into query, context and L + 1 gates; level k
    (k = 0..L-1) is a depthwise conv without bias of kernel ``2k + window`` (3, 5, 7 for focal-T), "same" padding,
    followed by GELU, applied to the previous level's output; the global context is GELU of the spatial mean of
    the last level; the gated sum is divided by L + 1 (``scaling_modulator``); then ``h`` (1×1 conv with bias),
    multiplied with the query, and ``proj`` Linear(C, C). No LayerNorm inside the modulation for this config
    (USE_POSTLN_IN_MODULATION false). The ImageNet FocalNet's ``normalize_modulator`` option does not exist in
    this variant; ``scaling_modulator`` is its counterpart.
  - outputs: stage i's output *before* its downsampling goes through ``norm{i}`` (LayerNorm) and is returned as
    (B, C_i, H_i, W_i), C_i = 96·2^i, strides 4, 8, 16, 32. The network has no final ``norm`` and no head.
* State-dict layout: the names above are the module names of that file (``patch_embed.proj``, ``patch_embed.norm``,
  ``layers.{i}.blocks.{j}.{dw1,norm1,modulation.{f,h,proj,focal_layers.{k}.0},dw2,norm2,mlp.{fc1,fc2},gamma_1,
  gamma_2}``, ``layers.{i}.downsample.{proj,norm}`` for i < 3, ``norm0``..``norm3``); the module has no buffers.
  The seed's strict load of the checkpoint's ``backbone.*`` tensors into that class establishes that the file
  holds exactly these keys.

Stochastic depth is SEEM's (``drop_path_rate`` 0.3, rising linearly over the 12 blocks, as the seed's
``D2FocalNet``): it acts only in train mode, so fine-tuning sees it and extraction (eval mode) does not. Dropout is
0 in SEEM's config and left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# SEEM focal-T (configs/seem/focalt_unicl_lang_v0.yaml)
SEEM_FOCALT = {
    "embed_dim": 96,
    "depths": (2, 2, 6, 2),
    "focal_levels": (3, 3, 3, 3),
    "focal_windows": (3, 3, 3, 3),
    "mlp_ratio": 4.0,
    "drop_path_rate": 0.3,  # D2FocalNet's, for fine-tuning; an identity in eval mode
}


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an NCHW map at the right and bottom to a multiple of ``multiple``, as SEEM's patch embedding does."""
    h, w = x.shape[-2:]
    pad_w, pad_h = (-w) % multiple, (-h) % multiple
    if pad_w or pad_h:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


class ConvEmbed(nn.Module):
    """Overlapping conv embedding + channel LayerNorm: the stem (7×7/4) and the downsampling (3×3/2) layers."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_chans, out_chans, kernel_size=kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(_pad_to_multiple(x, self.stride))
        # LayerNorm normalises channels, so move them last for the norm and back
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """fc1 → GELU → fc2 (key names ``mlp.fc1``/``mlp.fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FocalModulation(nn.Module):
    """Focal modulation on NHWC maps: gated multi-level depthwise contexts modulate a linear query."""

    def __init__(self, dim: int, focal_level: int, focal_window: int, focal_factor: int = 2):
        super().__init__()
        self.focal_level = focal_level
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)  # query, context, one gate per level + global
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        layers = []
        for k in range(focal_level):
            kernel = focal_factor * k + focal_window
            # a Sequential so that the conv's weight is named focal_layers.{k}.0.weight as in the checkpoint
            conv = nn.Conv2d(dim, dim, kernel_size=kernel, padding=kernel // 2, groups=dim, bias=False)
            layers.append(nn.Sequential(conv, nn.GELU()))
        self.focal_layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        q, ctx, gates = self.f(x).permute(0, 3, 1, 2).split((c, c, self.focal_level + 1), dim=1)
        ctx_all = torch.zeros_like(ctx)
        for k, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)  # each level refines the previous one: growing receptive field
            ctx_all = ctx_all + ctx * gates[:, k : k + 1]
        ctx_global = self.act(ctx.mean(dim=(2, 3), keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level :]
        ctx_all = ctx_all / (self.focal_level + 1)  # SEEM's scaling_modulator
        out = (q * self.h(ctx_all)).permute(0, 2, 3, 1)
        return self.proj(out)


class FocalBlock(nn.Module):
    """SEEM's post-norm focal block with depthwise convs before the modulation and before the MLP, on NCHW maps."""

    def __init__(
        self,
        dim: int,
        focal_level: int,
        focal_window: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
        layerscale: float = 1e-4,
    ):
        super().__init__()
        from timm.layers import DropPath

        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.dw1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_level, focal_window)
        self.dw2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), layerscale))
        self.gamma_2 = nn.Parameter(torch.full((dim,), layerscale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dw1(x)
        x = x.permute(0, 2, 3, 1)  # NHWC for the norms, linears and layer scale
        x = self.norm1(x + self.drop_path(self.gamma_1 * self.modulation(x)))
        x = x.permute(0, 3, 1, 2)
        x = x + self.dw2(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm2(x + self.drop_path(self.gamma_2 * self.mlp(x)))
        return x.permute(0, 3, 1, 2)


class FocalStage(nn.Module):
    """A stage's blocks and, except for the last stage, the downsampling that feeds the next one."""

    def __init__(
        self,
        dim: int,
        focal_level: int,
        focal_window: int,
        mlp_ratio: float,
        downsample: bool,
        drop_path: Sequence[float],
    ):
        super().__init__()
        # one block per drop-path rate (the stage's share of the network's linspace)
        self.blocks = nn.ModuleList(FocalBlock(dim, focal_level, focal_window, mlp_ratio, rate) for rate in drop_path)
        self.downsample = ConvEmbed(dim, 2 * dim, kernel=3, stride=2) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class SeemFocalNet(nn.Module):
    """SEEM's FocalNet backbone (focal-T by default); ``state_dict()`` keys equal the checkpoint's ``backbone.*``
    keys with that prefix removed. ``forward_stages`` gives res2..res5 after their norms."""

    def __init__(
        self,
        embed_dim: int = SEEM_FOCALT["embed_dim"],
        depths: Sequence[int] = SEEM_FOCALT["depths"],
        focal_levels: Sequence[int] = SEEM_FOCALT["focal_levels"],
        focal_windows: Sequence[int] = SEEM_FOCALT["focal_windows"],
        mlp_ratio: float = SEEM_FOCALT["mlp_ratio"],
        in_chans: int = 3,
        drop_path_rate: float = SEEM_FOCALT["drop_path_rate"],
    ):
        super().__init__()
        n = len(depths)
        if not (len(focal_levels) == len(focal_windows) == n):
            raise ValueError("depths, focal_levels and focal_windows need one entry per stage")
        self.num_features = [embed_dim * 2**i for i in range(n)]
        self.patch_embed = ConvEmbed(in_chans, embed_dim, kernel=7, stride=4)
        # the seed's stochastic depth decay rule: linspace(0, rate) over every block, in order
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList(
            FocalStage(
                self.num_features[i],
                focal_levels[i],
                focal_windows[i],
                mlp_ratio,
                i < n - 1,
                rates[sum(depths[:i]) : sum(depths[: i + 1])],
            )
            for i in range(n)
        )
        for i, width in enumerate(self.num_features):  # per-stage output norms, named norm0..norm{n-1}
            self.add_module(f"norm{i}", nn.LayerNorm(width))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The original's init: truncated normal (std 0.02) linears with zero bias, unit LayerNorms; convs keep
        # PyTorch's default. Only matters for --random-init.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output after its norm, (B, C_i, H_i, W_i): SEEM's res2, res3, res4, res5."""
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            norm: nn.LayerNorm = getattr(self, f"norm{i}")
            outs.append(norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)  # the next stage reads the un-normed map, as in SEEM
        return outs

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """D2FocalNet's interface: a dict res2..res5."""
        return {f"res{i + 2}": t for i, t in enumerate(self.forward_stages(x))}
