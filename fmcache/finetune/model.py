"""A foundation seen as embedding → blocks → final norm, with a head: freezing, decapitation, export.

``Foundation.forward`` returns every layer at once, which is what extraction wants. Fine-tuning needs the pieces:
the frozen prefix (embedding and blocks 1..K) runs under ``torch.no_grad`` so it keeps no activations, the forward
stops after block I (decapitation), and the from-cache path starts at block K+1 from cached layer-K tokens. Each
backend with a block list gets a small :class:`Stages` view that runs those pieces with the backend's own modules
(timm ViT ``blocks``, timm SAM ``blocks`` in NHWC, open_clip ``transformer.resblocks``, transformers BLIP
``encoder.layers``). CNNs, Hiera (SAM2), FocalNet and other stage-based models have no view: they fine-tune
whole (``--freeze none``) or frozen (``--freeze all``), and a block number is refused naming their unit.

The view's outputs equal the ``Foundation``'s for the same layer (``tests/test_finetune.py`` checks it), so a head
sees the same features here as in the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fmcache.errors import FmcacheError
from fmcache.models import Foundation

FREEZE_HELP = (
    "none: every block trains; all: the foundation is frozen (the online baseline); K: blocks 1..K are frozen. "
    "Patch/position embedding and the final norm are frozen whenever any block is (as in the seed)."
)


class Stages:
    """One backend's embedding, blocks and post-block modules; subclasses know how to run each."""

    unit = "blocks"

    def __init__(self, foundation: Foundation, root: nn.Module, blocks: nn.ModuleList, post: tuple[str, ...]):
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
        """Patch tokens for the stacked DeiT head: prefix dropped, before the final norm (PROTOCOLS.md)."""
        return self.to_tokens(h)[:, self.prefix :]

    def post_uses_norm_for_tokens(self) -> bool:
        return False

    def partition(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The root's parameters as embed / block i / post (names in the root's own layout)."""
        block_ids = {id(p): i for i, b in enumerate(self.blocks) for p in b.parameters()}
        post_ids = {id(p) for name in self.post if isinstance(getattr(self.root, name, None), nn.Module)
                    for p in getattr(self.root, name).parameters()}  # fmt: skip
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
    def __init__(self, foundation: Foundation):
        m = foundation.adapter.model
        super().__init__(foundation, m, m.blocks, ("norm", "fc_norm", "head", "attn_pool"))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.root
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.root.norm(h)


class TimmSamStages(Stages):
    """timm's SAM encoder keeps (B, H, W, C) maps between blocks; the cache stores them flattened row-major."""

    def __init__(self, foundation: Foundation):
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
    def __init__(self, foundation: Foundation):
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
            pooled, _ = self.root._pool(h)
            return pooled @ self.root.proj if self.root.proj is not None else pooled
        return self.norm(h)[:, 0]


class BlipStages(Stages):
    def __init__(self, foundation: Foundation):
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

    def deit_tokens(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)[:, 1:]  # BLIP feeds the DeiT head after its final norm (PROTOCOLS.md)

    def post_uses_norm_for_tokens(self) -> bool:
        return True


def stages_for(foundation: Foundation) -> Stages | None:
    """The block view of a foundation, or None when its layers are stages (CNN, Hiera, FocalNet)."""
    adapter = foundation.adapter
    kind = type(adapter).__name__
    if kind == "TimmAdapter":
        name = type(adapter.model).__name__
        if name == "VisionTransformerSAM":
            return TimmSamStages(foundation)
        if name == "VisionTransformer" and adapter.vit_like:
            return TimmVitStages(foundation)
        return None
    if kind == "OpenClipAdapter" and hasattr(adapter.visual, "transformer"):
        return OpenClipStages(foundation)
    if kind == "HfAdapter" and foundation.spec.family == "blip":
        return BlipStages(foundation)
    return None


