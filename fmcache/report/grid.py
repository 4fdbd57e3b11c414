"""``fmcache grid``: a YAML experiment → extract and protocol jobs with dependencies, run locally or on Slurm.

One ``extract`` job per (model, dataset, extraction settings); the frozen protocols of that pair read its cache;
fine-tuning runs from images. A job is skipped when its work is already there: an extract whose cache manifest is
complete, a protocol whose result folder holds a complete ``result.json``. The grid cannot name a protocol's folder
in advance (the runner resolves ``layer: all``, pools and seeds into the settings it hashes), so after each job it
writes a ledger entry ``<results>/.grid/<job hash>.json`` pointing at the folder the runner wrote; a job is done when
its entry exists and :func:`fmcache.results.is_complete` holds for that folder. The entry is written after the
result, so a crash at any point leaves the job undone, and a rerun completes only what is missing.

Executors: ``local`` runs the jobs one after another in this process, or ``--jobs N`` at once as subprocesses
(``python -m fmcache.report.grid JOB.json``) with one GPU each via ``CUDA_VISIBLE_DEVICES``; ``slurm`` submits through
submitit (imported only then), with ``afterok`` dependencies from each extract to its readers and submitit's per-job
logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fmcache.errors import FmcacheError

KINDS = ("extract", "knn", "probe_linear", "probe_deit", "probe_attentive", "cka", "finetune_linear", "finetune_deit")
TOP_KEYS = ("results", "cache_root", "models", "datasets", "extract", "protocols")
MODEL_KEYS = ("name", "weights", "random_init", "img_size", "arch_overrides", "tokens")
DATASET_KEYS = ("name", "root", "split", "uncertain", "layout", "csv", "prepare", "per_class", "limit")
DATASET_OPTIONS = ("split", "uncertain", "layout", "csv")
PREPARERS = ("digits",)
# options every protocol variant may carry besides its runner's: which models it applies to
VARIANT_KEYS = ("models",)
# fixed by the grid itself, so a YAML may not set them inside extract: or a protocol
GRID_OWNED = {"dataset", "data_root", "model", "weights", "random_init", "cache_root", "dataset_options",
              "arch_overrides", "out", "reader", "reader_b", "head", "progress", "from_cache", "img_size"}  # fmt: skip
LEDGER = ".grid"

Log = Callable[[str], None]


# -- the YAML --------------------------------------------------------------------------------------------------------


def _unknown(keys, valid, where: str, source: Path) -> None:
    bad = sorted(set(keys) - set(valid))
    if bad:
        raise FmcacheError(f"{source}: unknown key(s) {', '.join(bad)} in {where}; valid: {', '.join(sorted(valid))}")


def _runner_options(kind: str) -> set[str]:
    """The options a protocol variant may set: its runner's parameters (finetune: FinetuneSpec's fields)."""
    if kind == "knn":
        from fmcache.frozen.run import run_knn as fn
    elif kind == "probe_linear":
        from fmcache.frozen.run import run_probe as fn
    elif kind in ("probe_deit", "probe_attentive"):
        from fmcache.frozen.run_tokens import run_token_probe as fn
    elif kind == "cka":
        from fmcache.frozen.run import run_cka as fn

        return (set(inspect.signature(fn).parameters) - GRID_OWNED) | {"across_models"}
    else:
        from fmcache.finetune.run import FinetuneSpec

        return {f.name for f in dataclasses.fields(FinetuneSpec)} - GRID_OWNED - {"resume"}
    return set(inspect.signature(fn).parameters) - GRID_OWNED


def _extract_options() -> set[str]:
    from fmcache.extract import ExtractSpec

    return ({f.name for f in dataclasses.fields(ExtractSpec)} - GRID_OWNED) | {"tokens"}


def _resolve(path: str | Path, base: Path) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else (base / path).resolve()


@dataclass
class GridConfig:
    """A checked grid YAML: folders resolved against the YAML's folder (or the command line's overrides)."""

    source: Path
    results: Path
    cache_root: Path
    models: list[dict]
    datasets: list[dict]
    extract: dict
    protocols: dict[str, list[dict]]


def load_grid(path: Path, results: Path | None = None, cache_root: Path | None = None) -> GridConfig:
    """Read and check a grid YAML; every unknown key is one line naming it and the valid ones."""
    from fmcache.config import load_config

    path = Path(path)
    raw = load_config(path)
    _unknown(raw, TOP_KEYS, "the top level", path)
    base = path.resolve().parent
    models, datasets = raw.get("models") or [], raw.get("datasets") or []
    if not models or not datasets:
        raise FmcacheError(f"{path}: the grid needs at least one entry under models: and under datasets:")
    checked_models = []
    for entry in models:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry or {})
        _unknown(entry, MODEL_KEYS, f"model {entry.get('name', '?')}", path)
        if not entry.get("name"):
            raise FmcacheError(f"{path}: every model needs a name")
        if entry.get("weights"):
            entry["weights"] = str(_resolve(entry["weights"], base))
        checked_models.append(entry)
    checked_datasets = []
    for entry in datasets:
        entry = dict(entry or {})
        _unknown(entry, DATASET_KEYS, f"dataset {entry.get('name', '?')}", path)
        if not entry.get("name") or not entry.get("root"):
            raise FmcacheError(f"{path}: every dataset needs a name and a root")
        if entry.get("prepare") not in (None, *PREPARERS):
            raise FmcacheError(f"{path}: unknown prepare '{entry['prepare']}'; valid: {', '.join(PREPARERS)}")
        entry["root"] = str(_resolve(entry["root"], base))
        checked_datasets.append(entry)
    extract = {str(k).replace("-", "_"): v for k, v in (raw.get("extract") or {}).items()}
    _unknown(extract, _extract_options(), "extract", path)
    protocols: dict[str, list[dict]] = {}
    for kind, variants in (raw.get("protocols") or {}).items():
        kind = str(kind).replace("-", "_")
        _unknown([kind], [k for k in KINDS if k != "extract"], "protocols", path)
        variants = [variants or {}] if not isinstance(variants, list) else variants
        allowed = _runner_options(kind) | set(VARIANT_KEYS)
        protocols[kind] = []
        for variant in variants:
            variant = {str(k).replace("-", "_"): v for k, v in (variant or {}).items()}
            _unknown(variant, allowed, f"protocols.{kind}", path)
            protocols[kind].append(variant)
    model_names = {m["name"] for m in checked_models}
    for kind, variants in protocols.items():
        for variant in variants:
            stray = set(variant.get("models") or []) - model_names
            if stray:
                raise FmcacheError(f"{path}: protocols.{kind} names model(s) {', '.join(sorted(stray))} not in models:")
    return GridConfig(
        source=path,
        results=Path(results) if results is not None else _resolve(raw.get("results", "results"), base),
        cache_root=Path(cache_root) if cache_root is not None else _resolve(raw.get("cache_root", "cache"), base),
        models=checked_models,
        datasets=checked_datasets,
        extract=extract,
        protocols=protocols,
    )


# -- jobs ------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One unit of work; plain data, so it travels to a subprocess (JSON) or a Slurm node (pickle)."""

    id: str
    kind: str
    dataset: dict
    model: dict
    options: dict = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)
    extract: dict = field(default_factory=dict)  # the extraction settings whose cache a reader reads
    model_b: dict | None = None  # two-cache CKA
    results: str = "results"
    cache_root: str = "cache"

    def digest(self) -> str:
        """What makes the job's numbers: never the folders, so --results elsewhere keeps its own ledger."""
        doc = {"kind": self.kind, "dataset": self.dataset, "model": self.model, "options": self.options,
               "extract": self.extract, "model_b": self.model_b}  # fmt: skip
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _extract_settings(grid: GridConfig, model: dict) -> dict:
    settings = dict(grid.extract)
    if model.get("tokens") is not None:  # a model may cache other token layers than the grid's default
        settings["tokens"] = str(model["tokens"])
    return settings


