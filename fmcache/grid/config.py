"""The grid's input: a YAML experiment checked against the protocols' own specs, and the command line's options.

Every unknown key is refused with one line naming it and the valid ones; a protocol variant may set exactly its
spec's fields (:mod:`fmcache.protocols`: ``KnnSpec``, ``ProbeSpec``, ``FinetuneSpec``, ...) less what the grid fixes
itself (:data:`GRID_OWNED`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fmcache.config import load_config
from fmcache.errors import FmcacheError
from fmcache.extract.spec import ExtractSpec
from fmcache.protocols import get_protocol, names
from fmcache.runners import spec_class

EXTRACT = "extract"  # the job kind of stage one; every other kind is a protocol
TOP_KEYS = ("results", "cache_root", "models", "datasets", "extract", "protocols")
# label: the model's name in job ids and --only, when one registry model runs twice (e.g. at 224 and 1024 px)
MODEL_KEYS = ("name", "label", "weights", "random_init", "img_size", "arch_overrides", "tokens")
DATASET_KEYS = ("name", "root", "split", "uncertain", "layout", "csv", "prepare", "per_class", "limit")
DATASET_OPTIONS = ("split", "uncertain", "layout", "csv")
PREPARERS = ("digits",)
# options every protocol variant may carry besides its runner's: which models it applies to
VARIANT_KEYS = ("models",)
# fixed by the grid itself, so a YAML may not set them inside extract: or a protocol
GRID_OWNED = {
    "dataset",
    "data_root",
    "model",
    "weights",
    "random_init",
    "cache_root",
    "dataset_options",
    "arch_overrides",
    "out",
    "cache",
    "cache_b",
    "head",
    "from_cache",
    "img_size",
    "result",
    "source_cache",
}
# a protocol that applies another result's heads (``applies``, e.g. transfer) names in the grid which result and
# which caches: ``from`` (the protocol whose jobs made the heads, ``kind`` or ``kind#n``), ``source`` and
# ``target`` (datasets of this grid), and optionally corrupted target caches (``corrupt``: names, or ``all`` of the
# target's modality; ``severities``: 1-5, default all)
APPLY_KEYS = ("from", "source", "target", "corrupt", "severities")

Log = Callable[[str], None]


def _unknown(keys, valid, where: str, source: Path) -> None:
    bad = sorted(set(keys) - set(valid))
    if bad:
        raise FmcacheError(f"{source}: unknown key(s) {', '.join(bad)} in {where}; valid: {', '.join(sorted(valid))}")


def _runner_options(kind: str) -> set[str]:
    """The options a protocol variant may set: its spec's fields, less what the grid fixes (and CKA's pairing)."""
    protocol = get_protocol(kind)
    fields = {f.name for f in dataclasses.fields(spec_class(kind))} - GRID_OWNED
    if protocol.reads == "images":
        fields -= {"resume"}  # a fine-tune job always resumes its runs; --no-resume is the CLI's
    # a pairing protocol (CKA): the last layers of every pair of models (Fig. 8), or a model against itself after a
    # fine-tune job of the grid (Fig. 7; the value names that protocol, e.g. finetune_linear or finetune_linear#1)
    if protocol.applies:
        return fields | set(APPLY_KEYS)
    return fields | {"across_models", "after_finetune"} if protocol.pairs else fields


def _extract_options() -> set[str]:
    return ({f.name for f in dataclasses.fields(ExtractSpec)} - GRID_OWNED) | {"tokens"}


def _resolve(path: str | Path, base: Path) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else (base / path).resolve()


def label(model: dict) -> str:
    """A model entry's name in job ids and ``--only``: its ``label`` when one model is listed twice."""
    return str(model.get("label") or model["name"])


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
        _unknown([kind], names(), "protocols", path)
        variants = [variants or {}] if not isinstance(variants, list) else variants
        allowed = _runner_options(kind) | set(VARIANT_KEYS)
        protocols[kind] = []
        for variant in variants:
            variant = {str(k).replace("-", "_"): v for k, v in (variant or {}).items()}
            _unknown(variant, allowed, f"protocols.{kind}", path)
            protocols[kind].append(variant)
    labels = [label(m) for m in checked_models]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise FmcacheError(
            f"{path}: model {repeated[0]} is listed twice; give each entry its own label: (e.g. "
            f"label: {repeated[0]}@1024)"
        )
    model_names = set(labels)  # protocols choose models by label (the name, unless an entry sets one)
    for kind, variants in protocols.items():
        for variant in variants:
            stray = set(variant.get("models") or []) - model_names
            if stray:
                raise FmcacheError(f"{path}: protocols.{kind} names model(s) {', '.join(sorted(stray))} not in models:")
    for kind, variants in protocols.items():
        if get_protocol(kind).applies:
            for variant in variants:
                _check_applied(path, kind, variant, protocols, checked_datasets)
    return GridConfig(
        source=path,
        results=Path(results) if results is not None else _resolve(raw.get("results", "results"), base),
        cache_root=Path(cache_root) if cache_root is not None else _resolve(raw.get("cache_root", "cache"), base),
        models=checked_models,
        datasets=checked_datasets,
        extract=extract,
        protocols=protocols,
    )


