"""The grid on a real Slurm cluster: submit every job at once through submitit, then watch them with Slurm's own
commands until each one has settled.

- **Submission.** One ``sbatch`` per job, in dependency order, each reader with ``afterok`` on the extract it reads
  and ``--kill-on-invalid-dep=yes`` (so Slurm cancels it when that extract fails, even on clusters without
  ``DependencyParameters=kill_invalid_depend``). A refused ``sbatch`` (no GPU gres, unknown partition, ...) ends the
  grid with one line: sbatch's own message, the flag that fixes it, and the jobs of this run it cancelled.
- **Watching.** States come from ``squeue``/``sacct`` (:mod:`fmcache.grid.slurm_cli`), never from submitit's
  ``job.result()``, which waits forever for a job cancelled on a cluster without accounting. A job is done when
  Slurm says COMPLETED *and* its work is there (:func:`fmcache.grid.run.is_done`); one cancelled while finishing
  counts as done only when its result is complete. A failed job is reported with the exception it died of (from its
  stderr log) and the log's path; the jobs that depended on a failed or cancelled one as "not started: <it> failed"
  (and are cancelled if Slurm still holds them). Every job ends in Slurm (its time limit, ``--time``), so the wait
  is bounded; a job Slurm can never start (its reason says so) is cancelled and reported.
- **Other grids.** Each submitted job is noted in ``<results>/.grid/<job hash>.slurm``; another grid on the same
  results folder skips it ("running in another grid (... Slurm job N)"), or with ``--wait`` watches that Slurm job
  instead of submitting its own. Where two submissions overlap anyway, the job lock the job's process takes on the
  node (:mod:`fmcache.grid.lock`) makes the second wait and then find the work done.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_json, ensure_writable_dir
from fmcache.grid.config import GridOptions, Log
from fmcache.grid.jobs import Job
from fmcache.grid.lock import LEDGER, JobLock
from fmcache.grid.outcome import Outcome, busy, ready
from fmcache.grid.run import is_done, job_doc, submitted_job
from fmcache.grid.slurm_cli import (
    NEVER_STARTS,
    SlurmState,
    cancel,
    cluster_has_gpus,
    job_exception,
    last_words,
    read_text,
    rejection_fix,
    sacct_states,
    sbatch_message,
    squeue_states,
)

# how long Slurm may say COMPLETED before the job's result shows on this host (a network filesystem's caches)
RESULT_GRACE_S = 30.0
# how long squeue may fail to answer before the grid stops waiting (the jobs go on; a rerun collects them)
SQUEUE_SILENCE_S = 300.0
MAX_POLL_S = 30.0


@dataclass
class Tracked:
    job: Job
    slurm_id: str
    stdout: Path
    stderr: Path
    adopted: bool = False  # submitted by another grid; this one only watches it
    running_logged: bool = False
    completed_at: float | None = None
    unknown_polls: int = 0

    @property
    def started(self) -> bool:
        return self.stdout.exists()  # Slurm creates the job's output file when its script starts


def _marker(job: Job) -> Path:
    return Path(job.results) / LEDGER / f"{job.digest()[:24]}.slurm"


def _write_marker(job: Job, tracked: Tracked) -> None:
    atomic_write_json(
        _marker(job),
        {
            "job": job.id,
            "slurm_job_id": tracked.slurm_id,
            "stdout": str(tracked.stdout),
            "stderr": str(tracked.stderr),
            "grid_pid": os.getpid(),
            "grid_host": socket.gethostname(),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


def _other_submission(job: Job) -> tuple[dict, SlurmState] | None:
    """Another grid's Slurm job for this job that is still queued or running, with its state."""
    try:
        marker = json.loads(_marker(job).read_text())
    except (OSError, ValueError):
        return None
    slurm_id = str(marker.get("slurm_job_id", ""))
    state = (squeue_states([slurm_id]) or {}).get(slurm_id) if slurm_id else None
    return (marker, state) if state is not None and state.active else None


def _gpus(options: GridOptions, log: Log) -> int:
    if options.gpus_per_job is not None:
        return options.gpus_per_job
    has = cluster_has_gpus()
    if has is False:
        log("this cluster has no GPUs (sinfo -o %G lists no gpu gres): jobs ask for none (--gpus-per-job 0)")
        return 0
    return 1


