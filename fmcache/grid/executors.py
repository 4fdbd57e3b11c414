"""Executors of the grid's jobs: ``local`` one after another or ``--jobs N`` subprocesses, and ``slurm`` (submitit).

Each skips the jobs already done (:func:`fmcache.grid.run.is_done`) and never starts a job whose dependency
failed or could not start; one job's failure does not stop the independent ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fmcache.errors import FmcacheError
from fmcache.grid.config import GridOptions, Log
from fmcache.grid.jobs import Job
from fmcache.grid.run import _job_doc, is_done, run_and_record, submitted_job


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)


def _ready(job: Job, outcome: Outcome) -> str | None:
    """None when every dependency is available, else why the job cannot run."""
    bad = [d for d in job.deps if d in outcome.failed or d in outcome.blocked]
    return f"needs {', '.join(bad)}" if bad else None


def run_local(jobs: list[Job], log: Log) -> Outcome:
    outcome = Outcome()
    for job in jobs:
        if _ready(job, outcome):
            outcome.blocked.append(job.id)
            continue
        if is_done(job):
            outcome.skipped.append(job.id)
            continue
        log(f"[{len(outcome.ran) + len(outcome.skipped) + len(outcome.failed) + 1}/{len(jobs)}] {job.id}")
        start = time.perf_counter()
        try:
            run_and_record(job, log=lambda _m: None)
        except Exception as exc:  # one job's failure (bad input or a bug) must not stop the independent ones
            outcome.failed[job.id] = str(exc) if isinstance(exc, FmcacheError) else f"{type(exc).__name__}: {exc}"
            log(f"  failed: {outcome.failed[job.id]}")
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


def run_parallel(jobs: list[Job], n: int, logs: Path, log: Log) -> Outcome:
    """Up to ``n`` jobs at once as subprocesses; each gets one GPU of this machine (round robin over free ones)."""
    outcome = Outcome()
    gpus = _gpu_ids()
    free_gpus = list(gpus)
    pending = list(jobs)
    running: dict[str, tuple[subprocess.Popen, str | None, Path, object]] = {}
    finished: set[str] = set()
    ids = {j.id for j in jobs}
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        for job in list(pending):
            if len(running) >= n:
                break
            if _ready(job, outcome):
                outcome.blocked.append(job.id)
                pending.remove(job)
                continue
            if any(d not in finished for d in job.deps if d in ids):
                continue
            pending.remove(job)
            if is_done(job):
                outcome.skipped.append(job.id)
                finished.add(job.id)
                continue
            env = dict(os.environ)
            gpu = free_gpus.pop(0) if free_gpus else None
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            spec, log_file = logs / f"{_log_name(job)}.json", logs / f"{_log_name(job)}.log"
            spec.write_text(json.dumps(_job_doc(job), default=str))
            handle = open(log_file, "w")  # noqa: SIM115  (closed when the job ends)
            proc = subprocess.Popen([sys.executable, "-m", "fmcache.grid.main", str(spec)], env=env, stdout=handle,
                                    stderr=subprocess.STDOUT)  # fmt: skip
            running[job.id] = (proc, gpu, log_file, handle)
            log(f"started {job.id}" + (f" on GPU {gpu}" if gpu is not None else ""))
        for job_id, (proc, gpu, log_file, handle) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()  # type: ignore[attr-defined]
            del running[job_id]
            if gpu is not None:
                free_gpus.append(gpu)
            finished.add(job_id)
            if proc.returncode == 0:
                outcome.ran.append(job_id)
                log(f"done {job_id}")
            else:
                tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                outcome.failed[job_id] = f"exit {proc.returncode}: {tail[0]} (log: {log_file})"
                log(f"failed {job_id}: {outcome.failed[job_id]}")
        time.sleep(0.2)
    return outcome


def _log_name(job: Job) -> str:
    return job.id.replace("/", "__").replace(":", "_").replace("#", "-")


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise FmcacheError("--executor slurm needs submitit: pip install submitit (or fmcache[dev])") from None
    return submitit


def run_submitit(jobs: list[Job], options: GridOptions, logs: Path, log: Log) -> Outcome:
    """Submit through submitit: on Slurm every job at once with afterok dependencies; elsewhere (submitit's local
    cluster, used by the tests) wave by wave, since only Slurm can hold a job until its dependencies succeed."""
    submitit = import_submitit()
    cluster = options.submitit_cluster
    if cluster is None:
        if shutil.which("sbatch") is None:
            raise FmcacheError("--executor slurm: sbatch not found; run the grid on a Slurm login node")
        cluster = "slurm"
    outcome = Outcome()
    todo = []
    for job in jobs:
        if is_done(job):
            outcome.skipped.append(job.id)
        else:
            todo.append(job)
    executor = submitit.AutoExecutor(folder=logs / "%j", cluster=cluster)
    params: dict = {"timeout_min": options.time_min, "gpus_per_node": options.gpus_per_job, "tasks_per_node": 1,
                    "nodes": 1}  # fmt: skip
    if cluster == "slurm" and options.slurm_partition:
        params["slurm_partition"] = options.slurm_partition
    executor.update_parameters(**params)
    submitted: dict[str, object] = {}
    ids = {j.id for j in todo}

    def collect(job_id: str, handle) -> None:
        try:
            handle.result()
        except Exception as exc:  # the job's own traceback is in its log; one line here
            message = str(exc).strip().splitlines()
            outcome.failed[job_id] = f"{message[-1] if message else type(exc).__name__} (log: {handle.paths.stdout})"
            log(f"failed {job_id}: {outcome.failed[job_id]}")
            return
        outcome.ran.append(job_id)
        log(f"done {job_id} (log: {handle.paths.stdout})")

    if cluster == "slurm":
        for job in todo:
            deps = [submitted[d].job_id for d in job.deps if d in submitted]  # type: ignore[attr-defined]
            extra = {"dependency": f"afterok:{':'.join(deps)}", "kill-on-invalid-dep": "yes"} if deps else {}
            executor.update_parameters(name=job.id, slurm_additional_parameters=extra)
            submitted[job.id] = executor.submit(submitted_job, _job_doc(job))
            log(f"submitted {job.id} as {submitted[job.id].job_id}")  # type: ignore[attr-defined]
        for job_id, handle in submitted.items():
            collect(job_id, handle)
        return outcome
    remaining = list(todo)
    while remaining:
        wave = [j for j in remaining if all(d not in ids or d in outcome.ran for d in j.deps)]
        blocked = [j for j in remaining if _ready(j, outcome)]
        outcome.blocked += [j.id for j in blocked]
        wave = [j for j in wave if j not in blocked]
        if not wave:
            outcome.blocked += [j.id for j in remaining if j not in blocked]
            break
        handles = {}
        for job in wave:
            executor.update_parameters(name=job.id)
            handles[job.id] = executor.submit(submitted_job, _job_doc(job))
            log(f"submitted {job.id} as {handles[job.id].job_id}")
        for job_id, handle in handles.items():
            collect(job_id, handle)
        remaining = [j for j in remaining if j.id not in handles and j not in blocked]
    return outcome
