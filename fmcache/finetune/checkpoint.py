"""The per-epoch ``last`` checkpoint: atomic, complete enough that a killed run resumes to the same numbers.

Written here because the shared helper planned for ``fmcache/training.py`` (issue 11) had not landed when the
fine-tuning loop needed it; the format is private to fine-tuning. It holds the trainable tensors, optimizer,
scheduler step, GradScaler, epoch, best score, every RNG state and the sampler position, plus a hash of the settings
so that a rerun with other settings is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes

LAST = "last.pt"


def rng_state() -> dict:
    """Every RNG the loop draws from (torch CPU and CUDA, numpy, python), as tensors and plain types."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": list(random.getstate()[1]),
        "python_version": int(random.getstate()[0]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, state: dict) -> Path:
    """Write ``last.pt`` atomically (temporary file, fsync, rename): a kill leaves the previous epoch's file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(folder) / LAST
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(folder: Path, settings_hash: str, settings: dict | None = None) -> dict | None:
    """The ``last`` checkpoint of this run, or None; one made with other settings is refused."""
    path = Path(folder) / LAST
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and how to start over
        raise FmcacheError(
            f"cannot read checkpoint {path} ({type(exc).__name__}); delete it or pass --no-resume"
        ) from exc
    if state.get("settings_hash") != settings_hash:
        before = state.get("settings") or {}
        differ = sorted(k for k in set(before) | set(settings or {}) if before.get(k) != (settings or {}).get(k))
        named = f" ({', '.join(differ)} differ)" if differ else ""
        raise FmcacheError(
            f"checkpoint {path} was made with other settings than this run{named}; pass --no-resume to start "
            "over, or another --out"
        )
    return state
