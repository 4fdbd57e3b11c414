"""Exact FLOP and shape counts of foundations and token heads, for the grid's cost; nothing needs data or weights.

A model's forward FLOPs per image are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the **meta
device** (no memory, no compute; open_clip and SEEM's FocalNet copy tensors while they build, so those are built on
the CPU with random weights and then moved to meta), together with the shapes the cache stores (layers, widths, token
counts, the paper's pooled feature and tokens). The DeiT and attentive heads are counted the same way. Counts are kept
in ``flops.json`` beside the calibration (per model, input size, architecture overrides and fmcache version), so a
repeated dry run is fast.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fmcache.cost.rates import calibration_path, fmcache_version, read_json, write_json


def counts_path() -> Path:
    """``$FMCACHE_FLOPS_CACHE``, else ``flops.json`` beside the calibration."""
    env = os.environ.get("FMCACHE_FLOPS_CACHE")
    return Path(env) if env else calibration_path().with_name("flops.json")


# -- exact counts: models and heads ------------------------------------------------------------------------------------

CONV_ARCHS = ("resnet", "convnext", "efficientnet", "regnet", "mobilenet", "densenet", "vgg")


@dataclass(frozen=True)
class ModelShape:
    """What one foundation at one input size costs per image and stores per image."""

    flops: float  # one image's forward
    layers: int  # cached layers (blocks or stages)
    dims: tuple[int, ...]  # width per layer
    tokens: tuple[int, ...]  # tokens per layer, prefix tokens included
    prefix: int
    pooled_dim: int  # the paper's pooled feature
    head_tokens: tuple[int, int]  # (T, D) of what the paper's DeiT head reads (``--tokens paper``)
    params: int
    tensors: int  # parameter tensors (a per-tensor optimizer costs per tensor)
    conv: bool  # a convolutional network (its own achieved rate)


COUNTS_SCHEMA = 2  # what a counted entry holds; a change recounts


def _model_key(name: str, img_size: int | None, overrides: dict | None) -> str:
    return json.dumps([name, img_size, overrides or {}, fmcache_version(), COUNTS_SCHEMA], sort_keys=True)


def _meta_foundation(name: str, img_size: int | None, overrides: dict | None):
    """The foundation ``name`` built with random weights on the meta device (no memory), and its input size."""
    import logging

    import torch

    from fmcache.models import create_foundation  # deferred: torch
    from fmcache.models.registry import get_spec  # deferred: torch

    size = int(img_size or get_spec(name).default_img_size)
    kwargs = {"random_init": True, "img_size": size, "arch_overrides": dict(overrides or {})}
    logging.disable(logging.WARNING)  # open_clip warns that a random build has no pretrained weights
    try:
        try:
            with torch.device("meta"):
                return create_foundation(name, **kwargs), size
        except Exception:  # open_clip and SEEM's FocalNet copy tensors while building: build on the CPU, then meta
            return create_foundation(name, **kwargs).to("meta"), size
    finally:
        logging.disable(logging.NOTSET)


def _count_foundation(name: str, img_size: int | None, overrides: dict | None) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fmcache.models.registry import get_spec  # deferred: torch

    spec = get_spec(name)
    model, size = _meta_foundation(name, img_size, overrides)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(torch.zeros(1, 3, size, size, device="meta"))
    head = out.head_tokens
    arch = f"{spec.family} {spec.arch}".lower()
    return {
        "flops": float(counter.get_total_flops()),
        "layers": len(out.tokens),
        "dims": [int(t.shape[-1]) for t in out.tokens],
        "tokens": [int(t.shape[1]) for t in out.tokens],
        "prefix": int(out.num_prefix_tokens),
        "pooled_dim": int(out.pooled.shape[-1]),
        "head_tokens": [int(head.shape[1]), int(head.shape[2])] if head is not None else [0, 0],
        "params": int(sum(p.numel() for p in model.parameters())),
        "tensors": len(list(model.parameters())),
        "conv": any(a in arch for a in CONV_ARCHS),
    }


def _count_head(kind: str, tokens: int, dim: int, classes: int, depth: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fmcache.frozen.heads import build_head  # deferred: timm, torch

    side = math.isqrt(tokens)
    grid = (side, side) if side * side == tokens else (1, tokens)
    with torch.device("meta"):
        head = build_head(kind, dim, classes, depth, grid)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head(torch.zeros(1, tokens, dim, device="meta"))
    return {"flops": float(counter.get_total_flops()), "params": int(sum(p.numel() for p in head.parameters()))}


def _count_lora(name: str, img_size: int | None, overrides: dict | None, targets: list[str] | None) -> dict:
    """What LoRA adapts in each block of ``name``: the targets (the family's default when None) and, per block,
    the sum of d_in + d_out over the adapted linears (a rank-r adapter of a linear holds r · (d_in + d_out))."""
    from fmcache.finetune.lora import resolve_targets  # deferred: torch

    model, _size = _meta_foundation(name, img_size, overrides)
    stages = model.block_layout()
    chosen = resolve_targets(stages, name, model.layer_unit, targets)
    per_block = []
    for block in stages.blocks:  # resolve_targets refused a model without blocks
        linears = dict(block.named_modules())
        per_block.append(sum(linears[t].in_features + linears[t].out_features for t in chosen))
    return {"targets": list(chosen), "per_block": per_block}


# what a kept count must hold, checked when read: a damaged flops.json entry is counted again, never trusted
COUNT = "count"  # a whole number >= 0
NUMBER = "number"  # a finite number >= 0
MODEL_FIELDS = {"flops": NUMBER, "layers": COUNT, "dims": [COUNT], "tokens": [COUNT], "prefix": COUNT}
MODEL_FIELDS |= {"pooled_dim": COUNT, "head_tokens": [COUNT], "params": COUNT, "tensors": COUNT, "conv": bool}
HEAD_FIELDS = {"flops": NUMBER, "params": COUNT}
LORA_FIELDS = {"targets": [str], "per_block": [COUNT]}


def _fits(kind, value) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(_fits(kind[0], v) for v in value)
    if kind is bool or kind is str:
        return isinstance(value, kind)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return False
    return kind == NUMBER or float(value).is_integer()


def damage(entry: object, schema: dict) -> str | None:
    """Why a kept count is unusable (not an object, a missing key, a value of the wrong kind), or None."""
    if not isinstance(entry, dict):
        return f"{type(entry).__name__}, not an object"
    for key, kind in schema.items():
        if key not in entry:
            return f"no '{key}'"
        if not _fits(kind, entry[key]):
            return f"'{key}' is {entry[key]!r:.30}"
    if schema is MODEL_FIELDS and not len(entry["dims"]) == len(entry["tokens"]) == entry["layers"] > 0:
        return "its per-layer lists do not match its layers"
    return None


class Counts:
    """Counted FLOPs and shapes, read from and written back to ``flops.json``; a count that failed (a model that
    cannot be built) fails again at once, without being rebuilt for every job. A kept entry that is damaged (a key
    missing, a count that is text or negative) is dropped and counted again, with a note through ``log``; the file
    is rewritten (atomically) with the new count."""

    def __init__(self, path: Path | None = None, log: Callable[[str], None] | None = None):
        self.path = path or counts_path()
        self.log = log or (lambda _m: None)
        self.doc = read_json(self.path)
        self.dirty = False
        self.failed: dict[str, Exception] = {}
        if not self.doc and self.path.is_file() and self.path.read_text().strip() not in ("", "{}"):
            self.log(f"note: {self.path} does not hold counts (damaged); counting again and rewriting it")
            self.dirty = True

    def _get(self, key: str, count: Callable[[], dict], schema: dict, what: str) -> dict:
        if key in self.failed:  # its traceback reset, so one failure raised for many jobs does not grow it
            raise self.failed[key].with_traceback(None)
        why = damage(self.doc[key], schema) if key in self.doc else None
        if why is not None:
            self.log(f"note: {self.path}: the kept count of {what} is damaged ({why}); counting it again")
            del self.doc[key]
            self.dirty = True
        if key not in self.doc:
            try:
                self.doc[key] = count()
            except Exception as exc:
                self.failed[key] = exc
                raise
            self.dirty = True
        return self.doc[key]

    def model(self, entry: dict) -> ModelShape:
        name, size, overrides = entry["name"], entry.get("img_size"), entry.get("arch_overrides")
        key = _model_key(name, size, overrides)
        doc = self._get(key, lambda: _count_foundation(name, size, overrides), MODEL_FIELDS, name)
        return ModelShape(
            flops=doc["flops"],
            layers=doc["layers"],
            dims=tuple(doc["dims"]),
            tokens=tuple(doc["tokens"]),
            prefix=doc["prefix"],
            pooled_dim=doc["pooled_dim"],
            head_tokens=tuple(doc["head_tokens"]),
            params=doc["params"],
            tensors=doc["tensors"],
            conv=doc["conv"],
        )

    def head(self, kind: str, tokens: int, dim: int, classes: int, depth: int) -> tuple[float, int]:
        """(forward FLOPs per sample, parameters) of a token head."""
        key = json.dumps(["head", kind, tokens, dim, classes, depth if kind == "deit" else 0, fmcache_version()])
        doc = self._get(key, lambda: _count_head(kind, tokens, dim, classes, depth), HEAD_FIELDS, f"the {kind} head")
        return doc["flops"], doc["params"]

    def lora(self, entry: dict, targets: list[str] | None) -> tuple[list[str], list[int]]:
        """(the adapted names, per block the d_in + d_out summed over them) of LoRA on the foundation ``entry``."""
        name, size, overrides = entry["name"], entry.get("img_size"), entry.get("arch_overrides")
        key = json.dumps(["lora", name, size, overrides or {}, targets, fmcache_version()], sort_keys=True)
        doc = self._get(key, lambda: _count_lora(name, size, overrides, targets), LORA_FIELDS, f"LoRA on {name}")
        return doc["targets"], doc["per_block"]

    def save(self) -> None:
        if self.dirty:
            write_json(self.path, self.doc)
            self.dirty = False
