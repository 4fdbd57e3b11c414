"""The grid's jobs: a checked YAML expanded into extract and protocol jobs with their dependencies, and ``--only``.

One ``extract`` job per (model, dataset, extraction settings); the frozen protocols of that pair read its cache and
depend on it; fine-tuning runs from images and comes last. A fine-tune variant with ``pixels: on`` reads a pixel cache
(``fmcache pixels``): one ``pixels`` job per (dataset, image size) writes it first, and those fine-tunes (and the
extracts of the same size that draw ``views``, which then decode nothing) depend on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from fmcache.errors import FmcacheError
from fmcache.grid.config import EXTRACT, VARIANT_KEYS, GridConfig, corruptions_of, label
from fmcache.protocols import get_protocol

PIXELS = "pixels"  # the job kind of a pixel cache (fmcache pixels), like an extract a stage-one job


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
    def is_pixels(self) -> bool:
        """A pixel cache's job (``model`` holds its ``img_size``)."""
        return self.kind == PIXELS

    @property
    def is_stage_one(self) -> bool:
        """An extract or a pixel job: it writes a cache, not a result folder."""
        return self.is_extract or self.is_pixels

    @property
    def reads_images(self) -> bool:
        """A fine-tune job: it reads the images, not an extract job's cache."""
        return not self.is_stage_one and get_protocol(self.kind).reads == "images"

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
        if get_protocol(kind).reads != "images" and not get_protocol(kind).applies
        for v in variants
        for m in grid.models
        if not v.get("models") or label(m) in v["models"]
    }
    applied = _applied_caches(grid)  # (dataset, model label) → the target caches applying jobs read
    jobs: list[Job] = []
    extract_ids: dict[tuple[str, str, str | None], str] = {}  # (dataset, model label, corruption) → extract job
    for data in grid.datasets:
        pixel_ids = _pixel_jobs(grid, data, common, jobs)  # img_size → the pixel job that writes its crops
        # an evaluation-only set (an external one, all test) is read by applying jobs alone: it has no train split
        trains = not evaluation_only(data)
        for model in grid.models:
            wanted = applied.get((data["name"], label(model)), set())
            if (trains and label(model) in reads_cache) or None in wanted:
                job_id = f"extract/{data['name']}/{label(model)}"
                settings = _extract_settings(grid, model)
                views = pixel_ids.get(_img_size(model)) if settings.get("views") and trains else None
                if not trains:
                    settings.pop("views", None)  # views are train images: an evaluation-only set has none
                jobs.append(
                    Job(job_id, EXTRACT, data, model, extract=settings, deps=[views] if views else [], **common)
                )
                extract_ids[(data["name"], label(model), None)] = job_id
            for corruption in sorted(c for c in wanted if c is not None):
                # a test-split cache of corrupted images (extract --corrupt), keyed like any cache
                job_id = f"extract/{data['name']}/{label(model)}@{corruption}"
                settings = {k: v for k, v in _extract_settings(grid, model).items() if k != "views"}
                jobs.append(Job(job_id, EXTRACT, data, model, extract={**settings, "corrupt": corruption}, **common))
                extract_ids[(data["name"], label(model), corruption)] = job_id
        if not trains:
            continue
        for kind, variants in grid.protocols.items():
            protocol = get_protocol(kind)
            if protocol.applies:
                continue
            for n, variant in enumerate(variants):
                options = {k: v for k, v in variant.items() if k not in VARIANT_KEYS}
                across = bool(options.pop("across_models", False)) if protocol.pairs else False
                # by label: a model listed twice (e.g. at 224 and 1024 px) is chosen per entry
                chosen = [m for m in grid.models if not variant.get("models") or label(m) in variant["models"]]
                suffix = f"#{n}" if len(variants) > 1 else ""
                for model in chosen:
                    job_id = f"{kind}{suffix}/{data['name']}/{label(model)}"
                    if protocol.reads == "images":
                        pixels = pixel_ids.get(_img_size(model)) if _reads_pixels(options) else None
                        jobs.append(Job(job_id, kind, data, model, options, [pixels] if pixels else [], **common))
                        continue
                    deps, job_options = [extract_ids[(data["name"], label(model), None)]], options
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
                                    [
                                        extract_ids[(data["name"], label(a), None)],
                                        extract_ids[(data["name"], label(b), None)],
                                    ],
                                    _extract_settings(grid, a),
                                    model_b=b,
                                    **common,
                                )
                            )
    jobs += _apply_jobs(grid, jobs, extract_ids, common)
    # fine-tuning last: frozen results come early, the costliest runs at the end; a CKA after fine-tuning after both
    jobs.sort(
        key=lambda j: (j.reads_images or bool(j.options.get("after_finetune")), bool(j.options.get("after_finetune")))
    )
    return jobs


