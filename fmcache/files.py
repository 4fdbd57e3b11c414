"""Atomic file writes and clear disk errors, shared by the cache and the results writers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fmcache.errors import FmcacheError


def _writer_id() -> str:
    # process and thread: two writers in one process (threads) must not share a temporary name either; the host,
    # so a rerun can tell its own dead writers' leftovers from a live writer's on another node of a shared filesystem
    return f"{os.getpid()}-{threading.get_ident()}@{socket.gethostname()}"


# what _writer_id() puts after ".tmp-": pid, thread and host
_TMP_WRITER = re.compile(r"\.tmp-(\d+)-\d+@(.+)$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie (a killed child not yet reaped is dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the signal check is all there is
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries of ``path`` that :func:`atomic_write_with` left behind in writers that died.

    Only files whose writer was on this host and whose pid no longer runs: a live writer (another thread or process
    writing the same file now) or a writer on another host of a shared filesystem keeps its file. Names without a
    host (written before 0.3) are left alone, as their writer cannot be told apart from a live one.
    """
    path = Path(path)
    host, removed = socket.gethostname(), []
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp-")]
    except OSError:
        return removed
    for tmp in candidates:
        match = _TMP_WRITER.search(tmp.name)
        if match and match.group(2) == host and not pid_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Stream into a temporary name in the same folder with ``write(fh)``, fsync, then rename over ``path``.

    A crash leaves at most a hidden temporary file, never a partial file under the real name; the next write of the
    same file removes it (:func:`remove_stale_temporaries`), which matters for checkpoints of many GB. Streaming lets
    large payloads (a grid of DeiT-B heads' checkpoint) go to disk without a second copy in RAM.
    """
    path = Path(path)
    remove_stale_temporaries(path)
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