def root_module(foundation: Foundation) -> nn.Module:
    """The module whose state dict ``extract --weights`` loads: the backend's own model, in its own key layout."""
    adapter = foundation.adapter
    for attr in ("model", "visual", "encoder"):
        module = getattr(adapter, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise FmcacheError(f"{foundation.name}: cannot find the backend module to export")


def layer_unit(foundation: Foundation) -> str:
    family = foundation.spec.family
    if family in ("resnet",):
        return "stages (stem + 4 stages)"
    if family in ("sam2",):
        return "Hiera stages"
    if family in ("focalnet",):
        return "FocalNet stages"
    return "stages"


def parse_freeze(value: str | int) -> str | int:
    text = str(value).strip().lower()
    if text in ("none", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise FmcacheError(f"bad --freeze '{value}'; use none, all or a block count K") from None


class FineTuneModel(nn.Module):
    """Foundation + head with the requested freezing and decapitation applied.

    ``freeze`` is "none", "all" or K (blocks 1..K frozen); ``drop_after`` I runs blocks 1..I only (None: all).
    ``head_input`` is "pooled" (the layer's pooled feature, for a linear head) or "tokens" (patch tokens, for the
    stacked DeiT head). The foundation stays in eval mode while training, as in the seed: dropout and drop-path
    are off and BatchNorm statistics stay fixed.
    """

    def __init__(
        self,
        foundation: Foundation,
        head: nn.Module,
        head_input: str,
        freeze: str | int,
        drop_after: int | None,
        stages: Stages | None = None,
    ):
        super().__init__()
        self.foundation = foundation
        self.head = head
        self.head_input = head_input
        self.stages = stages if stages is not None else stages_for(foundation)
        self.freeze, self.drop_after = check_freeze(foundation, self.stages, freeze, drop_after)
        self._apply_freeze()

    # -- freezing -------------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int | None:
        return self.stages.depth if self.stages else None

    @property
    def used_blocks(self) -> int:
        return self.drop_after if self.drop_after is not None else (self.depth or 0)

    @property
    def first_trainable_block(self) -> int:
        """0-based index of the first block that trains (``used_blocks`` when none does)."""
        if self.freeze == "all":
            return self.used_blocks
        if self.freeze == "none":
            return 0
        return min(int(self.freeze), self.used_blocks)

    @property
    def any_block_frozen(self) -> bool:
        return self.freeze == "all" or (isinstance(self.freeze, int) and self.freeze > 0)

    def _apply_freeze(self) -> None:
        self.foundation.requires_grad_(False)
        self.head.requires_grad_(True)
        if self.freeze == "all":
            return
        if self.stages is None:  # stage-based models: whole (none) or nothing (all)
            self.foundation.requires_grad_(True)
            return
        parts = self.stages.partition()
        trainable = [f"block{i}" for i in range(self.first_trainable_block, self.used_blocks)]
        if not self.any_block_frozen:
            trainable.append("embed")
            if self.head_input == "pooled" or self.stages.post_uses_norm_for_tokens():
                trainable.append("post")  # unused post modules (e.g. CLIP's projection for a DeiT head) stay out
        for part in trainable:
            for _, p in parts[part]:
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> FineTuneModel:
        super().train(mode)
        self.foundation.eval()  # the seed keeps the backbone in eval mode
        return self

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def layer_ids(self) -> dict[str, int]:
        """Layer index per trainable parameter for layer-wise LR decay: embedding 0, block i i+1, rest depth+1."""
        top = (self.depth or 0) + 1
        ids = {}
        if self.stages is not None:
            parts = self.stages.partition()
            prefix = "foundation.adapter." + _root_attr(self.foundation) + "."
            for part, params in parts.items():
                layer = 0 if part == "embed" else top if part == "post" else int(part[5:]) + 1
                for name, _ in params:
                    ids[prefix + name] = layer
        return {n: ids.get(n, top if n.startswith("head.") else 0) for n, _ in self.trainable_named_parameters()}

    # -- forward --------------------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The head's input from images: the frozen prefix runs under no_grad and keeps no activations."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.stages is None:
            ctx = torch.no_grad() if self.freeze == "all" else contextlib.nullcontext()
            with ctx:
                out = self.foundation(images)
            if self.head_input == "pooled":
                return out.pooled
            return out.tokens[-1][:, out.num_prefix_tokens :]
        start = self.first_trainable_block
        with _grad(not self.any_block_frozen):
            h = self.stages.embed(images)
        for i in range(self.used_blocks):
            with _grad(i >= start):
                h = self.stages.run_block(i, h)
        return self._head_input(h, start < self.used_blocks or not self.any_block_frozen)

    def features_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The head's input from cached layer-K tokens (K = ``freeze``): only blocks K+1..I run."""
        assert self.stages is not None and isinstance(self.freeze, int)
        h = self.stages.from_tokens(tokens)
        for i in range(self.freeze, self.used_blocks):
            h = self.stages.run_block(i, h)
        return self._head_input(h, self.freeze < self.used_blocks)

    def _head_input(self, h: torch.Tensor, grad: bool) -> torch.Tensor:
        with _grad(grad):
            if self.head_input == "pooled":
                return self.stages.pooled(h, last=self.used_blocks == self.depth).float()
            return self.stages.deit_tokens(h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features_from_tokens(tokens))


@contextlib.contextmanager
def _grad(enabled: bool) -> Iterator[None]:
    """Grad on only where asked and where the caller allows it (evaluation runs all of this under no_grad)."""
    with torch.set_grad_enabled(enabled and torch.is_grad_enabled()):
        yield


def _root_attr(foundation: Foundation) -> str:
    for attr in ("model", "visual", "encoder"):
        if isinstance(getattr(foundation.adapter, attr, None), nn.Module):
            return attr
    return "model"


def check_freeze(
    foundation: Foundation, stages: Stages | None, freeze: str | int, drop_after: int | None
) -> tuple[str | int, int | None]:
    """Validate --freeze / --drop-after against the model's blocks (one line naming the depth or the unit)."""
    freeze = parse_freeze(freeze)
    if stages is None:
        if isinstance(freeze, int) or drop_after is not None:
            what = "--freeze K" if isinstance(freeze, int) else "--drop-after"
            raise FmcacheError(
                f"{what} needs a model made of blocks that freeze one by one; {foundation.name} is made of "
                f"{layer_unit(foundation)}; use --freeze none or all without --drop-after"
            )
        return freeze, None
    depth = stages.depth
    if isinstance(freeze, int) and not 0 <= freeze <= depth:
        raise FmcacheError(f"--freeze {freeze} is outside 0..{depth}: {foundation.name} has {depth} blocks")
    if drop_after is not None and not 1 <= drop_after <= depth:
        raise FmcacheError(f"--drop-after {drop_after} is outside 1..{depth}: {foundation.name} has {depth} blocks")
    return freeze, drop_after
