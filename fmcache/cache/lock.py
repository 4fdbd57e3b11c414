"""A single-writer lock per cache directory, with stale-lock detection."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
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
        # threads of one process share a pid; the token tells this lock object's file from any other's
        self.token = uuid.uuid4().hex

    def acquire(self) -> CacheLock:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "token": self.token,
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            except FileNotFoundError:  # the folder was removed under us (a failed run cleaning up its own folder)
                raise FmcacheError(f"cache folder {self.path.parent} disappeared; rerun the command") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            self.held = True
            return self
        raise FmcacheError(f"could not take the lock {self.path}; remove it if no extraction is running")

    def _read(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _handle_existing(self) -> None:
        held = self._read(self.path)
        if not held and self.path.exists():
            # the holder may be between creating the file and writing its record: give it a moment
            time.sleep(0.05)
            held = self._read(self.path)
        pid, host = int(held.get("pid", -1)), held.get("host", "?")
        if held and host == socket.gethostname() and not _pid_alive(pid):
            self._break_stale(held)
            return
        raise FmcacheError(
            f"cache {self.path.parent} is being written by pid {pid} on {host} since {held.get('started', '?')}; "
            f"wait for it to finish, or delete {self.path} if that process is gone"
        )

    def _break_stale(self, stale: dict) -> None:
        """Remove a dead process's lock without ever removing a live one.

        Two runs may find the same stale lock. Unlinking by name could delete the lock the other one has just
        created, so the file is first renamed to a private name (atomic: only one run gets it), and put back
        if it turns out not to be the stale record that was read.
        """
        private = self.path.with_name(f"{LOCK_NAME}.breaking-{self.token}")
        try:
            os.rename(self.path, private)
        except FileNotFoundError:
            return  # another run broke it first; retry the exclusive create
        if self._read(private) == stale:
            private.unlink(missing_ok=True)
            self.stale_message = (
                f"removed a stale lock from dead pid {stale.get('pid')} (started {stale.get('started', '?')})"
            )
            return
        try:
            os.link(private, self.path)  # a live lock: restore it (link never overwrites a newer one)
        except FileExistsError:
            pass
        finally:
            private.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file only if it is still this object's: a refused writer must not free another's lock."""
        if self.held:
            if self._read(self.path).get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
