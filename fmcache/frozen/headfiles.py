"""The heads a frozen result selected, saved beside it (``heads.safetensors``) so ``fmcache transfer`` can apply them.

The file is plain safetensors (any safetensors reader opens it). Tensor names are ``<layer>.<part>``: ``layer12`` (or
``paper``) then ``seed<S>.<parameter>`` for each seed's head (``seed0.weight``, ``seed3.blocks.0.attn.qkv.weight``)
and ``mean``/``std`` for the linear probe's z-score statistics. The header's ``__metadata__`` repeats what
``result.json``'s ``heads.apply`` record says (every value JSON text), so the file also stands on its own.

It is written tensor by tensor (:func:`write_heads`): a grid of full DeiT-B heads is gigabytes, and streaming each
tensor from the per-head best-state file it was kept in (:func:`save_state`) holds one tensor in RAM at a time.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors import safe_open

from fmcache.cache.reader import CacheReader
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_with, disk_error
from fmcache.headgrid import ProbeResult
from fmcache.results import heads_record

FORMAT = "fmcache-heads-1"
BANK, LINEAR, TOKEN = "bank", "linear", "token"  # heads.apply.kind: a k-NN bank, linear heads, token heads
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its name, dtype and shape up front (the header comes first), and how to get it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()


def tensor_entry(name: str, tensor: torch.Tensor) -> Entry:
    """An entry for a tensor held in memory (the linear heads, the z-score statistics)."""
    held = tensor.detach().cpu().contiguous()
    return Entry(name, held.dtype, tuple(held.shape), lambda: held)


def state_entries(prefix: str, path: Path) -> list[Entry]:
    """Entries for every tensor of a state file written by :func:`save_state`, read lazily one at a time."""
    entries = []
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            part = handle.get_slice(key)
            dtype = _TORCH_DTYPES[part.get_dtype()]
            entries.append(Entry(f"{prefix}{key}", dtype, tuple(part.get_shape()), _lazy(path, key)))
    return entries


def _lazy(path: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)

    return load


def write_heads(path: Path, entries: Iterable[Entry], metadata: Mapping[str, object]) -> tuple[int, str]:
    """Write ``entries`` as one safetensors file atomically, streaming; returns (bytes, sha256 hex).

    The layout is the safetensors format itself: an 8-byte little-endian header length, the JSON header (each
    tensor's dtype, shape and byte range, then ``__metadata__``), padded with spaces to 8 bytes, then the data.
    """
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": {k: json.dumps(v) for k, v in metadata.items()}}
    offset = 0
    for entry in entries:
        if entry.dtype not in _DTYPES:
            raise FmcacheError(f"cannot save head tensor {entry.name} of dtype {entry.dtype}")
        header[entry.name] = {
            "dtype": _DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()

    def write(handle: BinaryIO) -> None:
        for chunk in (struct.pack("<Q", len(text)), text):
            handle.write(chunk)
            digest.update(chunk)
        for entry in entries:
            tensor = entry.load().detach().cpu().contiguous()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise FmcacheError(f"head tensor {entry.name} changed while it was saved; rerun the evaluation")
            data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            handle.write(data)
            digest.update(data)

    try:
        atomic_write_with(path, write)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    return 8 + len(text) + offset, digest.hexdigest()


def read_metadata(path: Path) -> dict[str, object]:
    """The ``__metadata__`` a heads file carries, decoded from JSON text."""
    with safe_open(str(path), framework="pt") as handle:
        return {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}


def load_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with ``prefix``, keyed by the rest of its name (one head's state dict)."""
    with safe_open(str(path), framework="pt") as handle:
        return {key[len(prefix) :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}  # noqa: SIM118


def save_state(path: Path, state: Mapping[str, torch.Tensor], epoch: int) -> None:
    """One head's state at a best epoch (a token head's, on improvement), written atomically and fsynced, so it is on
    disk before the checkpoint that relies on it; ``epoch`` is 0-based and kept in the file's metadata."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    write_heads(path, [tensor_entry(k, v) for k, v in state.items()], {"epoch": int(epoch)})


def saved_epoch(path: Path) -> int:
    """The 0-based epoch a :func:`save_state` file holds."""
    return int(read_metadata(path)["epoch"])


def layer_tag(layer: int | str) -> str:
    """``layer04`` for a block, ``paper`` for the paper's tokens: names of per-layer outputs and tensors."""
    return f"layer{layer:02d}" if isinstance(layer, int) else str(layer)


def layer_prefix(layer: int | str, seed: int | None = None) -> str:
    """``layer12.seed0.`` (a seed's head) or ``layer12.`` (the layer's shared tensors)."""
    return f"{layer_tag(layer)}." if seed is None else f"{layer_tag(layer)}.seed{int(seed)}."


def save_heads(path: Path, entries: list[Entry], reader: CacheReader, what: str, apply: Mapping) -> dict:
    """Write a result's heads file and return its ``heads`` record (:func:`fmcache.results.heads_record`); the file's
    metadata names the cache it was trained on, its classes and what ``apply`` says."""
    identity = {
        "format": FORMAT,
        "dataset": reader.dataset,
        "model": reader.model,
        "cache_key": reader.key,
        "classes": reader.class_names,
        "multilabel": reader.multilabel,
    }
    nbytes, sha256 = write_heads(path, entries, {**identity, **apply})
    return heads_record(nbytes, sha256, what, apply)


class LinearHeads:
    """The linear probe's heads, gathered layer by layer as the grid trains: each seed's head at the best LR and its
    own best val epoch, and the z-score statistics when ``--standardize`` scaled the features."""

    def __init__(self, seeds: list[int], pools: list[str], standardize: bool):
        self.seeds, self.pools, self.standardize = list(seeds), list(pools), bool(standardize)
        self.entries: list[Entry] = []
        self.best_lr: dict[int, float] = {}
        self.best_epochs: dict[int, list[int]] = {}

    def add(self, layer: int, result: ProbeResult, mean: np.ndarray | None, std: np.ndarray | None) -> None:
        heads = result.heads or {}
        if "weight" not in heads:
            raise FmcacheError("the linear grid kept no heads to save; this is a bug, please report it")
        for j, seed in enumerate(self.seeds):
            prefix = layer_prefix(layer, seed)
            self.entries += [
                tensor_entry(f"{prefix}weight", heads["weight"][j]),
                tensor_entry(f"{prefix}bias", heads["bias"][j]),
            ]
        if mean is not None and std is not None:  # float64, exactly what standardize() divided by
            self.entries += [
                tensor_entry(f"{layer_prefix(layer)}mean", torch.from_numpy(np.asarray(mean))),
                tensor_entry(f"{layer_prefix(layer)}std", torch.from_numpy(np.asarray(std))),
            ]
        self.best_lr[layer] = float(result.best_lr)
        self.best_epochs[layer] = list(result.per_lr[result.best_lr]["best_epochs"])

    def write(self, path: Path, reader: CacheReader) -> dict:
        layers = list(self.best_lr)
        what = (
            f"linear heads of layer {', '.join(map(str, layers))}: each of the {len(self.seeds)} seeds at the best LR, "
            "at its best val epoch (weight (C, D), bias (C,), float32)"
            + (", and the train split's z-score mean and std (float64)" if self.standardize else "")
        )
        apply = {
            "kind": LINEAR,
            "layers": layers,
            "pool": self.pools,
            "seeds": self.seeds,
            "best_lr": self.best_lr,
            "best_epochs": self.best_epochs,
            "standardize": self.standardize,
        }
        return save_heads(path, self.entries, reader, what, apply)
