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


def _count_foundation(name: str, img_size: int | None, overrides: dict | None) -> dict:
    import logging

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fmcache.models import create_foundation  # deferred: torch
    from fmcache.models.registry import get_spec  # deferred: torch

    spec = get_spec(name)
    size = int(img_size or spec.default_img_size)
    kwargs = {"random_init": True, "img_size": size, "arch_overrides": dict(overrides or {})}
    logging.disable(logging.WARNING)  # open_clip warns that a random build has no pretrained weights
    try:
        try:
            with torch.device("meta"):
                model = create_foundation(name, **kwargs)
        except Exception:  # open_clip and SEEM's FocalNet copy tensors while building: build on the CPU, then meta
            model = create_foundation(name, **kwargs).to("meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = model(torch.zeros(1, 3, size, size, device="meta"))
    finally:
        logging.disable(logging.NOTSET)
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


class Counts:
    """Counted FLOPs and shapes, read from and written back to ``flops.json``; a count that failed (a model that
    cannot be built) fails again at once, without being rebuilt for every job."""

    def __init__(self, path: Path | None = None):
        self.path = path or counts_path()
        self.doc = read_json(self.path)
        self.dirty = False
        self.failed: dict[str, Exception] = {}

    def _get(self, key: str, count: Callable[[], dict]) -> dict:
        if key in self.failed:  # its traceback reset, so one failure raised for many jobs does not grow it
            raise self.failed[key].with_traceback(None)
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
        doc = self._get(_model_key(name, size, overrides), lambda: _count_foundation(name, size, overrides))
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
        doc = self._get(key, lambda: _count_head(kind, tokens, dim, classes, depth))
        return doc["flops"], doc["params"]

    def save(self) -> None:
        if self.dirty:
            write_json(self.path, self.doc)
            self.dirty = False