def _rejected(job: Job, exc: Exception, options: GridOptions, gpus: int, tracked: dict[str, Tracked]) -> FmcacheError:
    """sbatch refused ``job``: cancel what this run submitted, and say what sbatch said and which flag fixes it."""
    said = sbatch_message(str(exc))
    message = f"sbatch refused {job.id}: {said}; {rejection_fix(said, gpus, options.slurm_partition)}"
    ours = [t for t in tracked.values() if not t.adopted]
    if ours:
        names = ", ".join(f"{t.job.id} (Slurm job {t.slurm_id})" for t in ours)
        if cancel([t.slurm_id for t in ours]):
            message += f"; cancelled the {len(ours)} job(s) this run had submitted: {names}"
        else:
            ids = " ".join(t.slurm_id for t in ours)
            message += f"; could not cancel the {len(ours)} job(s) this run had submitted ({names}): scancel {ids}"
        for t in ours:
            _marker(t.job).unlink(missing_ok=True)
    return FmcacheError(message)


def _submit_one(
    job: Job, executor, options: GridOptions, gpus: int | None, tracked: dict[str, Tracked], outcome: Outcome, log: Log
) -> int | None:
    """Settle ``job`` before submitting (dependency failed, done, left to another grid) or submit it; returns the GPU
    count, asked of the cluster at the first submission."""
    from submitit.core.utils import FailedJobError

    why = ready(job, outcome)
    if why:
        outcome.blocked[job.id] = why
        log(f"{job.id}: {why}")
        return gpus
    if is_done(job):
        outcome.skipped.append(job.id)
        return gpus
    other = _other_submission(job)
    holder = JobLock(job).holder() if other is None else None
    if other is not None or holder is not None:
        if other is not None:
            marker, state = other
            where = (
                f"running in another grid (pid {marker.get('grid_pid', '?')}, host "
                f"{marker.get('grid_host', '?')}, Slurm job {marker['slurm_job_id']} {state.state.lower()})"
            )
        else:
            where = busy(holder or {})
        if not options.wait:
            outcome.elsewhere[job.id] = where
            log(f"skipped {job.id}: {where}; pass --wait to wait for it")
            return gpus
        if other is not None:  # watch the other grid's Slurm job rather than queue a second one
            marker = other[0]
            tracked[job.id] = Tracked(
                job,
                str(marker["slurm_job_id"]),
                Path(marker.get("stdout", "")),
                Path(marker.get("stderr", "")),
                adopted=True,
            )
            log(f"waiting for {job.id}: {where}")
            return gpus
        # a grid without Slurm runs it: this job's process waits on the node for that run's lock
    if gpus is None:
        gpus = _gpus(options, log)
        executor.update_parameters(gpus_per_node=gpus)
    deps = [tracked[d].slurm_id for d in job.deps if d in tracked]
    extra: dict = dict(options.slurm_options)
    if deps:
        extra.update({"dependency": "afterok:" + ":".join(deps), "kill-on-invalid-dep": "yes"})
    executor.update_parameters(name=job.id, slurm_additional_parameters=extra)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr too; our line says it
            handle = executor.submit(submitted_job, job_doc(job))
    except FailedJobError as exc:
        raise _rejected(job, exc, options, gpus or 0, tracked) from None
    t = Tracked(job, str(handle.job_id), Path(handle.paths.stdout), Path(handle.paths.stderr))
    tracked[job.id] = t
    _write_marker(job, t)
    log(f"submitted {job.id} as Slurm job {t.slurm_id}")
    return gpus


def import_submitit():
    # submitit is optional (fmcache[slurm]) and only this executor needs it
    try:
        import submitit
    except ImportError:
        raise FmcacheError("--executor slurm needs submitit: pip install submitit (or fmcache[slurm])") from None
    return submitit


