"""The per-job lock: two grids on one results folder never run a job at the same time.

The process that runs a job takes ``<results>/.grid/<job hash>.lock`` (the cache's lock file: pid, host, start time,
plus the job and, on Slurm, the Slurm job id): the grid itself for ``--jobs 1``, the subprocess for ``--jobs N``, the
job's process on the node under Slurm, so overlapping submissions are safe too. A grid that finds a job's lock held
reports it "running in another grid (pid …, host …)" and skips it, or with ``--wait`` waits for it and then skips it
when the other grid finished it. A lock is stale when its holder is gone: a dead pid on this host (as the cache's), or
a Slurm job that no longer runs (so a node that died or a job killed at its time limit does not leave a lock that
nobody can break).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from fmcache.cache.lock import LockHeld, PidLock
from fmcache.grid.config import Log
from fmcache.grid.jobs import Job
from fmcache.grid.slurm_cli import job_state

LEDGER = ".grid"


def describe_holder(holder: dict) -> str:
    """ "pid 123, host vm" (and the Slurm job when the holder is one): how the messages name another grid's run."""
    text = f"pid {holder.get('pid', '?')}, host {holder.get('host', '?')}"
    if holder.get("slurm_job_id"):
        text += f", Slurm job {holder['slurm_job_id']}"
    return text


class JobBusy(LockHeld):
    """The job runs in another grid now; ``--wait`` waits for it instead."""


class JobLock(PidLock):
    def __init__(self, job: Job):
        super().__init__(
            Path(job.results) / LEDGER / f"{job.digest()[:24]}.lock",
            {"job": job.id, "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
        )
        self.job_id = job.id

    def held_message(self, holder: dict) -> str:
        return f"{self.job_id}: running in another grid ({describe_holder(holder)}); pass --wait to wait for it"

    def is_stale(self, holder: dict) -> bool:
        if super().is_stale(holder):
            return True
        slurm_id = holder.get("slurm_job_id")
        if not slurm_id or holder.get("host") == socket.gethostname():
            return False  # a live pid here, or a process elsewhere that only its own host can judge

        state = job_state(str(slurm_id))
        return state is not None and not state.active  # None: Slurm cannot be asked from here, so assume alive

    def acquire(self) -> JobLock:
        try:
            super().acquire()
        except JobBusy:
            raise
        except LockHeld as exc:
            raise JobBusy(str(exc), exc.holder) from None
        return self

    def acquire_or_wait(self, wait: bool, note: Log, poll_s: float = 1.0) -> bool:
        """Take the lock; with ``wait`` wait for the other grid first (True when it did). Raises :class:`JobBusy`
        without ``wait``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        waited = False
        while True:
            try:
                self.acquire()
            except JobBusy as exc:
                if not wait:
                    raise
                if not waited:
                    note(f"waiting for {self.job_id}: running in another grid ({describe_holder(exc.holder)})")
                    waited = True
                time.sleep(poll_s)
                poll_s = min(poll_s * 1.5, 5.0)
                continue
            if self.stale_message:
                note(f"{self.job_id}: {self.stale_message}")
            return waited
