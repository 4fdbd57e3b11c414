"""The grid's jobs: a checked YAML expanded into extract and protocol jobs with their dependencies, and ``--only``.

One ``extract`` job per (model, dataset, extraction settings); the frozen protocols of that pair read its cache and
depend on it; fine-tuning runs from images and comes last.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from fmcache.errors import FmcacheError
from fmcache.grid.config import VARIANT_KEYS, GridConfig


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
