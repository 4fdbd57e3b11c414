"""What a fine-tune run is built from: its spec seen as extraction settings (norm, weights identity, seeded random
init come from ``extract``'s code), the starting foundation, and the foundation + head with freezing and LoRA."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fmcache.extract.spec import ExtractSpec
from fmcache.finetune.lora import inject, is_lora_parameter, resolve_targets
from fmcache.finetune.model import FineTuneModel
from fmcache.finetune.spec import FinetuneSpec, parse_freeze
from fmcache.models import create_foundation


def extract_spec(spec: FinetuneSpec, dataset: str, data_root: Path):
    """The equivalent ``ExtractSpec``: norm, weights identity and seeded random init come from extract's code."""
    return ExtractSpec(
        dataset=dataset,
        data_root=data_root,
        model=spec.model,
        weights=spec.weights,
        random_init=spec.random_init,
        img_size=spec.img_size,
        norm=spec.norm,
        gray=spec.gray,
        dataset_options=dict(spec.dataset_options),
        arch_overrides=dict(spec.arch_overrides),
    )


def build_foundation(spec: FinetuneSpec, img_size: int):
    """The starting foundation, built exactly as ``extract`` builds it (the same seeded factory)."""
    return create_foundation(
        spec.model,
        weights=spec.weights,
        random_init=spec.random_init,
        img_size=img_size,
        arch_overrides=spec.arch_overrides or None,
    )


def build_model(spec: FinetuneSpec, img_size: int, num_classes: int, seed: int) -> tuple[FineTuneModel, dict]:
    """Foundation + freshly seeded head with the freezing applied; the head weights report for the results."""
    foundation = build_foundation(spec, img_size)
    head_input = "pooled" if spec.head == "linear" else "tokens"
    drop = spec.drop_after
    model = FineTuneModel(foundation, nn.Identity(), head_input, parse_freeze(spec.freeze), drop)
    with torch.no_grad():
        probe = model.features(torch.zeros(1, 3, img_size, img_size))
    lora = _inject_lora(spec, model, seed) if spec.method == "lora" else None
    torch.manual_seed(seed)
    info: dict = {"kind": spec.head}
    if spec.head == "linear":
        head: nn.Module = nn.Linear(probe.shape[-1], num_classes)
    else:
        from fmcache.frozen.heads import build_head, load_deit_weights  # deferred: timm

        head = build_head("deit", probe.shape[-1], num_classes, depth=spec.head_depth)
        if spec.head_random_init:
            info["weights"] = "random"
        else:
            info["weights"] = load_deit_weights(head, spec.head_weights or "imagenet")
    final = FineTuneModel(foundation, head, head_input, model.freeze, model.drop_after, model.stages, spec.method)
    final.lora = lora
    return final, info


def _inject_lora(spec: FinetuneSpec, model: FineTuneModel, seed: int) -> dict:
    """peft adapters in the blocks that train (K+1..I), seeded by the run's seed; what the result reports."""
    f = model.foundation
    targets = resolve_targets(model.stages, f.name, f.layer_unit, spec.lora_targets)
    blocks = range(model.first_trainable_block, model.used_blocks)
    modules = inject(model.stages, blocks, targets, spec.lora_rank, spec.lora_alpha, spec.lora_dropout, seed)
    params = sum(p.numel() for n, p in f.root.named_parameters() if is_lora_parameter(n))
    return {
        "rank": spec.lora_rank,
        "alpha": spec.lora_alpha,
        "dropout": spec.lora_dropout,
        "targets": list(targets),
        "blocks": [blocks.start + 1, blocks.stop],
        "modules": len(modules),
        "adapter_parameters": params,
    }


# full fine-tuning's result folders keep the names they had before --method existed: its fields enter the keys only
# for --method lora (with the targets resolved on the model, so the default and the same list named share a folder)
METHOD_FIELDS = ("method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def method_doc(spec: FinetuneSpec, lora: dict | None) -> dict:
    if spec.method == "full" or lora is None:
        return {}
    return {
        "method": spec.method,
        "lora_rank": spec.lora_rank,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "lora_targets": list(lora["targets"]),
    }
