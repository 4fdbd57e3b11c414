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
from fmcache.extract.pixel_spec import PixelSpec
from fmcache.extract.spec import ExtractSpec
from fmcache.files import atomic_write_bytes, ensure_writable_dir
from fmcache.grid.config import APPLY_KEYS, DATASET_OPTIONS, Log
from fmcache.grid.jobs import Job
from fmcache.grid.lock import LEDGER, JobLock
from fmcache.protocols import get_protocol
from fmcache.results import RESULT_JSON, incomplete, is_complete
from fmcache.runners import make_spec, run, spec_class

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


def pixel_spec(job: Job) -> PixelSpec:
    """A pixel job's spec: the dataset, the image size its fine-tunes read, the grid's cache root."""
    source = _source(job.dataset, job.model)
    return PixelSpec(
        dataset=source["dataset"],
        data_root=source["data_root"],
        img_size=int(job.model["img_size"]),
        cache_root=Path(job.cache_root),
        limit=job.dataset.get("limit"),
        dataset_options=source["dataset_options"],
        **({"workers": int(job.options["workers"])} if job.options.get("workers") is not None else {}),
    )


def _pixel_plan(job: Job):
    from fmcache.extract.pixels import plan_pixels  # deferred: h5py, torch, torchvision

    return plan_pixels(pixel_spec(job), log=lambda _m: None)


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
    if protocol.reads == "images":
        return spec_of(job)
    if protocol.applies:  # another job's heads on this job's cache (transfer)
        return spec_of(job, _cache_folder(job), result=_job_result(job, str(job.options["from_job"])))
    cache_b = None
    if protocol.pairs and job.model_b:
        cache_b = _cache_folder(job, job.model_b)
    if protocol.pairs and job.options.get("after_finetune"):
        cache_b = _finetuned_cache(job, str(job.options["after_finetune"]))
    return spec_of(job, _cache_folder(job), cache_b)


# where a dry run's spec names the cache a job will read: building a spec opens no file, so the placeholder changes
# nothing the spec checks
PLANNED_CACHE = Path("<the job's cache>")
PLANNED_RESULT = Path("<the result of the job whose heads it applies>")


def spec_of(job: Job, cache: Path = PLANNED_CACHE, cache_b: Path | None = None, result: Path | None = None):
    """A protocol job's spec from its YAML options and what the grid fixes; ``cache`` and ``cache_b`` are the folders
    it reads (ignored for a job that reads images), ``result`` the result whose heads an applying job applies.
    :func:`job_spec` passes the real ones, a dry run the placeholders, so both refuse exactly the same options."""
    protocol = get_protocol(job.kind)
    grid_only = ("after_finetune", "from_job", *APPLY_KEYS)  # the grid's, not the spec's
    options = {k: v for k, v in job.options.items() if k not in grid_only}
    if protocol.applies:
        options["result"] = result or PLANNED_RESULT
    if protocol.reads == "images":
        if job.dataset.get("limit") is not None:
            options.setdefault("limit", job.dataset["limit"])
        if "cache_root" in {f.name for f in dataclasses.fields(spec_class(job.kind))}:  # where pixel caches live
            options["cache_root"] = Path(job.cache_root)
        return make_spec(job.kind, **_source(job.dataset, job.model), out=Path(job.results), **options)
    if cache_b is not None:
        options["cache_b"] = cache_b
    # the dataset's label policy applies in stage two (the cache keeps the raw annotations): a protocol that reads
    # labels takes it unless the job names its own
    fields = {f.name for f in dataclasses.fields(spec_class(job.kind))}
    if "uncertain" in fields and job.dataset.get("uncertain") is not None:
        options.setdefault("uncertain", job.dataset["uncertain"])
    return make_spec(job.kind, cache=cache, out=Path(job.results), **options)


