"""The grid's jobs: a checked YAML expanded into extract and protocol jobs with their dependencies, and ``--only``.

One ``extract`` job per (model, dataset, extraction settings); the frozen protocols of that pair read its cache and
depend on it; fine-tuning runs from images and comes last.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from fmcache.errors import FmcacheError
from fmcache.grid.config import EXTRACT, VARIANT_KEYS, GridConfig, label
from fmcache.protocols import get_protocol


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

    @property
    def is_extract(self) -> bool:
        return self.kind == EXTRACT

    @property
    def reads_images(self) -> bool:
        """A fine-tune job: it reads the images, not an extract job's cache."""
        return not self.is_extract and get_protocol(self.kind).reads == "images"

    def digest(self) -> str:
        """What makes the job's numbers: never the folders, so --results elsewhere keeps its own ledger."""
        doc = {
            "kind": self.kind,
            "dataset": self.dataset,
            "model": self.model,
            "options": self.options,
            "extract": self.extract,
            "model_b": self.model_b,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _extract_settings(grid: GridConfig, model: dict) -> dict:
    settings = dict(grid.extract)
    if model.get("tokens") is not None:  # a model may cache other token layers than the grid's default
        settings["tokens"] = str(model["tokens"])
    return settings


def expand(grid: GridConfig) -> list[Job]:
    """Every job of the grid in dependency order: extracts, then the protocols reading them, then fine-tuning."""
    common = {"results": str(grid.results), "cache_root": str(grid.cache_root)}
    # a model gets an extract job only when a protocol that reads the cache chooses it (a model listed only for a
    # fine-tune, e.g. Table 3's 1024 px entries, needs no cache)
    reads_cache = {
        label(m)
        for kind, variants in grid.protocols.items()
        if get_protocol(kind).reads != "images"
        for v in variants
        for m in grid.models
        if not v.get("models") or label(m) in v["models"]
    }
    jobs: list[Job] = []
    for data in grid.datasets:
        extract_ids: dict[str, str] = {}
        for model in grid.models:
            if label(model) in reads_cache:
                job_id = f"extract/{data['name']}/{label(model)}"
                settings = _extract_settings(grid, model)
                jobs.append(Job(job_id, EXTRACT, data, model, extract=settings, **common))
                extract_ids[label(model)] = job_id
        for kind, variants in grid.protocols.items():
            protocol = get_protocol(kind)
            for n, variant in enumerate(variants):
                options = {k: v for k, v in variant.items() if k not in VARIANT_KEYS}
                across = bool(options.pop("across_models", False)) if protocol.pairs else False
                # by label: a model listed twice (e.g. at 224 and 1024 px) is chosen per entry
                chosen = [m for m in grid.models if not variant.get("models") or label(m) in variant["models"]]
                suffix = f"#{n}" if len(variants) > 1 else ""
                for model in chosen:
                    job_id = f"{kind}{suffix}/{data['name']}/{label(model)}"
                    if protocol.reads == "images":
                        jobs.append(Job(job_id, kind, data, model, options, **common))
                        continue
                    deps, job_options = [extract_ids[label(model)]], options
                    if protocol.pairs and options.get("after_finetune"):
                        # Fig. 7: the model against its own fine-tuned export, once the fine-tune job has run
                        ref = str(options["after_finetune"])
                        _check_finetune_ref(grid, ref)
                        job_options = {**options, "after_finetune": f"{ref}/{data['name']}/{label(model)}"}
                        deps.append(job_options["after_finetune"])
                    jobs.append(
                        Job(job_id, kind, data, model, job_options, deps, _extract_settings(grid, model), **common)
                    )
                if across:  # the last layer of every pair of models (paper Fig. 8)
                    pair_options = {**options, "layers": "last", "layers_b": "last"}
                    for i, a in enumerate(chosen):
                        for b in chosen[i + 1 :]:
                            if a["name"] == b["name"]:  # one model at two sizes: not a pair of models
                                continue
                            jobs.append(
                                Job(
                                    f"{kind}{suffix}/{data['name']}/{label(a)}_x_{label(b)}",
                                    kind,
                                    data,
                                    a,
                                    pair_options,
                                    [extract_ids[label(a)], extract_ids[label(b)]],
                                    _extract_settings(grid, a),
                                    model_b=b,
                                    **common,
                                )
                            )
    # fine-tuning last: frozen results come early, the costliest runs at the end; a CKA after fine-tuning after both
    jobs.sort(
        key=lambda j: (j.reads_images or bool(j.options.get("after_finetune")), bool(j.options.get("after_finetune")))
    )
    return jobs


def _check_finetune_ref(grid: GridConfig, ref: str) -> None:
    kind, _, number = ref.partition("#")
    variants = grid.protocols.get(kind)
    if not variants or not get_protocol(kind).trains_foundation or (number and not number.isdigit()):
        raise FmcacheError(f"{grid.source}: after_finetune: {ref} names no finetune protocol of this grid")
    if (len(variants) > 1) != bool(number) or (number and int(number) >= len(variants)):
        valid = [kind] if len(variants) == 1 else [f"{kind}#{i}" for i in range(len(variants))]
        raise FmcacheError(f"{grid.source}: after_finetune: {ref}; valid: {', '.join(valid)}")


def select(jobs: list[Job], only: str | None) -> list[Job]:
    """Keep the jobs whose kind, dataset and model match ``--only`` (each given category filters), plus their deps."""
    if not only:
        return jobs
    tokens = {t.strip() for t in only.split(",") if t.strip()}
    kinds = {j.kind for j in jobs}
    datasets = {j.dataset["name"] for j in jobs}
    models = {label(j.model) for j in jobs} | {label(j.model_b) for j in jobs if j.model_b}
    models |= {j.model["name"] for j in jobs}  # --only resnet50 keeps every entry of that model
    unknown = tokens - kinds - datasets - models
    if unknown:
        valid = sorted(kinds) + sorted(datasets) + sorted(models)
        raise FmcacheError(f"--only: unknown {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")

    def keep(job: Job) -> bool:
        names = {label(job.model), job.model["name"]} | ({label(job.model_b)} if job.model_b else set())
        return (
            (not tokens & kinds or job.kind in tokens)
            and (not tokens & datasets or job.dataset["name"] in tokens)
            and (not tokens & models or bool(names & tokens))
        )

    kept = {j.id for j in jobs if keep(j)}
    for job in jobs:  # a reader needs its cache: its extract comes along (and is skipped when complete)
        if job.id in kept:
            kept.update(job.deps)
    return [j for j in jobs if j.id in kept]