def evaluation_only(data: dict) -> bool:
    """An external validation set on its default split: every sample is test, so no protocol trains on it."""
    from fmcache.data.registry import DATASETS  # deferred: torch, torchvision (the data package)

    spec = DATASETS.get(data["name"])
    return bool(spec is not None and spec.external and data.get("split") in (None, "external"))


def _chosen(grid: GridConfig, variant: dict) -> list[dict]:
    return [m for m in grid.models if not variant.get("models") or label(m) in variant["models"]]


def _applied_caches(grid: GridConfig) -> dict[tuple[str, str], set[str | None]]:
    """(target dataset, model label) → the caches applying variants read: None (clean) and ``NAME:SEVERITY``."""
    wanted: dict[tuple[str, str], set[str | None]] = {}
    for kind, variants in grid.protocols.items():
        if not get_protocol(kind).applies:
            continue
        for variant in variants:
            target = str(variant["target"])
            caches = corruptions_of(variant, target) or [None]
            for model in _chosen(grid, variant):
                wanted.setdefault((target, label(model)), set()).update(caches)
    return wanted


def _apply_jobs(
    grid: GridConfig, jobs: list[Job], extract_ids: dict[tuple[str, str, str | None], str], common: dict
) -> list[Job]:
    """One job per applying variant × model × target cache: after the job that made the heads (``from`` on
    ``source``) and the target's extract."""
    made = {j.id for j in jobs}
    datasets = {d["name"]: d for d in grid.datasets}
    out: list[Job] = []
    for kind, variants in grid.protocols.items():
        if not get_protocol(kind).applies:
            continue
        for n, variant in enumerate(variants):
            suffix = f"#{n}" if len(variants) > 1 else ""
            source, target = str(variant["source"]), str(variant["target"])
            options = {k: v for k, v in variant.items() if k not in (*VARIANT_KEYS, "corrupt", "severities")}
            for model in _chosen(grid, variant):
                heads = f"{variant['from']}/{source}/{label(model)}"
                if heads not in made:
                    raise FmcacheError(
                        f"{grid.source}: protocols.{kind}{suffix} applies {heads}, which this grid does not run "
                        f"(is {source} evaluation-only, or does {variant['from']} leave out {label(model)}?)"
                    )
                for corruption in corruptions_of(variant, target) or [None]:
                    tag = f"@{corruption}" if corruption else ""
                    settings = {k: v for k, v in _extract_settings(grid, model).items() if k != "views"}
                    if corruption:
                        settings["corrupt"] = corruption
                    elif not evaluation_only(datasets[target]):
                        settings = _extract_settings(grid, model)  # the same cache the target's own jobs read
                    out.append(
                        Job(
                            f"{kind}{suffix}/{target}/{label(model)}{tag}",
                            kind,
                            datasets[target],
                            model,
                            {**options, "from_job": heads},
                            [heads, extract_ids[(target, label(model), corruption)]],
                            settings,
                            **common,
                        )
                    )
    return out


def _reads_pixels(options: dict) -> bool:
    """A fine-tune variant that reads a pixel cache and needs the grid to write it (``pixels: on``)."""
    return options.get("pixels") in ("on", True)  # YAML 1.1 reads a bare on as true


def _img_size(model: dict) -> int:
    from fmcache.models.registry import get_spec  # deferred: torch (the registry package builds models)

    return int(model.get("img_size") or get_spec(model["name"]).default_img_size)


def _pixel_jobs(grid: GridConfig, data: dict, common: dict, jobs: list[Job]) -> dict[int, str]:
    """One pixel job per image size that a ``pixels: on`` fine-tune of this dataset reads; appended to ``jobs``."""
    sizes = sorted(
        {
            _img_size(m)
            for kind, variants in grid.protocols.items()
            if get_protocol(kind).reads == "images"
            for v in variants
            if _reads_pixels(v)
            for m in grid.models
            if not v.get("models") or label(m) in v["models"]
        }
    )
    ids = {}
    workers = {"workers": grid.extract["workers"]} if grid.extract.get("workers") is not None else {}
    for size in sizes:
        job_id = f"{PIXELS}/{data['name']}/{size}px"
        model = {"name": PIXELS, "label": f"{size}px", "img_size": size}
        jobs.append(Job(job_id, PIXELS, data, model, workers, **common))  # decoding workers: the extracts'

        ids[size] = job_id
    return ids


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
    by_id = {j.id: j for j in jobs}
    pending = list(kept)
    while pending:  # a reader needs its cache, an applying job its heads' job: every dependency comes along
        for dep in by_id[pending.pop()].deps:  # (and is skipped when already done)
            if dep not in kept and dep in by_id:
                kept.add(dep)
                pending.append(dep)
    return [j for j in jobs if j.id in kept]
