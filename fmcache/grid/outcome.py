"""What a grid run did with each job, shared by every executor (local, ``--jobs N``, Slurm)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fmcache.grid.jobs import Job
from fmcache.grid.lock import describe_holder


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # done before, or finished by another grid meanwhile
    failed: dict[str, str] = field(default_factory=dict)  # job → its error in one line (and where its log is)
    blocked: dict[str, str] = field(default_factory=dict)  # job → why it did not start ("not started: X failed")
    elsewhere: dict[str, str] = field(default_factory=dict)  # job → "running in another grid (pid …, host …)"
    cancelled: set[str] = field(default_factory=set)  # the failed jobs that were cancelled (scancel, Slurm)

    def settled(self, job_id: str) -> bool:
        return any(job_id in group for group in (self.ran, self.skipped, self.failed, self.blocked, self.elsewhere))


def ready(job: Job, outcome: Outcome) -> str | None:
    """None when no dependency failed, was cancelled, or is left to another grid; else why the job cannot start."""
    for dep in job.deps:
        if dep in outcome.cancelled:
            return f"not started: {dep} was cancelled"
        if dep in outcome.failed:
            return f"not started: {dep} failed"
        if dep in outcome.blocked:
            return f"not started: {dep} did not start"
        if dep in outcome.elsewhere:
            return f"not started: {dep} is {outcome.elsewhere[dep]}; rerun when it ends, or pass --wait"
    return None


def busy(holder: dict) -> str:
    return f"running in another grid ({describe_holder(holder)})"