def expand(grid: GridConfig) -> list[Job]:
    """Every job of the grid in dependency order: extracts, then the protocols reading them, then fine-tuning."""
    common = {"results": str(grid.results), "cache_root": str(grid.cache_root)}
    frozen = [k for k in grid.protocols if not k.startswith("finetune")]
    jobs: list[Job] = []
    for data in grid.datasets:
        extract_ids: dict[str, str] = {}
        if frozen:
            for model in grid.models:
                job_id = f"extract/{data['name']}/{model['name']}"
                settings = _extract_settings(grid, model)
                jobs.append(Job(job_id, "extract", data, model, extract=settings, **common))
                extract_ids[model["name"]] = job_id
        for kind, variants in grid.protocols.items():
            for n, variant in enumerate(variants):
                options = {k: v for k, v in variant.items() if k not in VARIANT_KEYS}
                across = bool(options.pop("across_models", False)) if kind == "cka" else False
                chosen = [m for m in grid.models if not variant.get("models") or m["name"] in variant["models"]]
                suffix = f"#{n}" if len(variants) > 1 else ""
                for model in chosen:
                    job_id = f"{kind}{suffix}/{data['name']}/{model['name']}"
                    if kind.startswith("finetune"):
                        jobs.append(Job(job_id, kind, data, model, options, **common))
                    else:
                        jobs.append(Job(job_id, kind, data, model, options, [extract_ids[model["name"]]],
                                        _extract_settings(grid, model), **common))  # fmt: skip
                if across:  # the last layer of every pair of models (paper Fig. 8)
                    pair_options = {**options, "layers": "last", "layers_b": "last"}
                    for i, a in enumerate(chosen):
                        for b in chosen[i + 1 :]:
                            jobs.append(Job(
                                f"cka{suffix}/{data['name']}/{a['name']}_x_{b['name']}", "cka", data, a, pair_options,
                                [extract_ids[a["name"]], extract_ids[b["name"]]], _extract_settings(grid, a),
                                model_b=b, **common,
                            ))  # fmt: skip
    # fine-tuning last: frozen results come early, the costliest runs at the end
    jobs.sort(key=lambda j: j.kind.startswith("finetune"))
    return jobs


