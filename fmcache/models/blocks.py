"""A foundation seen as embedding → blocks → post-block modules: each backend's block layout, run piece by piece.

``Foundation.forward`` returns every layer at once, which is what extraction wants. Fine-tuning needs the pieces: the
frozen prefix (embedding and blocks 1..K) runs under ``torch.no_grad``, the forward stops after block I
(decapitation), and the from-cache path starts at block K+1 from cached layer-K tokens. Each adapter that has a block
list answers ``block_layout()`` with one of these views, which run those pieces with the backend's own modules (timm
ViT ``blocks``, timm SAM ``blocks`` in NHWC, open_clip ``transformer.resblocks``, transformers BLIP
``encoder.layers``, SAM2's Hiera ``trunk.blocks``). CNNs, FocalNet and other stage-based models answer None: they
fine-tune whole or frozen, and a block number is refused naming their unit (``layer_unit``).

SAM2 is both: its cached layers are the 4 Hiera stages, but its trunk is a list of blocks, and the follow-up freezes it
per block (``self.blocks = image_encoder.trunk.blocks``; ``--freeze K`` freezes blocks 1..K with the patch and
position embeddings and the neck). :class:`Sam2Stages` runs those blocks one by one and keeps each stage's output,
since the paper's feature (the FPN neck) reads stages 3 and 4.

A view's outputs equal the ``Foundation``'s for the same layer (``tests/test_finetune.py`` checks it), so a head sees
the same features as in the cache.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import nn

from fmcache.errors import FmcacheError
from fmcache.models.open_clip_pool import coca_head_tokens, open_clip_pool
from fmcache.models.registry import ModelSpec


class Owner(Protocol):
    """What a block view needs of its foundation (structural, so this module need not import the wrapper)."""

    spec: ModelSpec
    adapter: nn.Module

    @property
    def name(self) -> str: ...


class Stages:
    """One backend's embedding, blocks and post-block modules; subclasses know how to run each."""

    unit = "blocks"

    def __init__(self, foundation: Owner, root: nn.Module, blocks: nn.ModuleList, post: tuple[str, ...]):
        self.foundation = foundation
        self.root = root  # the module whose state dict is the model's own key layout
        self.blocks = blocks
        self.post = post  # attribute names of modules used only after the blocks (final norm, pooling, projection)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def prefix(self) -> int:
        return int(self.foundation.adapter.num_prefix_tokens)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](h)

    def to_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """The layer's raw output as (B, T, D), prefix tokens first: the layout the cache stores."""
        return h

    def from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_tokens`: cached layer tokens back into the next block's input."""
        return t

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def pooled(self, h: torch.Tensor, last: bool) -> torch.Tensor:
        """The paper's pooled feature of this layer (CLS or patch mean after the final norm)."""
        normed = self.norm(h)
        kind = self.pooled_kind
        if kind == "cls":
            return normed[:, 0]
        return normed[:, self.prefix :].mean(dim=1)

    @property
    def pooled_kind(self) -> str:
        kind = self.foundation.spec.pooled
        if kind == "auto":
            kind = "cls" if self.prefix > 0 else "mean"
        return "cls" if kind == "pooled" else kind

    def deit_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """What the stacked DeiT head reads, by the registry's ``head_tokens`` rule (as ``--tokens paper`` caches it):
        patch tokens before the final norm, or after it (BLIP, MAE, AIMv2); prefix tokens dropped."""
        rule = self.foundation.spec.head_tokens
        if rule == "prenorm":
            return self.to_tokens(h)[:, self.prefix :]
        if rule == "final":
            return self.norm(h)[:, self.prefix :]
        raise FmcacheError(f"{self.foundation.name}: its {rule} tokens come from modules after the blocks")

    def post_uses_norm_for_tokens(self) -> bool:
        """Whether the DeiT head's input passes modules after the blocks (so they train with the blocks)."""
        return self.foundation.spec.head_tokens != "prenorm"

    def partition(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The root's parameters as embed / block i / post (names in the root's own layout)."""
        block_ids = {id(p): i for i, b in enumerate(self.blocks) for p in b.parameters()}
        post_ids = {
            id(p)
            for name in self.post
            if isinstance(getattr(self.root, name, None), nn.Module)
            for p in getattr(self.root, name).parameters()
        }
        post_ids |= {
            id(getattr(self.root, n)) for n in self.post if isinstance(getattr(self.root, n, None), nn.Parameter)
        }
        out: dict[str, list] = {"embed": [], "post": [], **{f"block{i}": [] for i in range(self.depth)}}
        for name, p in self.root.named_parameters():
            if id(p) in block_ids:
                out[f"block{block_ids[id(p)]}"].append((name, p))
            elif id(p) in post_ids:
                out["post"].append((name, p))
            else:
                out["embed"].append((name, p))
        return out


class TimmVitStages(Stages):
    def __init__(self, foundation: Owner):
        m = foundation.adapter.model
        super().__init__(foundation, m, m.blocks, ("norm", "fc_norm", "head", "attn_pool"))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.root
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.root.norm(h)


class TimmSamStages(Stages):
    """timm's SAM encoder keeps (B, H, W, C) maps between blocks; the cache stores them flattened row-major."""

    def __init__(self, foundation: Owner):
        m = foundation.adapter.model
        super().__init__(foundation, m, m.blocks, ("neck", "head"))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers import resample_abs_pos_embed_nhwc

        m = self.root
        h = m.patch_embed(x)
        if m.pos_embed is not None:
            h = h + resample_abs_pos_embed_nhwc(m.pos_embed, h.shape[1:3])
        return m.norm_pre(m.patch_drop(m.pos_drop(h)))

    def to_tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(h.shape[0], -1, h.shape[-1])

    def from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        side = round(t.shape[1] ** 0.5)
        if side * side != t.shape[1]:
            raise FmcacheError(f"cached SAM tokens ({t.shape[1]}) do not form a square map")
        return t.reshape(t.shape[0], side, side, t.shape[-1])

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.to_tokens(h)  # no final norm on SAM's tokens (the neck is not used)


class OpenClipStages(Stages):
    def __init__(self, foundation: Owner):
        v = foundation.adapter.visual
        super().__init__(
            foundation, v, v.transformer.resblocks, ("ln_post", "proj", "attn_pool", "attn_pool_contrastive")
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.root._embeds(x)

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if getattr(self.root.transformer, "batch_first", True):
            return self.blocks[i](h, attn_mask=None)
        return self.blocks[i](h.transpose(0, 1), attn_mask=None).transpose(0, 1)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.root.ln_post(h)

    def pooled(self, h: torch.Tensor, last: bool) -> torch.Tensor:
        # CLIP's projection / CoCa's attention pooler is defined on the last block only; a decapitated CLIP
        # gives its CLS after ln_post instead
        if self.foundation.spec.pooled == "pooled" and last:
            return open_clip_pool(self.root, h)[0]
        return self.norm(h)[:, 0]

    def deit_tokens(self, h: torch.Tensor) -> torch.Tensor:
        if self.foundation.spec.head_tokens != "pooler":
            return super().deit_tokens(h)
        return coca_head_tokens(*open_clip_pool(self.root, h))  # CoCa (the follow-up)


class BlipStages(Stages):
    def __init__(self, foundation: Owner):
        m = foundation.adapter.model
        super().__init__(foundation, m, m.encoder.layers, ("post_layernorm",))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        native = self.foundation.adapter.native_size
        kwargs = {"interpolate_pos_encoding": True} if x.shape[-1] != native else {}
        return self.root.embeddings(x, **kwargs)

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out = self.blocks[i](h)
        return out[0] if isinstance(out, tuple) else out

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.root.post_layernorm(h)

    @property
    def prefix(self) -> int:
        return 1  # BLIP's CLS is token 0 (its adapter learns this on the first forward)


class HieraState(NamedTuple):
    """What flows between Hiera blocks: the (B, H, W, C) map and the stage outputs finished so far (NCHW)."""

    x: torch.Tensor
    stages: tuple[torch.Tensor, ...]


class Sam2Stages(Stages):
    """SAM2's image encoder: Hiera ``trunk.blocks`` as blocks, the FPN neck after them.

    Block K (1-based) of ``--freeze K`` is Hiera block K; stage s of the cache ends at block ``stage_ends[s] + 1``
    (b+: blocks 2, 5, 21, 24; l: 2, 8, 44, 48). Both the linear head's pooled feature and the DeiT head's tokens
    are the neck's stride-16 map, which needs stages 3 and 4: the forward cannot stop early (``--drop-after`` below
    the last block is refused) and cannot start from cached stage tokens.
    """

    def __init__(self, foundation: Owner):
        encoder = foundation.adapter.encoder
        super().__init__(foundation, encoder, encoder.trunk.blocks, ("neck",))
        self.stage_ends = tuple(encoder.trunk.stage_ends)

    @property
    def prefix(self) -> int:
        return 0

    def embed(self, x: torch.Tensor) -> HieraState:
        trunk = self.root.trunk
        return HieraState(trunk._pos_embed(trunk.patch_embed(x)), ())

    def run_block(self, i: int, h: HieraState) -> HieraState:
        x = self.blocks[i](h.x)
        done = (*h.stages, x.permute(0, 3, 1, 2)) if i in self.stage_ends else h.stages
        return HieraState(x, done)

    def to_tokens(self, h: HieraState) -> torch.Tensor:
        return h.x.reshape(h.x.shape[0], -1, h.x.shape[-1])

    def from_tokens(self, t: torch.Tensor) -> HieraState:
        raise FmcacheError(
            f"{self.foundation.name}: its cached layers are Hiera stages, not blocks, and its head reads the FPN neck "
            "over stages 3 and 4; fine-tune it from images (without --from-cache)"
        )

    def _neck(self, h: HieraState) -> torch.Tensor:
        if len(h.stages) != len(self.stage_ends):
            raise FmcacheError(
                f"{self.foundation.name}: the paper's feature is the FPN neck over Hiera stages 3 and 4, so the "
                f"forward must run all {self.depth} blocks; --drop-after is not available for it"
            )
        return self.root.neck.vision_features(list(h.stages))

    def norm(self, h: HieraState) -> torch.Tensor:
        return self.to_tokens(h)  # no final norm on the trunk's stages

    def pooled(self, h: HieraState, last: bool) -> torch.Tensor:
        return self._neck(h).float().mean(dim=(2, 3))  # as Sam2Adapter: the neck's stride-16 map, averaged

    def deit_tokens(self, h: HieraState) -> torch.Tensor:
        return self._neck(h).flatten(2).transpose(1, 2)

    def post_uses_norm_for_tokens(self) -> bool:
        return True  # both heads read the neck: it trains with --freeze none


class FocalState(NamedTuple):
    """What flows between FocalNet stages: the next stage's input (NCHW, after this stage's downsampling, before any
    norm) and this stage's normed output (NCHW: SEEM's res2..res5, what the cache stores and the heads read)."""

    x: torch.Tensor
    out: torch.Tensor | None


class FocalStages(Stages):
    """SEEM's FocalNet-T, stage by stage: the seed takes each of the four stages as a "block" (``backbone.layers``),
    so ``--freeze K`` freezes stages 1..K and ``--drop-after I`` reads stage I's output (the seed's ``res{I+1}``).
    The per-stage norms (norm0..norm3) come after the stages and, as the patch embedding, stay frozen unless
    ``--freeze none``. Cached stage tokens are normed outputs, not the next stage's input: no ``--from-cache``."""

    unit = "FocalNet stages"

    def __init__(self, foundation: Owner):
        model = foundation.adapter.model
        norms = tuple(f"norm{i}" for i in range(len(model.layers)))
        super().__init__(foundation, model, model.layers, norms)

    @property
    def prefix(self) -> int:
        return 0

    def embed(self, x: torch.Tensor) -> FocalState:
        return FocalState(self.root.patch_embed(x), None)

    def run_block(self, i: int, h: FocalState) -> FocalState:
        stage = self.blocks[i]
        x = stage(h.x)
        out = getattr(self.root, f"norm{i}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return FocalState(stage.downsample(x) if stage.downsample is not None else x, out)

    def to_tokens(self, h: FocalState) -> torch.Tensor:
        return h.out.flatten(2).transpose(1, 2)

    def from_tokens(self, t: torch.Tensor) -> FocalState:
        raise FmcacheError(
            f"{self.foundation.name}: its cached layers are normed stage outputs, not the next stage's input; fine-tune "
            "it from images (without --from-cache)"
        )

    def norm(self, h: FocalState) -> torch.Tensor:
        return self.to_tokens(h)  # every stage's output is already normed; there is no final norm

    def deit_tokens(self, h: FocalState) -> torch.Tensor:
        return self.to_tokens(h)  # the seed feeds the stage's flattened map (7 × 7 = 49 tokens at 224 for res5)

    def post_uses_norm_for_tokens(self) -> bool:
        return True  # both heads read a stage's norm: the norms train with --freeze none