def run_slurm(jobs: list[Job], options: GridOptions, logs: Path, log: Log) -> Outcome:
    """Submit every job at once with ``afterok`` dependencies, then watch them until each has settled."""
    if shutil.which("sbatch") is None:
        raise FmcacheError("--executor slurm: sbatch not found; run the grid on a Slurm login node")
    submitit = import_submitit()
    outcome = Outcome()
    gpus: int | None = None  # asked of the cluster only when there is something to submit
    executor = submitit.AutoExecutor(folder=logs / "%j", cluster="slurm")
    params: dict = {"timeout_min": options.time_min, "tasks_per_node": 1, "nodes": 1}
    for key, value in (
        ("slurm_partition", options.slurm_partition),
        ("slurm_account", options.slurm_account),
        ("slurm_qos", options.slurm_qos),
    ):
        if value:
            params[key] = value
    executor.update_parameters(**params)
    for folder in {Path(j.results) / LEDGER for j in jobs}:  # the notes of submitted jobs go there
        ensure_writable_dir(folder)
    tracked: dict[str, Tracked] = {}
    try:
        for job in jobs:  # in dependency order: a job's dependencies are submitted (or settled) before it
            gpus = _submit_one(job, executor, options, gpus, tracked, outcome, log)
        _Watch(tracked, outcome, options, log).run()
    except KeyboardInterrupt:
        left = [t for t in tracked.values() if not outcome.settled(t.job.id) and not t.adopted]
        if left:
            log(
                f"interrupted: {len(left)} job(s) of this run go on in Slurm without this grid; stop them with: "
                f"scancel {' '.join(t.slurm_id for t in left)}; a rerun of the same command collects what they finish"
            )
        raise
    return outcome


