"""Executors of the grid's jobs: ``local`` one after another or ``--jobs N`` subprocesses, (Slurm: :mod:`fmcache.grid.slurm`).

Each skips the jobs already done (:func:`fmcache.grid.run.is_done`) and never starts a job whose dependency
failed or could not start; one job's failure does not stop the independent ones. A job that another grid runs now
(its lock, :mod:`fmcache.grid.lock`) is reported and skipped, or waited for with ``--wait``; never run twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fmcache.errors import FmcacheError
from fmcache.grid.config import Log
from fmcache.grid.jobs import Job
from fmcache.grid.lock import JobBusy, JobLock
from fmcache.grid.outcome import Outcome, busy, ready
from fmcache.grid.run import EXIT_BUSY, EXIT_DONE_ELSEWHERE, is_done, job_doc, run_and_record
from fmcache.grid.slurm_cli import job_exception, read_text


def run_local(jobs: list[Job], log: Log, wait: bool = False) -> Outcome:
    outcome = Outcome()
    for job in jobs:
        why = ready(job, outcome)
        if why:
            outcome.blocked[job.id] = why
            log(f"{job.id}: {why}")
            continue
        if is_done(job):
            outcome.skipped.append(job.id)
            continue
        log(f"[{len(outcome.ran) + len(outcome.skipped) + len(outcome.failed) + 1}/{len(jobs)}] {job.id}")
        start = time.perf_counter()
        try:
            folder = run_and_record(job, log=lambda _m: None, wait=wait, note=lambda m: log(f"  {m}"))
        except JobBusy as exc:
            outcome.elsewhere[job.id] = busy(exc.holder)
            log(f"  skipped: {outcome.elsewhere[job.id]}; pass --wait to wait for it")
            continue
        except Exception as exc:  # one job's failure (bad input or a bug) must not stop the independent ones
            outcome.failed[job.id] = str(exc) if isinstance(exc, FmcacheError) else f"{type(exc).__name__}: {exc}"
            log(f"  failed: {outcome.failed[job.id]}")
            continue
        if folder is None:
            outcome.skipped.append(job.id)
            continue
        outcome.ran.append(job.id)
        log(f"  done in {time.perf_counter() - start:.1f} s")
    return outcome


def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA: jobs run on CPU
        return []


def _log_error(log_file: Path, returncode: int) -> str:
    """A subprocess job's error in one line: the exception it died of (or its own ``error:`` line), and its log."""
    text = read_text(log_file)
    errors = [line[len("error: ") :] for line in text.splitlines() if line.startswith("error: ")]
    what = job_exception(text) or (errors[-1] if errors else None)
    if what is None:
        tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
        what = f"exit {returncode}: {tail[0]}"
    return f"{what} (log: {log_file})"


def run_parallel(jobs: list[Job], n: int, logs: Path, log: Log, wait: bool = False) -> Outcome:
    """Up to ``n`` jobs at once as subprocesses; each gets one GPU of this machine (round robin over free ones)."""
    outcome = Outcome()
    gpus = _gpu_ids()
    free_gpus = list(gpus)
    pending = list(jobs)
    running: dict[str, tuple[Job, subprocess.Popen, str | None, Path, object]] = {}
    finished: set[str] = set()
    waiting: set[str] = set()
    ids = {j.id for j in jobs}
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        for job in list(pending):
            if len(running) >= n:
                break
            why = ready(job, outcome)
            if why:
                outcome.blocked[job.id] = why
                log(f"{job.id}: {why}")
                pending.remove(job)
                continue
            if any(d not in finished for d in job.deps if d in ids):
                continue
            holder = JobLock(job).holder()
            if holder is not None:  # another grid runs it: skip it, or leave it pending until that ends (--wait)
                if not wait:
                    outcome.elsewhere[job.id] = busy(holder)
                    log(f"skipped {job.id}: {outcome.elsewhere[job.id]}; pass --wait to wait for it")
                    pending.remove(job)
                elif job.id not in waiting:
                    waiting.add(job.id)
                    log(f"waiting for {job.id}: {busy(holder)}")
                continue
            pending.remove(job)
            if is_done(job):
                outcome.skipped.append(job.id)
                finished.add(job.id)
                if job.id in waiting:
                    log(f"done {job.id} by another grid meanwhile")
                continue
            env = dict(os.environ)
            gpu = free_gpus.pop(0) if free_gpus else None
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            spec, log_file = logs / f"{_log_name(job)}.json", logs / f"{_log_name(job)}.log"
            spec.write_text(json.dumps(job_doc(job), default=str))
            handle = open(log_file, "w")  # noqa: SIM115  (closed when the job ends)
            proc = subprocess.Popen(
                [sys.executable, "-m", "fmcache.grid.main", str(spec)], env=env, stdout=handle, stderr=subprocess.STDOUT
            )
            running[job.id] = (job, proc, gpu, log_file, handle)
            log(f"started {job.id}" + (f" on GPU {gpu}" if gpu is not None else ""))
        for job_id, (job, proc, gpu, log_file, handle) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()  # type: ignore[attr-defined]
            del running[job_id]
            if gpu is not None:
                free_gpus.append(gpu)
            if proc.returncode == EXIT_BUSY:  # another grid took the lock between our look and the child's
                if wait:
                    pending.insert(0, job)
                    continue
                outcome.elsewhere[job_id] = "running in another grid (see its log: " + str(log_file) + ")"
                log(f"skipped {job_id}: {outcome.elsewhere[job_id]}")
                continue
            if proc.returncode in (0, EXIT_DONE_ELSEWHERE):
                finished.add(job_id)
                (outcome.ran if proc.returncode == 0 else outcome.skipped).append(job_id)
                log(f"done {job_id}" + (" by another grid meanwhile" if proc.returncode else ""))
            else:
                outcome.failed[job_id] = _log_error(log_file, proc.returncode)
                log(f"failed {job_id}: {outcome.failed[job_id]}")
        time.sleep(0.2)
    return outcome


def _log_name(job: Job) -> str:
    return job.id.replace("/", "__").replace(":", "_").replace("#", "-")
