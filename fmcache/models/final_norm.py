"""The foundation's final norm as plain numbers, stored in the cache so stage two can apply it to cached tokens.

Token layers are cached raw (pre-norm). The seed feeds BLIP's tokens after its final norm, so ``fmcache probe
--token-norm final`` needs that norm without importing the model (``fmcache.frozen`` never imports
``fmcache.models``): ``extract`` records its kind, eps, weight and bias in ``manifest.json`` → ``model.final_norm``.
"""

from __future__ import annotations

from torch import nn


def final_norm_params(adapter: nn.Module) -> dict | None:
    """``{"kind": "layernorm"|"rmsnorm", "dim", "eps", "weight", "bias"}`` (lists of floats, bias None when absent)
    of the norm the adapter applies for its pooled features, or None when the model has none (CNNs, SEEM)."""
    norm = getattr(adapter, "final_norm", None)  # every adapter names the norm its pooled features use
    shape = getattr(norm, "normalized_shape", None)
    if norm is None or isinstance(norm, nn.Identity) or shape is None or len(tuple(shape)) != 1:
        return None
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    eps = getattr(norm, "eps", None)
    return {
        "kind": "rmsnorm" if "rms" in type(norm).__name__.lower() else "layernorm",
        "dim": int(next(iter(shape))),
        "eps": float(eps) if eps is not None else 1e-5,
        "weight": None if weight is None else weight.detach().float().cpu().tolist(),
        "bias": None if bias is None else bias.detach().float().cpu().tolist(),
    }
