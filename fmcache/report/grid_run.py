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
from fmcache.report.grid_config import DATASET_OPTIONS, Log
from fmcache.report.grid_jobs import Job

LEDGER = ".grid"


def _source(data: dict, model: dict) -> dict:
    """The spec fields that name the images and the foundation: the same for an extract and a fine-tune."""
    return {
        "dataset": data["name"], "data_root": Path(data["root"]), "model": model["name"],
        "weights": Path(model["weights"]) if model.get("weights") else None,
        "random_init": bool(model.get("random_init", False)), "img_size": model.get("img_size"),
        "arch_overrides": dict(model.get("arch_overrides") or {}),
        "dataset_options": {k: data[k] for k in DATASET_OPTIONS if data.get(k) is not None},
    }  # fmt: skip


def extract_spec(job: Job, model: dict | None = None):
    from fmcache.extract import ExtractSpec

    settings = dict(job.extract)
    if job.dataset.get("limit") is not None:
        settings.setdefault("limit", job.dataset["limit"])
    return ExtractSpec(**_source(job.dataset, model or job.model), cache_root=Path(job.cache_root), **settings)


def _extractor(job: Job, model: dict | None = None):
    """The extraction a job reads (an extract job: the one it runs), quiet: only its folder and state are asked."""
    from fmcache.extract import Extractor

    return Extractor(extract_spec(job, model), progress=False, log=lambda _m: None)


def _cache_folder(job: Job, model: dict | None = None) -> Path:
    """The complete cache a reader job reads; an incomplete one means its extract job failed or never ran."""
    extractor = _extractor(job, model)
    if not extractor.is_complete():
        raise FmcacheError(
            f"the cache of {job.id} is not complete ({extractor.folder}); its extract job must run first"
        )
    return extractor.folder


def finetune_spec(job: Job):
    from fmcache.finetune.run import FinetuneSpec

    options = dict(job.options)
    if isinstance(options.get("lrs"), list):
        options["lrs"] = tuple(float(x) for x in options["lrs"])
    for key in ("freeze", "head_weights"):
        if options.get(key) is not None:
            options[key] = str(options[key])
    if job.dataset.get("limit") is not None:
        options.setdefault("limit", job.dataset["limit"])
    return FinetuneSpec(
        **_source(job.dataset, job.model), head=job.kind.split("_", 1)[1], out=Path(job.results), **options
    )


def execute(job: Job, log: Log = print) -> Path:
    """Run one job in this process with the library's functions; returns the cache or result folder."""
    results = Path(job.results)
    if job.kind == "extract":
        from fmcache.extract import run_extract

        return run_extract(extract_spec(job), progress=False, log=log)
    if job.kind.startswith("finetune"):
        from fmcache.finetune.run import run_finetune

        return Path(run_finetune(finetune_spec(job), progress=False, log=log)["folder"])
    from fmcache.cache.reader import CacheReader

    reader = CacheReader(_cache_folder(job))
    options = dict(job.options)
    if job.kind == "knn":
        from fmcache.frozen.run import run_knn

        out = run_knn(reader, out=results, **options)
    elif job.kind == "probe_linear":
        from fmcache.frozen.run import run_probe

        out = run_probe(reader, out=results, head="linear", **options)
    elif job.kind in ("probe_deit", "probe_attentive"):
        from fmcache.frozen.run_tokens import run_token_probe

        out = run_token_probe(reader, out=results, head=job.kind.split("_", 1)[1], **options)
    else:
        from fmcache.frozen.run import run_cka

        reader_b = CacheReader(_cache_folder(job, job.model_b)) if job.model_b else None
        out = run_cka(reader, reader_b, out=results, **options)
    return Path(out["folder"])


def ledger_path(job: Job) -> Path:
    return Path(job.results) / LEDGER / f"{job.digest()[:24]}.json"


def is_done(job: Job) -> bool:
    """An extract: its cache is complete. Any other job: its ledger entry names a complete result folder."""
    from fmcache.results import is_complete

    if job.kind == "extract":
        return _extractor(job).is_complete()
    try:
        entry = json.loads(ledger_path(job).read_text())
    except (OSError, ValueError):
        return False
    return is_complete(Path(entry.get("folder", "")))


def run_and_record(job: Job, log: Log = print) -> str:
    """Execute a job, then record where it wrote (after the result exists, so a crash leaves the job undone)."""
    from fmcache.files import atomic_write_bytes, ensure_writable_dir

    folder = execute(job, log)
    if job.kind != "extract":
        path = ledger_path(job)
        ensure_writable_dir(path.parent)
        entry = {"job": job.id, "kind": job.kind, "folder": str(Path(folder).resolve()), "job_spec": _job_doc(job)}
        atomic_write_bytes(path, (json.dumps(entry, indent=2, default=str) + "\n").encode())
    return str(folder)


def _job_doc(job: Job) -> dict:
    return dataclasses.asdict(job)


def submitted_job(doc: dict) -> str:
    """What a subprocess or a Slurm node runs: one job from its plain-data description."""
    return run_and_record(Job(**doc), log=lambda m: print(m, flush=True))
