"""Running one grid job in this process with the library's functions, and the ledger that says a job is done.

The grid cannot name a protocol's folder in advance (the runner resolves ``layer: all``, pools and seeds into the
settings it hashes), so after each job :func:`run_and_record` writes ``<results>/.grid/<job hash>.json`` pointing at
the folder the runner wrote; :func:`is_done` holds when that entry names a complete result (an extract: when its
cache is complete).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fmcache.errors import FmcacheError
from fmcache.extract.spec import ExtractSpec
from fmcache.files import atomic_write_bytes, ensure_writable_dir
from fmcache.grid.config import DATASET_OPTIONS, Log
from fmcache.grid.jobs import Job
from fmcache.grid.lock import LEDGER, JobLock
from fmcache.protocols import get_protocol
from fmcache.results import RESULT_JSON, is_complete
from fmcache.runners import make_spec, run

# exit codes of ``python -m fmcache.grid.main JOB.json`` (the --jobs N subprocess) besides 0 (ran) and 2 (failed)
EXIT_BUSY = 3  # the job runs in another grid now
EXIT_DONE_ELSEWHERE = 4  # another grid finished it before this process got the lock


def _source(data: dict, model: dict) -> dict:
    """The spec fields that name the images and the foundation: the same for an extract and a fine-tune."""
    return {
        "dataset": data["name"],
        "data_root": Path(data["root"]),
        "model": model["name"],
        "weights": Path(model["weights"]) if model.get("weights") else None,
        "random_init": bool(model.get("random_init", False)),
        "img_size": model.get("img_size"),
        "arch_overrides": dict(model.get("arch_overrides") or {}),
        "dataset_options": {k: data[k] for k in DATASET_OPTIONS if data.get(k) is not None},
    }


def extract_spec(job: Job, model: dict | None = None):
    settings = dict(job.extract)
    if job.dataset.get("limit") is not None:
        settings.setdefault("limit", job.dataset["limit"])
    return ExtractSpec(**_source(job.dataset, model or job.model), cache_root=Path(job.cache_root), **settings)


def _plan(job: Job, model: dict | None = None):
    """The extraction a job reads (an extract job: the one it runs); planning reads labels, no image, no model."""
    from fmcache.extract.plan import plan  # deferred: h5py, torch, torchvision

    return plan(extract_spec(job, model), log=lambda _m: None)


def _cache_folder(job: Job, model: dict | None = None) -> Path:
    """The complete cache a reader job reads; an incomplete one means its extract job failed or never ran."""
    planned = _plan(job, model)
    if not planned.is_complete():
        raise FmcacheError(f"the cache of {job.id} is not complete ({planned.folder}); its extract job must run first")
    return planned.folder


def job_spec(job: Job):
    """The spec a protocol job runs: its YAML options plus what the grid fixes (cache or images, results root)."""
    protocol = get_protocol(job.kind)
    options = dict(job.options)
    if protocol.reads == "images":
        if job.dataset.get("limit") is not None:
            options.setdefault("limit", job.dataset["limit"])
        return make_spec(job.kind, **_source(job.dataset, job.model), out=Path(job.results), **options)
    if protocol.pairs and job.model_b:
        options["cache_b"] = _cache_folder(job, job.model_b)
    if protocol.pairs and options.get("after_finetune"):
        options["cache_b"] = _finetuned_cache(job, str(options.pop("after_finetune")))
    return make_spec(job.kind, cache=_cache_folder(job), out=Path(job.results), **options)


def _finetuned_cache(job: Job, finetune_id: str) -> Path:
    """Fig. 7's second cache: the job's model extracted again with the export of its fine-tune job (the best LR's
    first seed), with the same extraction settings; the extraction is skipped when that cache is complete."""
    from fmcache.extract.run import run_extract  # deferred: h5py, torch, torchvision
    from fmcache.finetune.loop import EXPORT  # deferred: torch

    entries = []
    for path in sorted((Path(job.results) / LEDGER).glob("*.json")):
        entry = _ledger_entry(path)
        if entry is not None and entry.get("job") == finetune_id and is_complete(Path(entry.get("folder", ""))):
            entries.append((path.stat().st_mtime, entry))
    if not entries:
        raise FmcacheError(f"{job.id} needs the fine-tune job {finetune_id}, which has no complete result yet")
    doc = json.loads((Path(max(entries, key=lambda e: e[0])[1]["folder"]) / RESULT_JSON).read_text())
    best_lr, seed = doc["summary"]["best_lr"], doc["settings"]["seeds"][0]
    export = Path(doc["details"]["runs_folder"]) / f"lr{best_lr:g}_seed{seed}" / EXPORT
    if not export.is_file():
        raise FmcacheError(
            f"the fine-tune job {finetune_id} exported no foundation ({export}); a fine-tune with --freeze all trains "
            "none: name a variant that trains blocks"
        )
    model = {**job.model, "weights": str(export), "random_init": False}
    return run_extract(extract_spec(job, model), progress=False, log=lambda _m: None)


def execute(job: Job, log: Log = print) -> Path:
    """Run one job in this process with the library's functions; returns the cache or result folder."""
    if job.is_extract:
        from fmcache.extract.run import run_extract  # deferred: h5py, torch, torchvision

        return run_extract(extract_spec(job), progress=False, log=log)
    return Path(run(job.kind, job_spec(job), progress=False, log=log)["folder"])


def ledger_path(job: Job) -> Path:
    return Path(job.results) / LEDGER / f"{job.digest()[:24]}.json"


def _ledger_entry(path: Path) -> dict | None:
    """A ledger entry ({job, kind, folder, job_spec}), or None where it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_done(job: Job) -> bool:
    """An extract: its cache is complete. Any other job: its ledger entry names a complete result folder."""
    if job.is_extract:
        return _plan(job).is_complete()
    entry = _ledger_entry(ledger_path(job))
    return entry is not None and is_complete(Path(entry.get("folder", "")))


def run_and_record(job: Job, log: Log = print, wait: bool = False, note: Log | None = None) -> str | None:
    """Run a job under its lock, then record where it wrote (after the result exists, so a crash leaves the job
    undone). Returns the folder, or None when the job was done once the lock was ours (another grid finished it).

    Raises :class:`fmcache.grid.lock.JobBusy` when another grid runs the job now, unless ``wait``; ``note`` gets
    the lock's own messages (waiting, a stale lock taken over), ``log`` the job's.
    """
    note = note or log
    lock = JobLock(job)
    ensure_writable_dir(lock.path.parent)
    waited = lock.acquire_or_wait(wait, note)
    try:
        # checked again under the lock: another grid may have finished it since this one looked
        if is_done(job):
            note(f"{job.id}: " + ("done by another grid meanwhile" if waited else "already done") + "; nothing to do")
            return None
        log(f"running {job.id}")
        folder = execute(job, log)
        if not job.is_extract:
            path = ledger_path(job)
            entry = {"job": job.id, "kind": job.kind, "folder": str(Path(folder).resolve()), "job_spec": job_doc(job)}
            atomic_write_bytes(path, (json.dumps(entry, indent=2, default=str) + "\n").encode())
        return str(folder)
    finally:
        lock.release()


def job_doc(job: Job) -> dict:
    return dataclasses.asdict(job)


def submitted_job(doc: dict, wait: bool = True) -> str | None:
    """What a subprocess or a Slurm node runs: one job from its plain-data description.

    On Slurm it always waits for a run of the same job in another grid: its dependents start on its success
    (``afterok``), so it may only end once the job's work exists.
    """
    return run_and_record(Job(**doc), log=lambda m: print(m, flush=True), wait=wait)
