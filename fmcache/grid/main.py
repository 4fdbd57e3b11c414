"""``fmcache grid``: a YAML experiment → extract and protocol jobs with dependencies, run locally or on Slurm.

One ``extract`` job per (model, dataset, extraction settings); the frozen protocols of that pair read its cache;
fine-tuning runs from images. A job is skipped when its work is already there: an extract whose cache manifest is
complete, a protocol whose result folder holds a complete ``result.json``. The grid cannot name a protocol's folder
in advance (the runner resolves ``layer: all``, pools and seeds into the settings it hashes), so after each job it
writes a ledger entry ``<results>/.grid/<job hash>.json`` pointing at the folder the runner wrote; a job is done when
its entry exists and :func:`fmcache.results.is_complete` holds for that folder. The entry is written after the
result, so a crash at any point leaves the job undone, and a rerun completes only what is missing.

Executors: ``local`` runs the jobs one after another in this process, or ``--jobs N`` at once as subprocesses
(``python -m fmcache.grid.main JOB.json``) with one GPU each via ``CUDA_VISIBLE_DEVICES``; ``slurm`` submits through
submitit (imported only then), with ``afterok`` dependencies from each extract to its readers and submitit's per-job
logs.

This module is the command (data roots, the dry run, :func:`run_grid`, the subprocess entry point). The parts:
:mod:`~fmcache.grid.config` (the YAML and the options), :mod:`~fmcache.grid.jobs` (expansion into jobs, ``--only``),
:mod:`~fmcache.grid.run` (one job, the ledger, done-detection) and :mod:`~fmcache.grid.executors` (local,
``--jobs N``, slurm).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fmcache.cost.estimate import estimate_jobs
from fmcache.cost.recorded import RecordedEstimator, recorded_seconds
from fmcache.cost.sizes import dataset_sizes
from fmcache.errors import FmcacheError
from fmcache.grid.config import GridConfig, GridOptions, Log, load_grid
from fmcache.grid.dry_run import ROWS_PER_JOB, describe, print_cost
from fmcache.grid.executors import run_local, run_parallel
from fmcache.grid.jobs import Job, expand, select
from fmcache.grid.lock import JobBusy
from fmcache.grid.run import EXIT_BUSY, EXIT_DONE_ELSEWHERE, is_done, refusal, submitted_job
from fmcache.grid.slurm import import_submitit, run_slurm

# -- data roots, dry run ---------------------------------------------------------------------------------------------


def check_roots(grid: GridConfig, dry_run: bool, log: Log) -> None:
    """Every dataset root exists (or is prepared) before any job starts."""
    for data in grid.datasets:
        root = Path(data["root"])
        if root.exists():
            continue
        if dry_run and data.get("prepare") != "digits":
            continue  # a dry run plans without data: the plan says which roots are missing (grid/dry_run.py)
        if data.get("prepare") == "digits":
            if dry_run:
                log(f"dataset {data['name']}: {root} will be written (prepare: digits)")
                continue
            prepare_digits(root, int(data.get("per_class") or 30))
            log(f"dataset {data['name']}: wrote scikit-learn digits to {root}")
            continue
        raise FmcacheError(f"dataset {data['name']}: root {root} does not exist; fix datasets[].root in {grid.source}")


def prepare_digits(root: Path, per_class: int) -> Path:
    """The demo's digits ImageFolder, written beside and renamed into place, so a killed run never leaves half."""
    from fmcache.data.digits import write_digits  # deferred: torch, torchvision

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    write_digits(tmp, per_class=per_class)
    try:
        os.replace(tmp, root)
    except OSError:
        if not root.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another grid wrote the same digits meanwhile: keep theirs
    return root


def plan(grid: GridConfig, jobs: list[Job], log: Log, device_rate: str | None = None) -> dict:
    """The dry run: jobs per kind, how many are done, the jobs the run would refuse, and what the rest should cost
    (on ``device_rate``). Raises (exit 2) after the plan when any job would be refused."""
    splits = dataset_sizes(grid.datasets, log)
    sizes = {name: (size.total if size else None) for name, size in splits.items()}
    done = {j.id for j in jobs if _safe_done(j)}
    pending = [j for j in jobs if j.id not in done]
    groups = describe(grid, jobs, done, log)
    refused = refusals(pending, log)
    pending = [j for j in pending if j.id not in refused]  # a refused job has no cost: it would not run
    recorded = estimate_jobs(RecordedEstimator(recorded_seconds(grid.results, grid.cache_root)), pending)
    seconds, unknown = sum(c.ours.seconds for c in recorded.costs.values()), len(recorded.failed)
    known = len(pending) - unknown
    log(
        f"estimated cost of the {known} job(s) with recorded timings of their kind: {seconds:.0f} s"
        + (f"; {unknown} job(s) have none yet" if unknown else "")
    )
    shown = pending if len(pending) <= ROWS_PER_JOB else pending[:40]
    for job in shown:
        log(f"  to run: {job.id}")
    if len(shown) < len(pending):
        log(f"  ... and {len(pending) - len(shown)} more to run (--only KIND,DATASET,MODEL lists fewer)")
    cost = print_cost(pending, splits, log, device_rate)
    if refused:
        first, why = next(iter(refused.items()))
        raise FmcacheError(
            f"{len(refused)} job(s) of {grid.source} would be refused when they run (the lines above); first: "
            f"{first}: {why}; fix their options and plan again"
        )
    return {
        "jobs": len(jobs),
        "done": len(done),
        "pending": [j.id for j in pending],
        "estimate_s": seconds,
        "paper_outputs": groups,
        "dataset_sizes": sizes,
        "cost": cost,
    }


