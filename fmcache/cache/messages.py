"""One-line messages for damaged caches, and foreign error text made fit for them."""

from __future__ import annotations

import re
from pathlib import Path

from fmcache.errors import FmcacheError

# CSI sequences (colours, cursor moves) and the two-byte escapes; torch and h5py messages may carry both
_ANSI = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def one_line(exc: BaseException | str, limit: int = 160) -> str:
    """A foreign error message as one short line without terminal escape codes."""
    text = " ".join(strip_ansi(str(exc)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def repair_hint(folder: Path) -> str:
    return f"run `fmcache verify --repair {folder}`, then rerun the same `fmcache extract` command"


def damaged_shard(path: Path, problem: BaseException | str) -> FmcacheError:
    """The error for a shard that cannot be read: names the file, what is wrong and the two-step fix."""
    path = Path(path)
    return FmcacheError(f"cache shard {path} is damaged ({one_line(problem)}); {repair_hint(path.parent)}")
