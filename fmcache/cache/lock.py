"""A single-writer lock per cache directory, with stale-lock detection."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from fmcache.errors import FmcacheError

LOCK_NAME = "writer.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheLock:
    """Held by the one process that writes a cache directory (rank 0 under torchrun).

    The lock file holds pid, host and start time. A second writer is refused; a lock whose process is dead on
    this host is reported and taken over.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.stale_message: str | None = None
        self.held = False

    def acquire(self) -> CacheLock:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            self.held = True
            return self
        raise FmcacheError(f"could not take the lock {self.path}; remove it if no extraction is running")

    def _handle_existing(self) -> None:
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            held = {}
        pid, host = int(held.get("pid", -1)), held.get("host", "?")
        if host == socket.gethostname() and not _pid_alive(pid):
            self.stale_message = f"removed a stale lock from dead pid {pid} (started {held.get('started', '?')})"
            self.path.unlink(missing_ok=True)
            return
        raise FmcacheError(
            f"cache {self.path.parent} is being written by pid {pid} on {host} since {held.get('started', '?')}; "
            f"wait for it to finish, or delete {self.path} if that process is gone"
        )

    def release(self) -> None:
        """Remove the lock file, only if this object took it: a refused writer must not free another's lock."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