def select(jobs: list[Job], only: str | None) -> list[Job]:
    """Keep the jobs whose kind, dataset and model match ``--only`` (each given category filters), plus their deps."""
    if not only:
        return jobs
    tokens = {t.strip() for t in only.split(",") if t.strip()}
    kinds = {j.kind for j in jobs}
    datasets = {j.dataset["name"] for j in jobs}
    models = {j.model["name"] for j in jobs} | {j.model_b["name"] for j in jobs if j.model_b}
    unknown = tokens - kinds - datasets - models
    if unknown:
        valid = sorted(kinds) + sorted(datasets) + sorted(models)
        raise FmcacheError(f"--only: unknown {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")

    def keep(job: Job) -> bool:
        names = {job.model["name"]} | ({job.model_b["name"]} if job.model_b else set())
        return ((not tokens & kinds or job.kind in tokens) and (not tokens & datasets or job.dataset["name"] in tokens)
                and (not tokens & models or bool(names & tokens)))  # fmt: skip

    kept = {j.id for j in jobs if keep(j)}
    for job in jobs:  # a reader needs its cache: its extract comes along (and is skipped when complete)
        if job.id in kept:
            kept.update(job.deps)
    return [j for j in jobs if j.id in kept]


# -- running one job -------------------------------------------------------------------------------------------------


def extract_spec(job: Job, model: dict | None = None):
    from fmcache.extract import ExtractSpec

    model = model or job.model
    data = job.dataset
    options = {k: data[k] for k in DATASET_OPTIONS if data.get(k) is not None}
    settings = dict(job.extract)
    if data.get("limit") is not None:
        settings.setdefault("limit", data["limit"])
    return ExtractSpec(
        dataset=data["name"], data_root=Path(data["root"]), model=model["name"],
        weights=Path(model["weights"]) if model.get("weights") else None,
        random_init=bool(model.get("random_init", False)), img_size=model.get("img_size"),
        cache_root=Path(job.cache_root), dataset_options=options, arch_overrides=dict(model.get("arch_overrides") or {}),
        **settings,
    )  # fmt: skip


