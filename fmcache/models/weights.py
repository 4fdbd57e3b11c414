"""Loading a local weights file into a built model: safe formats only, prefix remapping, loud reports.

A file either matches the model (every parameter found, shapes equal) or it is refused. Unexpected keys are
reported, never silently dropped, so a user sees when a checkpoint carries more than the backbone.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmcache.errors import FmcacheError
from fmcache.files import sha256_file

# Wrappers that training code puts around a backbone's keys; stripped when the stripped keys match better.
PREFIXES = ("module.", "backbone.", "visual_encoder.", "encoder.", "model.", "visual.", "vision_model.")
# Containers that checkpoints nest the state dict under.
NESTED_KEYS = ("state_dict", "model", "module", "teacher", "model_state", "weights")


@dataclass(frozen=True)
class LoadReport:
    """What loading a file did, recorded in the cache manifest."""

    path: str
    sha256: str
    loaded: int
    unexpected: tuple[str, ...]
    stripped_prefixes: tuple[str, ...]

    def summary(self) -> str:
        extra = f", {len(self.unexpected)} unexpected keys ignored" if self.unexpected else ""
        strip = f", stripped {'+'.join(self.stripped_prefixes)}" if self.stripped_prefixes else ""
        return f"loaded {self.loaded} tensors from {self.path}{strip}{extra}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors, or a torch file with ``weights_only=True`` (a pickle with embedded code is refused)."""
    if not path.is_file():
        raise FmcacheError(f"weights file {path} does not exist; check the --weights path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise FmcacheError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise FmcacheError(
            f"refused to load {path}: it is not a plain tensor file ({first}); fmcache only loads safetensors or "
            "torch files readable with weights_only=True; re-save it with torch.save(model.state_dict(), ...)"
        ) from exc
    return _unnest(obj, path)


def _unnest(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                if tensors:
                    return tensors
                break
            obj = inner
    raise FmcacheError(f"{path} holds no state dict of tensors; save model.state_dict() instead")


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes while doing so increases the number of keys the model expects."""
    stripped: list[str] = []
    while True:
        best, best_hits = None, sum(k in expected for k in state)
        for prefix in PREFIXES:
            keys = [k for k in state if k.startswith(prefix)]
            if not keys:
                continue
            candidate = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            hits = sum(k in expected for k in candidate)
            if hits > best_hits:
                best, best_hits = (prefix, candidate), hits
        if best is None:
            return state, stripped
        stripped.append(best[0])
        state = best[1]


def load_weights_file(
    model: nn.Module,
    path: Path,
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
    ignore_missing: Callable[[str], bool] = lambda key: False,
) -> LoadReport:
    """Load ``path`` into ``model``; refuse on missing parameters or shape mismatches.

    ``convert`` maps an original-format checkpoint to the model's key names (e.g. timm's checkpoint filters, which
    also resample position embeddings to the model's image size).
    """
    path = Path(path)
    raw = read_state_dict(path)
    expected = model.state_dict()
    state, stripped = _strip_prefixes(raw, set(expected))
    if convert is not None:
        try:
            state = convert(state, model)
        except Exception as exc:
            raise FmcacheError(f"cannot convert {path} to this model's layout: {exc}") from exc
        state, more = _strip_prefixes(state, set(expected))
        stripped += more
    missing = [k for k in expected if k not in state and not ignore_missing(k)]
    if missing:
        raise FmcacheError(
            f"refused {path}: {len(missing)} of {len(expected)} model tensors are missing from it "
            f"(e.g. {', '.join(missing[:4])}); is it a checkpoint of this model?"
        )
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise FmcacheError(
            f"refused {path}: {len(bad)} tensors have the wrong shape (e.g. {k}: file {tuple(state[k].shape)} vs "
            f"model {tuple(expected[k].shape)}); check the model name and --img-size"
        )
    unexpected = tuple(sorted(k for k in state if k not in expected))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    loaded = sum(k in state for k in expected)
    return LoadReport(str(path), sha256_file(path), loaded, unexpected, tuple(stripped))
