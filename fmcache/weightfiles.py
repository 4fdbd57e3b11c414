"""Loading a local weights file into a built module: safe formats only, prefix remapping, loud reports.

This lives outside ``fmcache.models`` so stage two (``fmcache.frozen``, which never imports model backends) loads
its heads' weight files with the same strict checks as the foundations.

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
    total: int = 0
    file_tensors: int = 0  # every tensor in the file, including other parts of a release (decoders, text towers)

    def summary(self) -> str:
        extra = f", {len(self.unexpected)} unexpected keys ignored" if self.unexpected else ""
        strip = f", stripped {'+'.join(self.stripped_prefixes)}" if self.stripped_prefixes else ""
        unused = self.file_tensors - self.loaded
        rest = (
            f"; {unused} of the file's {self.file_tensors} tensors are not this model's and were not used"
            if unused > 0
            else ""
        )
        return f"loaded {self.loaded}/{self.total} model tensors from {self.path}{strip}{extra}{rest}"


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


def _candidates(state: dict[str, torch.Tensor], levels: int = 2) -> list[tuple[tuple[str, ...], dict]]:
    """The state dict as it is and with up to ``levels`` wrapper prefixes stripped (``module.backbone.`` …)."""
    found: list[tuple[tuple[str, ...], dict]] = [((), state)]
    frontier = found[:]
    for _ in range(levels):
        deeper = []
        for stripped, current in frontier:
            for prefix in PREFIXES:
                inner = {k[len(prefix) :]: v for k, v in current.items() if k.startswith(prefix)}
                if inner:
                    deeper.append(((*stripped, prefix), inner))
        found += deeper
        frontier = deeper
    return found


Convert = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


def match_layout(
    state: dict[str, torch.Tensor], model: nn.Module, convert: Convert | None = None
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The reading of ``state`` that fills the most of ``model``'s tensors: with or without wrapper prefixes, each
    passed through ``convert`` (an original-layout → model-layout mapping) before it is scored.

    Scoring after the conversion matters: an original layout (LAVIS BLIP's ``visual_encoder.blocks.…``) matches
    nothing until it is both unwrapped and renamed, so stripping only when raw names match would never fire.
    """
    expected = model.state_dict()
    best: tuple[int, int, tuple[str, ...], dict] | None = None
    first_error: Exception | None = None
    for stripped, candidate in _candidates(state):
        if convert is not None:
            try:
                candidate = convert(dict(candidate), model)
            except Exception as exc:  # a reading the converter does not understand scores nothing
                first_error = first_error or exc
                continue
        hits = sum(k in candidate and tuple(candidate[k].shape) == tuple(v.shape) for k, v in expected.items())
        named = sum(k in candidate for k in expected)
        score = (hits, named)
        if best is None or score > best[:2]:
            best = (hits, named, stripped, candidate)
    if best is None:
        raise FmcacheError(f"cannot convert it to this model's layout: {first_error}")
    return best[3], best[2]


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_weights_file(
    model: nn.Module,
    path: Path,
    convert: Convert | None = None,
    ignore_missing: Callable[[str], bool] = lambda key: False,
) -> LoadReport:
    """Load ``path`` into ``model``; refuse on missing parameters or shape mismatches.

    ``convert`` maps an original-format checkpoint to the model's key names (e.g. timm's checkpoint filters, which
    also resample position embeddings to the model's image size).
    """
    path = Path(path)
    raw = read_state_dict(path)
    expected = model.state_dict()
    try:
        state, stripped = match_layout(raw, model, convert)
    except FmcacheError as exc:
        raise FmcacheError(f"{path}: {exc}") from exc
    # BatchNorm's step counter is bookkeeping, not a weight, and releases older than it (torchvision's ResNet
    # files) lack it; it never changes an eval forward.
    missing = [k for k in expected if k not in state and not ignore_missing(k) and not _is_counter(k)]
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
    loaded = sum(k in state for k in expected if not _is_counter(k))
    total = sum(not _is_counter(k) for k in expected)
    return LoadReport(str(path), sha256_file(path), loaded, unexpected, tuple(stripped), total, len(raw))