def refusal(job: Job) -> str | None:
    """Why the run would refuse ``job`` (one line), or None: its spec built as the run builds it, with the placeholder
    for the caches it will read, so a dry run says before anything runs what the run would refuse at the job."""
    pairs = not job.is_stage_one and get_protocol(job.kind).pairs
    second = PLANNED_CACHE if pairs and (job.model_b or job.options.get("after_finetune")) else None
    try:
        if job.is_pixels:
            pixel_spec(job)
        elif job.is_extract:
            extract_spec(job)
        else:
            spec_of(job, PLANNED_CACHE, second)
    except FmcacheError as exc:
        return str(exc)
    except (TypeError, ValueError) as exc:  # a YAML value of a type no check expected (a list for a number)
        return f"an option of the wrong type ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    return None


def _job_result(job: Job, job_id: str) -> Path:
    """The result folder the grid's job ``job_id`` wrote (its latest complete one), from the ledger."""
    entries = []
    for path in sorted((Path(job.results) / LEDGER).glob("*.json")):
        entry = _ledger_entry(path)
        if entry is not None and entry.get("job") == job_id and is_complete(Path(entry.get("folder", ""))):
            entries.append((path.stat().st_mtime, entry))
    if not entries:
        raise FmcacheError(f"{job.id} needs the result of job {job_id}, which has none complete yet; run it first")
    return Path(max(entries, key=lambda e: e[0])[1]["folder"])


def _finetuned_cache(job: Job, finetune_id: str) -> Path:
    """Fig. 7's second cache: the job's model extracted again with the export of its fine-tune job (the best LR's
    first seed), with the same extraction settings; the extraction is skipped when that cache is complete."""
    from fmcache.extract.run import run_extract  # deferred: h5py, torch, torchvision
    from fmcache.finetune.loop import EXPORT  # deferred: torch

    doc = json.loads((_job_result(job, finetune_id) / RESULT_JSON).read_text())
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
    return run_job(job, log)[-1]


def run_job(job: Job, log: Log = print) -> list[Path]:
    """Run one job; every folder it wrote, the one the ledger names last (a label-efficiency job writes one result
    folder per subset run, the last written last)."""
    if job.is_pixels:
        from fmcache.extract.pixels import write_pixels  # deferred: h5py, torch, torchvision

        return [write_pixels(pixel_spec(job), progress=False, log=log)]
    if job.is_extract:
        from fmcache.extract.run import run_extract  # deferred: h5py, torch, torchvision

        return [run_extract(extract_spec(job), progress=False, log=log)]
    answer = run(job.kind, job_spec(job), progress=False, log=log)
    return [Path(f) for f in answer.get("folders") or [answer["folder"]]]


def ledger_path(job: Job) -> Path:
    return Path(job.results) / LEDGER / f"{job.digest()[:24]}.json"


def _ledger_entry(path: Path) -> dict | None:
    """A ledger entry ({job, kind, folder, job_spec}), or None where it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _folders(entry: dict) -> list[str]:
    return entry.get("folders") or [entry.get("folder", "")]


def is_done(job: Job) -> bool:
    """An extract: its cache is complete. Any other job: its ledger entry names complete result folders (each of a
    label-efficiency job's runs, its subsets file included)."""
    if job.is_pixels:
        return _pixel_plan(job).cache.is_complete()
    if job.is_extract:
        return _plan(job).is_complete()
    entry = _ledger_entry(ledger_path(job))
    return entry is not None and all(is_complete(Path(f)) for f in _folders(entry))


def damage(job: Job) -> str | None:
    """Why a job that ran once is no longer done (a result or subsets file changed or gone), or None."""
    entry = None if job.is_stage_one else _ledger_entry(ledger_path(job))
    found = [why for f in _folders(entry) if (why := incomplete(Path(f)))] if entry else []
    return found[0] if found else None


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
        why = damage(job)
        if why:  # it ran before, but what it wrote no longer holds: the job runs again, said so
            note(f"{job.id}: {why}; running it again")
        log(f"running {job.id}")
        folders = run_job(job, log)
        if not job.is_stage_one:
            path = ledger_path(job)
            entry = {"job": job.id, "kind": job.kind, "folder": str(folders[-1].resolve()), "job_spec": job_doc(job)}
            if len(folders) > 1:  # a label-efficiency job: it is done while every one of its runs is
                entry["folders"] = [str(f.resolve()) for f in folders]
            atomic_write_bytes(path, (json.dumps(entry, indent=2, default=str) + "\n").encode())
        return str(folders[-1])
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