def makes_heads(kind: str) -> bool:
    """Whether a protocol's results keep heads another protocol can apply (k-NN's bank, the probes' heads)."""
    protocol = get_protocol(kind)
    return protocol.reads != "images" and protocol.summary != "matrix" and not protocol.applies


def corruptions_of(variant: dict, target: str) -> list[str]:
    """The ``NAME:SEVERITY`` target caches an applying variant asks for (checked against the target's modality)."""
    from fmcache.data.corruptions import (  # deferred: torch, torchvision (the data package)
        SEVERITIES,
        corruptions_for,
        parse_corruption,
    )

    names = variant.get("corrupt")
    if not names:
        return []
    names = corruptions_for(target) if names == "all" else [names] if isinstance(names, str) else list(names)
    severities = variant.get("severities") or list(SEVERITIES)
    severities = [severities] if isinstance(severities, int) else list(severities)
    wanted = [f"{name}:{severity}" for name in names for severity in severities]
    for text in wanted:
        parse_corruption(text, target)  # one line naming a name or severity the target's modality lacks
    return wanted


def _check_applied(path: Path, kind: str, variant: dict, protocols: dict, datasets: list[dict]) -> None:
    """An applying variant names a heads-making protocol of this grid, two of its datasets, and valid corruptions."""
    missing = [k for k in ("from", "source", "target") if not variant.get(k)]
    if missing:
        raise FmcacheError(
            f"{path}: protocols.{kind} needs {', '.join(missing)}: from (the protocol whose heads it applies, e.g. "
            "probe_linear), source and target (datasets of this grid)"
        )
    ref = str(variant["from"])
    base, _, number = ref.partition("#")
    makers = [k for k in protocols if makes_heads(k)]
    made = protocols.get(base)
    if made is None or not makes_heads(base) or (number and not number.isdigit()):
        raise FmcacheError(
            f"{path}: protocols.{kind} from: {ref} is not a protocol of this grid that keeps heads; "
            f"valid: {', '.join(makers) or 'none (add knn or probe_linear)'}"
        )
    if (len(made) > 1) != bool(number) or (number and int(number) >= len(made)):
        valid = [base] if len(made) == 1 else [f"{base}#{i}" for i in range(len(made))]
        raise FmcacheError(f"{path}: protocols.{kind} from: {ref}; valid: {', '.join(valid)}")
    names = [d["name"] for d in datasets]
    for key in ("source", "target"):
        if variant[key] not in names:
            raise FmcacheError(
                f"{path}: protocols.{kind} {key}: {variant[key]} is not a dataset of this grid ({', '.join(names)})"
            )
    corruptions_of(variant, str(variant["target"]))


@dataclass
class GridOptions:
    dry_run: bool = False
    executor: str = "local"
    only: str | None = None
    results: Path | None = None
    cache_root: Path | None = None
    jobs: int = 1
    slurm_partition: str | None = None
    gpus_per_job: int | None = None  # None: 1 where the cluster has GPU gres (sinfo -o %G), else 0
    time_min: int = 240
    logs: Path | None = None
    wait: bool = False  # a job running in another grid: wait for it (else report it and skip it)
    slurm_account: str | None = None
    slurm_qos: str | None = None
    slurm_options: dict[str, str | bool] = dataclasses.field(default_factory=dict)  # more sbatch flags, KEY=VALUE
    poll_s: float = 1.0  # Slurm: first interval between state polls (it grows to 30 s while nothing changes)
    device_rate: str | None = None  # --dry-run: --device-rate (None: this machine's calibration, else h200)


# sbatch flags the grid sets itself; --slurm-option may not override them
GRID_SBATCH = ("dependency", "job-name", "output", "error", "array", "open-mode", "signal", "wckey")


def parse_slurm_options(items: list[str] | None) -> dict[str, str | bool]:
    """``--slurm-option KEY=VALUE`` (repeatable; a bare KEY is a flag) → sbatch's ``--KEY=VALUE``."""
    options: dict[str, str | bool] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not key:
            raise FmcacheError(f"--slurm-option '{item}': give KEY=VALUE, e.g. --slurm-option mem=16G")
        if key in GRID_SBATCH:
            raise FmcacheError(f"--slurm-option {key}: the grid sets --{key} itself; leave it out")
        options[key] = value.strip() if sep else True
    return options