def _cache_folder(job: Job, model: dict | None = None) -> Path:
    """The complete cache a reader job reads; an incomplete one means its extract job failed or never ran."""
    from fmcache.extract import Extractor

    extractor = Extractor(extract_spec(job, model), progress=False, log=lambda _m: None)
    if not extractor.is_complete():
        raise FmcacheError(
            f"the cache of {job.id} is not complete ({extractor.folder}); its extract job must run first"
        )
    return extractor.folder


def finetune_spec(job: Job):
    from fmcache.finetune.run import FinetuneSpec

    data, model = job.dataset, job.model
    options = dict(job.options)
    if isinstance(options.get("lrs"), list):
        options["lrs"] = tuple(float(x) for x in options["lrs"])
    for key in ("freeze", "head_weights"):
        if options.get(key) is not None:
            options[key] = str(options[key])
    if data.get("limit") is not None:
        options.setdefault("limit", data["limit"])
    return FinetuneSpec(
        dataset=data["name"], data_root=Path(data["root"]), model=model["name"],
        weights=Path(model["weights"]) if model.get("weights") else None,
        random_init=bool(model.get("random_init", False)), img_size=model.get("img_size"),
        arch_overrides=dict(model.get("arch_overrides") or {}), head=job.kind.split("_", 1)[1], out=Path(job.results),
        dataset_options={k: data[k] for k in DATASET_OPTIONS if data.get(k) is not None}, **options,
    )  # fmt: skip


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
        from fmcache.extract import Extractor

        return Extractor(extract_spec(job), progress=False, log=lambda _m: None).is_complete()
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


# -- data roots, dry run ---------------------------------------------------------------------------------------------


def check_roots(grid: GridConfig, dry_run: bool, log: Log) -> None:
    """Every dataset root exists (or is prepared) before any job starts."""
    for data in grid.datasets:
        root = Path(data["root"])
        if root.exists():
            continue
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
    from fmcache.demo import write_digits

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    write_digits(tmp, per_class=per_class)
    os.replace(tmp, root)
    return root


def _recorded_seconds(grid: GridConfig) -> dict[tuple[str, str], list[float]]:
    """Recorded costs by (kind, model) from the results tree and the caches, for the dry run's estimate."""
    from fmcache.results import find_results

    seconds: dict[tuple[str, str], list[float]] = {}
    if grid.results.is_dir():
        for doc in find_results(grid.results):
            t = (doc.get("timings") or {}).get("train_seconds")
            if t is not None:
                seconds.setdefault((doc["protocol"], doc["model"]), []).append(float(t))
    if grid.cache_root.is_dir():
        for manifest in grid.cache_root.glob("*/*/*/manifest.json"):
            try:
                doc = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            shard_seconds = [s.get("seconds") for s in doc.get("shards") or [] if s.get("seconds") is not None]
            if doc.get("status") == "complete" and shard_seconds:
                seconds.setdefault(("extract", doc.get("model", {}).get("name", "?")), []).append(sum(shard_seconds))
    return seconds


def estimate(jobs: list[Job], recorded: dict[tuple[str, str], list[float]]) -> tuple[float, int]:
    """(seconds, jobs without any recorded run of their kind): the same model's mean, else the kind's mean."""
    total, unknown = 0.0, 0
    for job in jobs:
        same = recorded.get((job.kind, job.model["name"]))
        if not same:
            same = [s for (kind, _model), values in recorded.items() if kind == job.kind for s in values]
        if same:
            total += sum(same) / len(same)
        else:
            unknown += 1
    return total, unknown


def plan(grid: GridConfig, jobs: list[Job], log: Log) -> dict:
    """The dry run: jobs per kind, how many are done, and what the rest should cost."""
    done = {j.id for j in jobs if _safe_done(j)}
    pending = [j for j in jobs if j.id not in done]
    log(f"grid {grid.source}: {len(jobs)} job(s), {len(done)} done, {len(pending)} to run")
    log(f"results: {grid.results}   cache: {grid.cache_root}")
    for kind in KINDS:
        of_kind = [j for j in jobs if j.kind == kind]
        if of_kind:
            n_done = sum(j.id in done for j in of_kind)
            log(f"  {kind:<16} {len(of_kind):>4} job(s)  {n_done:>4} done  {len(of_kind) - n_done:>4} to run")
    seconds, unknown = estimate(pending, _recorded_seconds(grid))
    known = len(pending) - unknown
    log(f"estimated cost of the {known} job(s) with recorded timings of their kind: {seconds:.0f} s"
        + (f"; {unknown} job(s) have none yet" if unknown else ""))  # fmt: skip
    for job in pending:
        log(f"  to run: {job.id}")
    return {"jobs": len(jobs), "done": len(done), "pending": [j.id for j in pending], "estimate_s": seconds}


