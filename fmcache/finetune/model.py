"""A foundation with a head: freezing, decapitation and the forward that fine-tuning trains.

The foundation's block layout (which modules are its embedding, blocks and post-block modules) is its adapter's
knowledge (:mod:`fmcache.models.blocks`); this module decides what trains and runs the pieces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fmcache.errors import FmcacheError
from fmcache.finetune.lora import is_lora_parameter, merged_state_dict
from fmcache.finetune.spec import parse_freeze
from fmcache.models import Foundation
from fmcache.models.blocks import Stages


class FineTuneModel(nn.Module):
    """Foundation + head with the requested freezing and decapitation applied.

    ``freeze`` is "none" (everything trains), "all" or K (blocks 1..K frozen; embedding, CLS, position table and
    final norm frozen too, as the seed's ``unfreeze_cutoff=K``, K = 0 included); ``drop_after`` I runs blocks 1..I
    only (None: all). ``head_input`` is "pooled" (the layer's pooled feature, for a linear head) or "tokens" (patch
    tokens, for the stacked DeiT head).

    ``method`` "lora": only the peft adapters already injected into the trainable blocks train (the embedding,
    final norm and every base weight stay frozen); the export merges them (:meth:`foundation_state_dict`).

    Modes follow the seed (PROTOCOLS.md, "Details that change numbers"): in :meth:`train`, the parts that train run
    in train mode (dropout, drop-path such as SEEM's 0.3, BatchNorm statistics update), the frozen ones in eval mode.
    """

    def __init__(
        self,
        foundation: Foundation,
        head: nn.Module,
        head_input: str,
        freeze: str | int,
        drop_after: int | None,
        stages: Stages | None = None,
        method: str = "full",
    ):
        super().__init__()
        self.foundation = foundation
        self.head = head
        self.head_input = head_input
        self.method = method  # full, or lora: only the adapters (fmcache.finetune.lora) of the trainable blocks train
        self.lora: dict | None = None  # the adapters' report (fmcache.finetune.build.build_model), for the results
        self.stages = stages if stages is not None else foundation.block_layout()
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
    def embed_trainable(self) -> bool:
        """Embedding, CLS, position table and final norm train only with ``--freeze none`` (the seed's cutoff K,
        0 included, keeps them frozen); never with LoRA, which trains adapters only."""
        return self.freeze == "none" and self.method == "full"

    def _apply_freeze(self) -> None:
        self.foundation.requires_grad_(False)
        self.head.requires_grad_(True)
        if self.freeze == "all":
            return
        if self.stages is None:  # stage-based models: whole (none) or nothing (all)
            self.foundation.requires_grad_(True)
            return
        if self.method == "lora":  # the adapters peft injected into the trainable blocks, nothing else
            for i in range(self.first_trainable_block, self.used_blocks):
                for name, p in self.stages.blocks[i].named_parameters():
                    if is_lora_parameter(name):
                        p.requires_grad_(True)
            return
        parts = self.stages.partition()
        trainable = [f"block{i}" for i in range(self.first_trainable_block, self.used_blocks)]
        if self.embed_trainable:
            trainable.append("embed")
            if self.head_input == "pooled" or self.stages.post_uses_norm_for_tokens():
                trainable.append("post")  # unused post modules (e.g. CLIP's projection for a DeiT head) stay out
        for part in trainable:
            for _, p in parts[part]:
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> FineTuneModel:
        """Train mode for what trains, eval mode for what is frozen (the seed's ``backbone.eval()`` while frozen)."""
        super().train(mode)
        if not mode or self.embed_trainable:
            return self  # --freeze none: the whole foundation trains, as the seed's freeze_backbone=false
        self.foundation.eval()
        if self.stages is not None:
            for i in range(self.first_trainable_block, self.used_blocks):
                self.stages.blocks[i].train(mode)
        return self

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def foundation_state_dict(self) -> dict[str, torch.Tensor]:
        """The foundation's weights in its own key layout (what ``extract --weights`` loads); LoRA adapters merged."""
        if self.method == "lora":
            return merged_state_dict(self.foundation.root)
        return self.foundation.root.state_dict()

    def layer_ids(self) -> dict[str, int]:
        """Layer index per trainable parameter for layer-wise LR decay: embedding 0, block i i+1, rest depth+1."""
        top = (self.depth or 0) + 1
        ids = {}
        if self.stages is not None:
            parts = self.stages.partition()
            prefix = "foundation.adapter." + self.foundation.root_attr + "."
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
            return out.head_tokens  # the registry's rule: pre/post-norm patch tokens, SAM2's neck, ...
        start = self.first_trainable_block
        with _grad(self.embed_trainable):
            h = self.stages.embed(images)
        for i in range(self.used_blocks):
            with _grad(i >= start):
                h = self.stages.run_block(i, h)
        return self._head_input(h, start < self.used_blocks or self.embed_trainable)

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
                f"{foundation.layer_unit}; use --freeze none or all without --drop-after"
            )
        return freeze, None
    depth = stages.depth
    if isinstance(freeze, int) and not 0 <= freeze <= depth:
        raise FmcacheError(f"--freeze {freeze} is outside 0..{depth}: {foundation.name} has {depth} blocks")
    if drop_after is not None and not 1 <= drop_after <= depth:
        raise FmcacheError(f"--drop-after {drop_after} is outside 1..{depth}: {foundation.name} has {depth} blocks")
    return freeze, drop_after
