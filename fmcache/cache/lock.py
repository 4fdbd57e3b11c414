"""Lock files that hold pid, host and start time, with stale-lock recovery: the cache's single-writer lock, and the
base the grid's per-job lock extends (:mod:`fmcache.grid.lock`)."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from fmcache.errors import FmcacheError
from fmcache.files import pid_alive

LOCK_NAME = "writer.lock"
# a lock file still without a record after this long was left by a holder killed while it created it
UNREADABLE_STALE_S = 60.0


class LockHeld(FmcacheError):
    """Another live process holds the lock; ``holder`` is its record (pid, host, started, and what the lock adds)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class PidLock:
    """A lock file taken with an exclusive create, holding pid, host, start time and ``extra`` fields.

    A second taker is refused with :class:`LockHeld`; a lock whose holder is gone (:meth:`is_stale`: by default a
    dead pid on this host) is taken over, and :attr:`stale_message` says so. Subclasses name what the lock protects
    (:meth:`held_message`) and may know more ways a holder can be gone.
    """

    def __init__(self, path: Path, extra: dict | None = None):
        self.path = Path(path)
        self.extra = dict(extra or {})
        self.stale_message: str | None = None
        self.held = False
        # threads of one process share a pid; the token tells this lock object's file from any other's
        self.token = uuid.uuid4().hex

    # -- what subclasses adapt ---------------------------------------------------------------------------------

    def held_message(self, holder: dict) -> str:
        return (
            f"{self.path} is held by pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
            f"{holder.get('started', '?')}; wait for it, or delete {self.path} if that process is gone"
        )

    def missing_folder_message(self) -> str:
        return f"folder {self.path.parent} disappeared; rerun the command"

    def is_stale(self, holder: dict) -> bool:
        """Whether the holder is certainly gone: only a dead pid on this host can be told from here."""
        return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1)))

    # -- taking and releasing ------------------------------------------------------------------------------------

    def acquire(self) -> PidLock:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **self.extra,
            "token": self.token,
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            except FileNotFoundError:  # the folder was removed under us (a failed run cleaning up its own folder)
                raise FmcacheError(self.missing_folder_message()) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            self.held = True
            return self
        raise FmcacheError(f"could not take the lock {self.path}; remove it if nothing holds it")

    def holder(self) -> dict | None:
        """The record of the live process holding the lock, or None when the lock is free or its holder is gone."""
        held = self._read_settled()
        if not held:
            return None
        return None if self.is_stale(held) else held

    def _read(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _read_settled(self) -> dict:
        held = self._read(self.path)
        if not held and self.path.exists():
            # the holder may be between creating the file and writing its record: give it a moment
            time.sleep(0.05)
            held = self._read(self.path)
        return held

    def _handle_existing(self) -> None:
        held = self._read_settled()
        if held and self.is_stale(held):
            self._break_stale(held)
            return
        if not held and self._age() > UNREADABLE_STALE_S:
            # a holder killed between creating the file and writing its record: nobody could ever free it
            self._break_stale(held)
            return
        if not held and not self.path.exists():
            return  # released meanwhile: retry the exclusive create
        raise LockHeld(self.held_message(held), held)

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _break_stale(self, stale: dict) -> None:
        """Remove a dead process's lock without ever removing a live one.

        Two runs may find the same stale lock. Unlinking by name could delete the lock the other one has just
        created, so the file is first renamed to a private name (atomic: only one run gets it), and put back
        if it turns out not to be the stale record that was read.
        """
        private = self.path.with_name(f"{self.path.name}.breaking-{self.token}")
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
        """Remove the lock file only if it is still this object's: a refused taker must not free another's lock."""
        if self.held:
            if self._read(self.path).get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class CacheLock(PidLock):
    """Held by the one process that writes a cache directory (rank 0 under torchrun).

    The lock file holds pid, host and start time. A second writer is refused; a lock whose process is dead on
    this host is reported and taken over.
    """

    def __init__(self, folder: Path):
        super().__init__(Path(folder) / LOCK_NAME)

    def held_message(self, holder: dict) -> str:
        return (
            f"cache {self.path.parent} is being written by pid {holder.get('pid', -1)} on {holder.get('host', '?')} "
            f"since {holder.get('started', '?')}; wait for it to finish, or delete {self.path} if that process is gone"
        )

    def missing_folder_message(self) -> str:
        return f"cache folder {self.path.parent} disappeared; rerun the command"

    def acquire(self) -> CacheLock:
        super().acquire()
        return self

    def __enter__(self) -> CacheLock:
        return self.acquire()
