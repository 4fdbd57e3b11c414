"""What a token head reads of a cache: which token layers (``--layer``), whose norm (``--token-norm``), and the
prefix-free, normalised (B, T, D) batches (:class:`TokenNorm`) that :mod:`fmcache.frozen.tokens` trains on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmcache.cache.reader import CacheReader
from fmcache.choices import PAPER_TOKENS
from fmcache.errors import FmcacheError
from fmcache.frozen.heads import token_grid
from fmcache.frozen.specs import TOKEN_NORMS

# The seed's choice for the token layers of caches written before the manifest recorded the model's head_tokens rule
# (PROTOCOLS.md, "The stacked DeiT head"): BLIP's after its final norm; the rest pre-norm.
SEED_TOKEN_NORM = {"blip_base": "final"}


def token_norm_for(reader: CacheReader, choice: str) -> str:
    """``none`` or ``final``: ``seed`` resolves to what the seeds feed the DeiT head for the cache's model, as the
    registry's ``head_tokens`` rule recorded in the manifest says (``final``: BLIP in the WACV seed, MAE and AIMv2 in
    the follow-up; ``prenorm``: the rest; CoCa's pooler and SAM2's neck are ``--layer paper`` tokens, not a layer's)."""
    if choice not in TOKEN_NORMS:
        raise FmcacheError(f"unknown --token-norm '{choice}'; use {', '.join(TOKEN_NORMS)}")
    if choice != "seed":
        return choice
    rule = reader.manifest["model"].get("head_tokens")
    if rule is None:
        return SEED_TOKEN_NORM.get(reader.model, "none")
    return "final" if rule == "final" else "none"


def paper_tokens_note(reader: CacheReader, layers: list) -> str | None:
    """A note when the seed feeds this model's DeiT head something other than a layer's tokens (CoCa, SAM2)."""
    rule = reader.manifest["model"].get("head_tokens")
    if rule in ("pooler", "neck") and PAPER_TOKENS not in layers:
        what = "its attention pooler's outputs" if rule == "pooler" else "its FPN neck's features (stride 16)"
        return (
            f"note: the follow-up feeds {reader.model}'s DeiT head {what}, not a layer's tokens; extract with "
            "--tokens paper and probe --layer paper for the paper's cell"
        )
    return None


def check_token_layers(reader: CacheReader, layer: str) -> list[int | str]:
    """Token layers from ``12``, ``last``, ``all`` (every cached token layer), ``paper`` (what the paper's DeiT head
    reads, ``extract --tokens paper``) or lists such as ``4,8,12``, all of them cached."""
    cached = reader.token_layers
    parts = [part.strip() for part in str(layer).split(",") if part.strip()]
    if parts == ["paper"] or (PAPER_TOKENS in parts and not cached):
        reader.tokens("val", PAPER_TOKENS)  # the check: one line naming the fix when they were not cached
        if parts != ["paper"]:
            raise FmcacheError(f"cache {reader.path.name} holds no token layers besides paper; use --layer paper")
        return [PAPER_TOKENS]
    if not cached:
        raise FmcacheError(
            f"cache {reader.path} holds no token layers; extract again with --tokens last (or --tokens all / 4,8,12 "
            "/ paper) to train token heads"
        )
    if parts == ["all"]:
        return list(cached)
    try:
        layers: list[int | str] = [
            PAPER_TOKENS if part == PAPER_TOKENS else reader.resolve_layer(part) for part in parts
        ]
    except FmcacheError as exc:
        raise FmcacheError(f"{exc}; cached token layers: {', '.join(map(str, cached))}") from None
    if not layers:
        raise FmcacheError(f"bad --layer '{layer}'; use all, last, paper or layer numbers such as 4,8,12")
    missing = [n for n in layers if n != PAPER_TOKENS and n not in cached]
    if missing:
        raise FmcacheError(
            f"cache {reader.path.name} has no tokens of layer {missing[0]}; cached token layers: "
            f"{', '.join(map(str, cached))}; extract again with --tokens including {missing[0]} (e.g. --tokens all)"
        )
    if PAPER_TOKENS in layers:
        reader.tokens("val", PAPER_TOKENS)
    if len(set(layers)) != len(layers):
        raise FmcacheError(f"--layer '{layer}' repeats a layer")
    return layers


@dataclass(frozen=True)
class LayerSpec:
    """What a head sees of one cached token layer: patch tokens (prefix dropped) of width ``dim`` on ``grid``."""

    layer: int | str  # a block number, or "paper"
    prefix: int
    num_tokens: int  # patch tokens
    dim: int
    grid: tuple[int, int] | None
    norm: dict | None  # the final norm's parameters when --token-norm final


def layer_spec(reader: CacheReader, layer: int | str, norm: str, head: str) -> LayerSpec:
    model = reader.manifest["model"]
    if layer == PAPER_TOKENS:  # stored as the seed feeds them: no prefix, the seed's norm already applied
        total, dim = model["paper_token_shape"]
        return LayerSpec(layer, 0, total, dim, token_grid(total) if head == "deit" else None, None)
    total, dim = model["token_shapes"][str(layer)]
    prefix = max(0, int(model.get("num_prefix_tokens", 0)))
    patches = total - prefix
    grid = token_grid(patches) if head == "deit" else None
    params = None
    if norm == "final":
        params = model.get("final_norm")
        if params is None:
            hint = (
                "it predates that record: remove the cache folder and run the same extract again"
                if "final_norm" not in model
                else "the model has none"
            )
            raise FmcacheError(f"cache {reader.path.name} records no final norm ({hint}); or use --token-norm none")
        if params["dim"] != dim:
            raise FmcacheError(
                f"the final norm of {reader.model} normalises width {params['dim']}, but layer {layer} has width "
                f"{dim}; use --token-norm none for this layer"
            )
    return LayerSpec(layer, prefix, patches, dim, grid, params)


class TokenNorm:
    """Drops prefix tokens and applies the stored final norm (if any) to (B, T, D) float32 batches."""

    def __init__(self, spec: LayerSpec, device: torch.device):
        self.prefix, self.kind, self.eps = spec.prefix, None, 0.0
        self.weight = self.bias = None
        if spec.norm is not None:
            p = spec.norm
            self.kind, self.eps = p["kind"], float(p["eps"])
            self.weight = None if p["weight"] is None else torch.tensor(p["weight"], device=device)
            self.bias = None if p["bias"] is None else torch.tensor(p["bias"], device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, self.prefix :].float()
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return x