class _Watch:
    """Poll Slurm until every tracked job has settled: ran, skipped, failed (cancelled included) or not started."""

    def __init__(self, tracked: dict[str, Tracked], outcome: Outcome, options: GridOptions, log: Log):
        self.tracked, self.outcome, self.options, self.log = tracked, outcome, options, log
        self.accounting_note = False
        self.squeue_silent_since: float | None = None

    def run(self) -> None:
        interval, last_change = self.options.poll_s, time.monotonic()
        while True:
            open_ = [t for t in self.tracked.values() if not self.outcome.settled(t.job.id)]
            if not open_:
                return
            states = self._states(open_)
            if states is None:  # squeue did not answer: wait, but not forever
                if time.monotonic() - (self.squeue_silent_since or time.monotonic()) > SQUEUE_SILENCE_S:
                    self._give_up(open_)
                    return
                self.squeue_silent_since = self.squeue_silent_since or time.monotonic()
            else:
                self.squeue_silent_since = None
                changed = False
                for t in open_:  # dependency order: a failed extract settles before its readers
                    changed |= self._step(t, states.get(t.slurm_id, SlurmState("UNKNOWN")))
                    if not t.adopted and self.outcome.settled(t.job.id):
                        _marker(t.job).unlink(missing_ok=True)  # no other grid need look at this Slurm job again
                # quick while things move, then slower: a tenth of the time since the last change, up to 30 s
                last_change = time.monotonic() if changed else last_change
                interval = min(MAX_POLL_S, self.options.poll_s + 0.1 * (time.monotonic() - last_change))
            if any(not self.outcome.settled(t.job.id) for t in open_):
                time.sleep(interval)

    def _states(self, open_: list[Tracked]) -> dict[str, SlurmState] | None:
        states = squeue_states([t.slurm_id for t in open_])
        if states is None:
            return None
        missing = [t.slurm_id for t in open_ if t.slurm_id not in states]
        if missing:  # ended more than MinJobAge ago (or never known): only accounting still knows them
            accounted, why = sacct_states(missing)
            if accounted is None and not self.accounting_note:
                self.log(
                    f"Slurm accounting is off here ({why}); jobs that squeue no longer lists are judged by "
                    "their results and logs"
                )
                self.accounting_note = True
            states.update(accounted or {})
        return states

    def _give_up(self, open_: list[Tracked]) -> None:
        ids = " ".join(t.slurm_id for t in open_ if not t.adopted)
        for t in open_:
            self.outcome.failed[t.job.id] = (
                f"state unknown: squeue did not answer for {SQUEUE_SILENCE_S:.0f} s; the job may still run in Slurm "
                f"(scancel {t.slurm_id} stops it); rerun the same command to collect it"
            )
        self.log(f"squeue does not answer; stopped waiting for {len(open_)} job(s): {ids}")

    def _done(self, t: Tracked, note: str = "") -> bool:
        # the job's process says when another grid had done it meanwhile (fmcache.grid.run.run_and_record)
        out = read_text(t.stdout)
        by_other = t.adopted or "done by another grid meanwhile" in out or "already done; nothing to do" in out
        (self.outcome.skipped if by_other else self.outcome.ran).append(t.job.id)
        self.log(f"done {t.job.id}" + (" by another grid" if by_other else "") + note + f" (log: {t.stdout})")
        return True

    def _step(self, t: Tracked, st: SlurmState) -> bool:
        """Settle ``t`` if its state says enough; True when something changed."""
        jid, outcome = t.job.id, self.outcome
        why = ready(t.job, outcome)
        if why and not t.started:  # a dependency failed or was cancelled: it never runs; Slurm may still hold it
            if st.active and not t.adopted:
                cancel([t.slurm_id])
            outcome.blocked[jid] = why
            self.log(f"{jid}: {why}")
            return True
        if st.active:
            if st.state == "PENDING" and st.reason in NEVER_STARTS:
                if not t.adopted:
                    cancel([t.slurm_id])
                if st.reason == "DependencyNeverSatisfied":  # its dependencies succeeded in our eyes, not Slurm's
                    outcome.blocked[jid] = (
                        "not started: Slurm will not start it, as a dependency ended without "
                        "success (cancelled while finishing?); rerun the same command to run it"
                    )
                else:
                    outcome.failed[jid] = (
                        f"Slurm would never start it (pending, reason {st.reason}): it asks for "
                        "more than the partition allows; fix --gpus-per-job, --time or "
                        "--slurm-option"
                    )
                self.log(f"{jid}: {outcome.blocked.get(jid) or outcome.failed[jid]}")
                return True
            if st.state == "RUNNING" and not t.running_logged:
                t.running_logged = True
                self.log(f"started {jid} (Slurm job {t.slurm_id})")
                return True
            return False
        if st.state == "UNKNOWN":
            # neither squeue nor sacct knows it: judge by its result and logs, after a second look
            t.unknown_polls += 1
            if t.unknown_polls < 3:
                return False
        if is_done(t.job):
            # COMPLETED, or cancelled/failed after its result was complete: the work is there
            return self._done(
                t, "" if st.state in ("COMPLETED", "UNKNOWN") else f" (Slurm: {st.state}, result complete)"
            )
        if st.state == "COMPLETED":
            t.completed_at = t.completed_at or time.monotonic()
            if time.monotonic() - t.completed_at < RESULT_GRACE_S:
                return False
            outcome.failed[jid] = f"Slurm says COMPLETED but its result is not complete (stderr: {t.stderr})"
        elif st.state == "CANCELLED" and not t.started:
            outcome.failed[jid] = "cancelled before it started, by scancel or by Slurm"
            outcome.cancelled.add(jid)
        elif st.state == "CANCELLED":
            outcome.failed[jid] = f"cancelled while it ran, by scancel or by Slurm (stderr: {t.stderr})"
            outcome.cancelled.add(jid)
        else:
            outcome.failed[jid] = f"{self._failure(t, st)} (stderr: {t.stderr})"
        self.log(f"failed {jid}: {outcome.failed[jid]}")
        return True

    def _failure(self, t: Tracked, st: SlurmState) -> str:
        if st.state == "TIMEOUT":
            return f"hit its time limit (--time {self.options.time_min} min); pass a larger --time"
        if st.state == "OUT_OF_MEMORY":
            return "ran out of memory; pass --slurm-option mem=SIZE"
        error = job_exception(read_text(t.stderr))
        if error:
            return error
        if st.state in ("NODE_FAIL", "BOOT_FAIL"):
            return f"its node failed (Slurm: {st.state}); rerun the same command"
        if st.state == "UNKNOWN":
            return "Slurm no longer knows the job and it left no result" + ("" if t.started else " (it never started)")
        words = last_words(t.stderr)
        return f"Slurm: {st.state}" + (f"; last words: {words}" if words else "")