def refusals(jobs: list[Job], log: Log) -> dict[str, str]:
    """Every job whose spec the run would refuse, with why, each said in one line (nothing when none is)."""
    refused = {job.id: why for job in jobs if (why := refusal(job)) is not None}
    if refused:
        log(f"{len(refused)} job(s) the run would refuse, checked as the run checks them:")
    for job_id, why in refused.items():
        log(f"  refused: {job_id}: {why}")
    return refused


def _safe_done(job: Job) -> bool:
    # a dataset root that a prepare step has not written yet makes the job simply not done
    try:
        return is_done(job)
    except FmcacheError:
        return False


# -- the command -----------------------------------------------------------------------------------------------------


def run_grid(config: Path, options: GridOptions, log: Log = print) -> dict:
    """Check the YAML and the data roots, expand, skip what is done, run the rest; raises if any job failed."""
    if options.executor not in ("local", "slurm"):
        raise FmcacheError(f"unknown --executor '{options.executor}'; use local or slurm")
    if options.jobs < 1:
        raise FmcacheError(f"--jobs must be at least 1, got {options.jobs}")
    for warning in ignored_options(options):
        log(warning)
    if options.executor == "slurm" and not options.dry_run:
        import_submitit()  # before any data is prepared or job started
    grid = load_grid(config, options.results, options.cache_root)
    jobs = select(expand(grid), options.only)
    check_roots(grid, options.dry_run, log)
    if options.dry_run:
        return plan(grid, jobs, log, options.device_rate)
    logs = Path(options.logs) if options.logs else grid.results / "grid_logs"
    start = time.perf_counter()
    if options.executor == "slurm":
        outcome = run_slurm(jobs, options, logs, log)
    elif options.jobs > 1:
        outcome = run_parallel(jobs, options.jobs, logs, log, wait=options.wait)
    else:
        outcome = run_local(jobs, log, wait=options.wait)
    seconds = time.perf_counter() - start
    elsewhere = f", {len(outcome.elsewhere)} running in another grid" if outcome.elsewhere else ""
    log(
        f"{len(jobs)} job(s): {len(outcome.ran)} ran, {len(outcome.skipped)} already done, "
        f"{len(outcome.failed)} failed, {len(outcome.blocked)} not started{elsewhere}; {seconds:.1f} s"
    )
    # the summary names every job that did not end done, so nothing needs digging out of the lines above
    for job_id, why in [*outcome.failed.items(), *outcome.blocked.items(), *outcome.elsewhere.items()]:
        log(f"  {job_id}: {why if job_id not in outcome.failed else 'failed: ' + why}")
    if outcome.failed or outcome.blocked:
        first = next(iter(outcome.failed.items()), None) or next(iter(outcome.blocked.items()))
        raise FmcacheError(
            f"{len(outcome.failed)} job(s) failed and {len(outcome.blocked)} could not start; first: {first[0]}: "
            f"{first[1]}; rerun the same command to retry only those"
        )
    return {
        "jobs": len(jobs),
        "ran": outcome.ran,
        "skipped": outcome.skipped,
        "elsewhere": dict(outcome.elsewhere),
        "seconds": seconds,
    }


def ignored_options(options: GridOptions) -> list[str]:
    """A warning line for each option given where it does nothing (never silently dropped)."""
    slurm = {
        "--slurm-partition": options.slurm_partition,
        "--slurm-account": options.slurm_account,
        "--slurm-qos": options.slurm_qos,
        "--slurm-option": options.slurm_options or None,
        "--gpus-per-job": options.gpus_per_job,
    }
    warnings = []
    if options.device_rate is not None and not options.dry_run:
        warnings.append("warning: --device-rate prices a --dry-run only; ignored (add --dry-run to see the cost)")
    if options.executor != "slurm":
        given = [flag for flag, value in slurm.items() if value is not None]
        if given:
            warnings.append(f"warning: {', '.join(given)} apply to --executor slurm only; ignored")
    return warnings


def main(argv: list[str]) -> int:
    """``python -m fmcache.grid.main JOB.json``: one job in a fresh process (the ``--jobs N`` executor)."""
    doc = json.loads(Path(argv[0]).read_text())
    try:
        folder = submitted_job(doc, wait=False)  # the parent waits (--wait) or reports; never the child
    except JobBusy as exc:
        print(f"busy: {exc}", flush=True)
        return EXIT_BUSY
    except FmcacheError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    if folder is None:
        return EXIT_DONE_ELSEWHERE
    print(folder, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
