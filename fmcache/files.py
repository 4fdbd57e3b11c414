"""Atomic file writes and clear disk errors, shared by the cache and the results writers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fmcache.errors import FmcacheError


def _writer_id() -> str:
    # process and thread: two writers in one process (threads) must not share a temporary name either
    return f"{os.getpid()}-{threading.get_ident()}"


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Stream into a temporary name in the same folder with ``write(fh)``, fsync, then rename over ``path``.

    A crash leaves at most a hidden temporary file, never a partial file under the real name. Streaming lets large
    payloads (a grid of DeiT-B heads' checkpoint) go to disk without a second copy in RAM.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{_writer_id()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(exc, path) from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` atomically (see :func:`atomic_write_with`)."""
    atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def disk_error(exc: OSError, path: Path) -> FmcacheError:
    """Turn an OSError while writing into one actionable line."""
    if exc.errno == errno.ENOSPC:
        return FmcacheError(f"no space left on device while writing {path}; free space or pass another --cache-root")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FmcacheError(f"cannot write {path}: permission denied; pass a writable --cache-root / --out")
    return FmcacheError(f"cannot write {path}: {exc.strerror or exc}; choose a writable folder (--cache-root / --out)")


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and prove it is writable, or raise a clear error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{_writer_id()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise disk_error(exc, path) from exc
    return path