def _safe_done(job: Job) -> bool:
    # a dataset root that a prepare step has not written yet makes the job simply not done
    try:
        return is_done(job)
    except FmcacheError:
        return False


# -- executors -------------------------------------------------------------------------------------------------------


@dataclass
class GridOptions:
    dry_run: bool = False
    executor: str = "local"
    only: str | None = None
    results: Path | None = None
    cache_root: Path | None = None
    jobs: int = 1
    slurm_partition: str | None = None
    gpus_per_job: int = 1
    time_min: int = 240
    logs: Path | None = None
    submitit_cluster: str | None = None  # tests: "local" runs the submitit path without Slurm


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
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        for job in list(pending):
            if len(running) >= n:
                break
            if _ready(job, outcome):
                outcome.blocked.append(job.id)
                pending.remove(job)
                continue
            if any(d not in finished for d in job.deps if d in {j.id for j in jobs}):
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
            spec = logs / f"{_log_name(job)}.json"
            spec.write_text(json.dumps(_job_doc(job), default=str))
            handle = open(logs / f"{_log_name(job)}.log", "w")  # noqa: SIM115  (closed when the job ends)
            proc = subprocess.Popen([sys.executable, "-m", "fmcache.report.grid", str(spec)], env=env, stdout=handle,
                                    stderr=subprocess.STDOUT)  # fmt: skip
            running[job.id] = (proc, gpu, logs / f"{_log_name(job)}.log", handle)
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
        blocked = [j for j in remaining if any(d in outcome.failed or d in outcome.blocked for d in j.deps)]
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


def run_grid(config: Path, options: GridOptions, log: Log = print) -> dict:
    """Check the YAML and the data roots, expand, skip what is done, run the rest; raises if any job failed."""
    if options.executor not in ("local", "slurm"):
        raise FmcacheError(f"unknown --executor '{options.executor}'; use local or slurm")
    if options.jobs < 1:
        raise FmcacheError(f"--jobs must be at least 1, got {options.jobs}")
    if options.executor == "slurm" and not options.dry_run:
        import_submitit()  # before any data is prepared or job started
    grid = load_grid(config, options.results, options.cache_root)
    jobs = select(expand(grid), options.only)
    check_roots(grid, options.dry_run, log)
    if options.dry_run:
        return plan(grid, jobs, log)
    logs = Path(options.logs) if options.logs else grid.results / "grid_logs"
    start = time.perf_counter()
    if options.executor == "slurm":
        outcome = run_submitit(jobs, options, logs, log)
    elif options.jobs > 1:
        outcome = run_parallel(jobs, options.jobs, logs, log)
    else:
        outcome = run_local(jobs, log)
    seconds = time.perf_counter() - start
    log(f"{len(jobs)} job(s): {len(outcome.ran)} ran, {len(outcome.skipped)} already done, "
        f"{len(outcome.failed)} failed, {len(outcome.blocked)} blocked; {seconds:.1f} s")  # fmt: skip
    if outcome.failed or outcome.blocked:
        first = next(iter(outcome.failed.items()), ("", ""))
        raise FmcacheError(
            f"{len(outcome.failed)} job(s) failed and {len(outcome.blocked)} could not start; first: {first[0]}: "
            f"{first[1]}; rerun the same command to retry only those"
        )
    return {"jobs": len(jobs), "ran": outcome.ran, "skipped": outcome.skipped, "seconds": seconds}


def main(argv: list[str]) -> int:
    """``python -m fmcache.report.grid JOB.json``: one job in a fresh process (the ``--jobs N`` executor)."""
    doc = json.loads(Path(argv[0]).read_text())
    try:
        print(submitted_job(doc), flush=True)
    except FmcacheError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
