"""``finetune --method lora``: low-rank adapters in the trainable blocks, through the ``peft`` library.

Adapters go into named linears of every trainable block (blocks K+1..I with ``--freeze K`` / ``--drop-after I``),
injected in place into the foundation's own model (``peft.inject_adapter_in_model``), so the block views of
:mod:`fmcache.models.blocks` run them unchanged. Everything else stays frozen: the base weights, embedding, final
norm. Targets are names inside a block; the default is each family's attention qkv and output projection:

- timm ViT (DINOv2, DINO, DeiT, MAE, AIMv2) and timm SAM: ``attn.qkv``, ``attn.proj``;
- transformers BLIP: ``self_attn.qkv``, ``self_attn.projection``;
- open_clip (CLIP, CoCa): ``mlp.c_fc``, ``mlp.c_proj``. Its attention is an ``nn.MultiheadAttention``, which runs
  its packed qkv ``in_proj_weight`` and its ``out_proj`` weight outside any ``nn.Linear`` call; peft adapts it only
  through an experimental layer that merges before and unmerges after every forward (its rounding moves the frozen
  weights, and up to peft 0.21 it adds the out_proj update twice, huggingface/peft#3774), so it is not offered.

A stage-based model (CNN, Hiera, FocalNet) has no block list and LoRA does not apply to it.

The export (:func:`merged_state_dict`) is the foundation's own key layout with each adapted weight replaced by
``W + scale · B A``; ``fmcache extract --weights`` loads it as any fine-tuned foundation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fmcache.errors import FmcacheError
from fmcache.models.blocks import BlipStages, OpenClipStages, Stages, TimmSamStages, TimmVitStages

ADAPTER = "default"  # peft's adapter name; one adapter per run
MARK = "lora_"  # every peft LoRA parameter's name contains it (lora_A, lora_B)

# names inside a block: each family's attention qkv and output projection; open_clip's MLP (see above)
DEFAULT_TARGETS: tuple[tuple[type[Stages], tuple[str, ...]], ...] = (
    (TimmSamStages, ("attn.qkv", "attn.proj")),
    (TimmVitStages, ("attn.qkv", "attn.proj")),
    (BlipStages, ("self_attn.qkv", "self_attn.projection")),
    (OpenClipStages, ("mlp.c_fc", "mlp.c_proj")),  # its attention is an nn.MultiheadAttention (see above)
)


def _peft():
    try:
        import peft
    except ImportError:
        raise FmcacheError("--method lora needs the peft package; pip install 'fmcache[lora]' (peft>=0.13)") from None
    return peft


def is_lora_parameter(name: str) -> bool:
    return MARK in name


def default_targets(stages: Stages) -> tuple[str, ...]:
    for kind, targets in DEFAULT_TARGETS:
        if isinstance(stages, kind):
            return targets
    raise FmcacheError(
        f"no default --lora-targets for {type(stages).__name__}; name them: {', '.join(adaptable(stages))}"
    )


def adaptable(stages: Stages) -> list[str]:
    """The names inside a block that LoRA can adapt: its ``nn.Linear`` modules that run as modules (not the
    ``out_proj`` of an ``nn.MultiheadAttention``, whose weight the attention reads directly)."""
    block = stages.blocks[0]
    mha = [n for n, m in block.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return [
        n for n, m in block.named_modules() if isinstance(m, nn.Linear) and not any(n.startswith(a + ".") for a in mha)
    ]


def _blocks_prefix(stages: Stages) -> str:
    for name, module in stages.root.named_modules():
        if module is stages.blocks:
            return name
    raise FmcacheError(f"{stages.foundation.name}: its blocks are not inside its model")


def resolve_targets(stages: Stages | None, name: str, unit: str, targets: Sequence[str] | None) -> tuple[str, ...]:
    """The block-relative names to adapt, checked against the model (one line naming the ones that exist)."""
    if stages is None:
        raise FmcacheError(
            f"--method lora needs a model made of blocks (adapters go into their linears); {name} is made of {unit}, so LoRA "
            f"does not apply; use --method full"
        )
    chosen = tuple(targets) if targets else default_targets(stages)
    valid = adaptable(stages)
    for target in chosen:
        if target not in valid:
            why = (
                " (an nn.MultiheadAttention, which peft adapts only experimentally)"
                if _is_attention(stages, target)
                else ""
            )
            raise FmcacheError(
                f"--lora-targets: {name}'s blocks have no adaptable linear '{target}'{why}; they have: "
                f"{', '.join(valid)}"
            )
    return chosen


def inject(
    stages: Stages, blocks: range, targets: Sequence[str], rank: int, alpha: float, dropout: float, seed: int
) -> list[str]:
    """Adapters in ``targets`` of ``blocks`` (0-based), in place, initialised from ``seed`` (peft's init: A random,
    B zero, so the adapted model starts as the foundation). Returns the adapted modules' names in the root."""
    peft = _peft()
    prefix = _blocks_prefix(stages)
    names = [f"{prefix}.{i}.{t}" for i in blocks for t in targets]
    if not names:
        raise FmcacheError("--method lora: no block to adapt (every block is frozen or dropped)")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    root = stages.root
    wanted = {id(p) for p in root.parameters() if p.requires_grad}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, root, adapter_name=ADAPTER)
    for p in root.parameters():  # peft marks only its adapters trainable; the caller decides the rest
        if id(p) in wanted:
            p.requires_grad_(True)
    return names


def merged_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """``root``'s state dict in the foundation's own key layout with the adapters merged (``W + scale · B A``),
    computed from the live weights without changing them."""
    state = root.state_dict()
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        deltas = {}
        for name, layer in _tuner_layers(root).items():
            deltas[f"{name}.base_layer.weight"] = layer.get_delta_weight(ADAPTER)
        for key, value in state.items():
            if is_lora_parameter(key):
                continue
            if key in deltas:
                value = value.float() + deltas[key].float()
            merged[".".join(part for part in key.split(".") if part != "base_layer")] = value
    return merged


def _tuner_layers(root: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in root.named_modules() if isinstance(m, BaseTunerLayer)}


def _is_attention(stages: Stages, target: str) -> bool:
    block = stages.blocks[0]
    return any(
        n == target or target.startswith(n + ".")
        for n, m in block.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    )


def adapter_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone (peft's parameter names inside the foundation's model)."""
    return {k: v for k, v in root.state_dict().items() if is_lora_parameter(k)}
