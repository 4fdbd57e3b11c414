"""``fmcache grid CONFIG --dry-run``: the plan before anything runs, grouped by the paper's tables and figures.

A dry run is how a user plans before downloading anything: it needs no data. A dataset root that is missing (or still
the config's ``/path/to/...`` placeholder) is planned from the official release's image count, with one line saying
so. Every job is listed under the paper outputs it feeds (:func:`fmcache.report.paper.outputs_of`, the same rule the
report uses to place its results), so a reader sees at once what reproduces Table 1, Fig. 4, and so on.

Then the cost (:func:`print_cost`, the model in :mod:`fmcache.grid.cost`): per job forward passes, FLOPs, bytes
written and read and the estimated time on a device (``--device-rate``: a preset, a FLOP/s number, or what
``fmcache calibrate`` measured), with the seed's online cost of the same results beside it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fmcache.errors import FmcacheError
from fmcache.grid.config import KINDS, GridConfig, Log, label
from fmcache.grid.cost import DataSize
from fmcache.grid.jobs import Job
from fmcache.report.paper import OUTPUTS, outputs_of

STAGE_ONE = "stage one"  # extraction jobs feed whatever reads their cache

# Where no root is at hand the official release is split by the loaders' own rules (:func:`_official_split`); the
# datasets' typical stored image size in megapixels (the decode cost): APTOS ~2400 × 1700 PNG, CBIS-DDSM full
# mammograms as PNG (~3000 × 4000, downsampled in the seed's lists: assumed 4 MPx), ISIC 2019 ~1024 × 768 JPEG,
# CheXpert-v1.0-small ~390 × 320 JPEG.
TYPICAL_MPX = {"aptos2019": 4.0, "cbis_ddsm": 4.0, "isic2019": 0.8, "chexpert": 0.125}
DIGITS_PX = 32  # prepare: digits writes 32 × 32 scans (fmcache.data.digits)


def _official_split(name: str, n: int) -> tuple[tuple[int, int, int], str]:
    from fmcache.data import aptos, chexpert, isic
    from fmcache.data.index import TEST, TRAIN, VAL, split_counts

    seed_holdout = {aptos.NAME: aptos.SEED_HOLDOUT, isic.NAME: isic.SEED_HOLDOUT}
    if name in seed_holdout:  # the seed's val_size: the held-out rows, halved into val and test
        hold = int(n * seed_holdout[name])
        return (n - hold, hold // 2, hold - hold // 2), ""
    if name == chexpert.NAME:  # the seed's split: the first int(0.2 n) + 15 rows held out, halved
        codes = chexpert.seed_split(n)
        return (int((codes == TRAIN).sum()), int((codes == VAL).sum()), int((codes == TEST).sum())), ""
    return split_counts(n, (0.8, 0.1, 0.1)), "split 80/10/10 assumed"


def _sample_mpx(paths, limit: int = 16) -> float | None:
    """Mean megapixels of up to ``limit`` images spread over the dataset (headers only)."""
    from PIL import Image

    step = max(1, len(paths) // limit)
    sizes = []
    for path in list(paths)[::step][:limit]:
        try:
            with Image.open(path) as image:
                sizes.append(image.size[0] * image.size[1] / 1e6)
        except (OSError, ValueError):
            continue
    return sum(sizes) / len(sizes) if sizes else None


def dataset_splits(grid: GridConfig, log: Log) -> dict[str, DataSize | None]:
    """Split sizes per dataset: counted where the root exists, else the official release's count split by the
    dataset's own rule (said in one line each); None where no count is known."""
    from fmcache.data.index import split_counts
    from fmcache.data.registry import DATASETS, load_dataset

    sizes: dict[str, DataSize | None] = {}
    for data in grid.datasets:
        name, root = data["name"], Path(data["root"])
        spec = DATASETS.get(name)
        official = getattr(spec, "official_images", None)
        classes = getattr(spec, "classes", None)
        limit = int(data["limit"]) if data.get("limit") else None
        size: DataSize | None = None
        if root.is_dir():
            options = {k: data[k] for k in ("split", "uncertain", "layout", "csv") if data.get(k) is not None}
            try:
                index = load_dataset(name, root, **options)
                counts = [int((index.split == code).sum()) for code in (0, 1, 2)]
                mpx = _sample_mpx(index.paths) or TYPICAL_MPX.get(name, 0.25)
                size = DataSize(*counts, index.num_classes, mpx)
            except FmcacheError as exc:
                log(
                    f"dataset {name}: {root} does not load ({str(exc).split(';')[0]}); planning from the official count"
                )
        elif data.get("prepare") == "digits":
            n = 10 * int(data.get("per_class") or 30)
            size = DataSize(*split_counts(n, (0.8, 0.1, 0.1)), 10, DIGITS_PX**2 / 1e6)
        if size is None:
            placeholder = str(root).startswith("/path/to") or "/path/to/" in str(root)
            why = "is still the placeholder" if placeholder else "does not exist"
            if official is None:
                log(f"dataset {name}: root {root} {why}; no official image count is known, so costs leave it out")
            else:
                counts, note = _official_split(name, official)
                log(f"dataset {name}: root {root} {why}; planning from the official release's {official:,} images"
                    + (f" ({note})" if note else ""))  # fmt: skip
                size = DataSize(*counts, classes or 2, TYPICAL_MPX.get(name, 0.25), note)
        if size is not None and limit is not None:
            size = DataSize(min(size.train, limit), min(size.val, limit), min(size.test, limit), size.classes,
                            size.mpx, size.note)  # fmt: skip
        sizes[name] = size
    return sizes


def paper_outputs(job: Job) -> list[str]:
    """The paper outputs a job feeds (extract jobs: :data:`STAGE_ONE`)."""
    if job.kind == "extract":
        return [STAGE_ONE]
    options = dict(job.options)
    if job.kind == "cka":
        if job.model_b is not None:
            options["model_b"], options["across_models"] = job.model_b["name"], True
        if options.get("after_finetune"):
            options["same_model"] = True
    img_size = job.model.get("img_size")
    return outputs_of(job.kind, options, job.model["name"], int(img_size) if img_size else None)


def describe(grid: GridConfig, jobs: list[Job], done: set[str], log: Log) -> dict[str, list[str]]:
    """Log the jobs per kind and per paper output; returns {output: job ids}."""
    log(f"grid {grid.source}: {len(jobs)} job(s), {len(done)} done, {len(jobs) - len(done)} to run")
    log(f"results: {grid.results}   cache: {grid.cache_root}")
    for kind in KINDS:
        of_kind = [j for j in jobs if j.kind == kind]
        if of_kind:
            n_done = sum(j.id in done for j in of_kind)
            log(f"  {kind:<16} {len(of_kind):>4} job(s)  {n_done:>4} done  {len(of_kind) - n_done:>4} to run")
    groups: dict[str, list[str]] = {}
    for job in jobs:
        for output in paper_outputs(job) or ["supplementary"]:
            groups.setdefault(output, []).append(job.id)
    log("by the paper's tables and figures:")
    for key in [STAGE_ONE, *OUTPUTS, "supplementary"]:
        ids = groups.get(key, [])
        title = f"{OUTPUTS[key].label}: {OUTPUTS[key].caption}" if key in OUTPUTS else key
        if not ids:
            if key in OUTPUTS:
                log(f"  {title}: no job (the config runs nothing for it)")
            continue
        n_done = sum(i in done for i in ids)
        models = sorted({i.rsplit("/", 1)[-1] for i in ids})
        shown = ", ".join(models[:6]) + (f" and {len(models) - 6} more" if len(models) > 6 else "")
        log(f"  {title}: {len(ids)} job(s), {n_done} done; {shown}")
    return groups


# -- the cost ----------------------------------------------------------------------------------------------------------

ROWS_PER_JOB = 60  # more pending jobs than this: one row per kind and model (summed over datasets and variants)


def _hours(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.2g}"


def _row(title: str, n: int, ours, seed, width: int) -> str:
    from fmcache.grid.cost import count_text, duration, si

    seed_cells = f"{count_text(seed.forwards):>8} {duration(seed.seconds):>9}" if seed.seconds else f"{'-':>8} {'-':>9}"
    return (f"  {title:<{width}} {n:>4} {count_text(ours.forwards):>8} {si(ours.flops, 'FLOP'):>11} "
            f"{si(ours.written, 'B'):>9} {si(ours.read, 'B'):>9} {duration(ours.seconds):>9}   {seed_cells}")  # fmt: skip


def print_cost(jobs: list[Job], splits: dict[str, DataSize | None], log: Log, device_rate: str | None = None) -> dict:
    """Log the cost of ``jobs`` per job (or per kind and model) and in total, the seed's beside it; returns it.

    ``device_rate``: ``--device-rate`` (None: this machine's calibration, else the H200 preset)."""
    from fmcache.grid.cost import Cost, Estimator, count_text, duration, si
    from fmcache.grid.flops import Counts
    from fmcache.grid.rates import resolve_rates

    rates = resolve_rates(device_rate, log)
    counts = Counts()
    estimator = Estimator(rates, splits, counts)
    costs, unknown = {}, {}
    for job in jobs:
        try:
            costs[job.id] = estimator.job(job)
        except Exception as exc:  # a model that cannot be built or counted (or a dataset without a size): said once
            why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            unknown.setdefault(f"{job.model['name']} on {job.dataset['name']}", why)
    counts.save()
    if not jobs:
        return {}
    log(f"cost of the {len(costs)} job(s) to run on {rates.describe()}:")
    for what, why in unknown.items():
        log(f"  not estimated: {what}: {why}")
    if not costs:
        return {"rates": rates.describe(), "jobs": {}}
    per_job = len(costs) <= ROWS_PER_JOB
    groups: dict[str, list[str]] = {}
    for job in jobs:
        if job.id in costs:
            key = job.id if per_job else f"{job.kind.split('#')[0]} {label(job.model)}"
            groups.setdefault(key, []).append(job.id)
    width = max(24, *(len(k) for k in groups))
    log(f"  {'job' if per_job else 'kind, model (all datasets and variants)':<{width}} {'jobs':>4} {'forwards':>8} "
        f"{'FLOPs':>11} {'written':>9} {'read':>9} {'time':>9}   {'seed: fwd':>8} {'time':>9}")  # fmt: skip

    def total(ids) -> tuple[Cost, Cost]:
        ours, seed = Cost(), Cost()
        for i in ids:
            ours, seed = ours + costs[i].ours, seed + costs[i].seed
        return ours, seed

    for key, ids in groups.items():
        log(_row(key, len(ids), *total(ids), width))
    ours, seed = total(costs)
    for title, key in (("by dataset", lambda j: j.dataset["name"]), ("by kind", lambda j: j.kind.split("#")[0])):
        log(f"  {title}:")
        parts: dict[str, list[str]] = {}
        for job in jobs:
            if job.id in costs:
                parts.setdefault(key(job), []).append(job.id)
        for name, ids in parts.items():
            log(_row(name, len(ids), *total(ids), width))
    log(_row("total", len(costs), ours, seed, width))
    hours, seed_hours = ours.seconds / 3600, seed.seconds / 3600
    log(f"total: {count_text(ours.forwards)} foundation forwards, {si(ours.flops, 'FLOP')}, {si(ours.written, 'B')} "
        f"written, {si(ours.read, 'B')} read; about {_hours(ours.seconds)} device-hours on {rates.label} "
        f"({duration(ours.seconds)} one job after another)")  # fmt: skip
    saving = f", {seed.seconds / ours.seconds:.1f}x fmcache's" if ours.seconds else ""
    log(f"the seed's online protocol for the same results: {count_text(seed.forwards)} foundation forwards, "
        f"{si(seed.flops, 'FLOP')}; about {_hours(seed.seconds)} device-hours{saving}")  # fmt: skip
    frozen = [j.id for j in jobs if j.id in costs and not j.kind.startswith("finetune")]
    mine, theirs = total(frozen)
    if frozen and len(frozen) < len(costs):
        ratio = f" ({theirs.seconds / mine.seconds:.0f}x)" if mine.seconds else ""
        log(f"  without fine-tuning (the same in both), what the cache changes: {_hours(mine.seconds)} vs the "
            f"seed's {_hours(theirs.seconds)} device-hours{ratio}")  # fmt: skip
    bound = [i for i, c in costs.items() if c.data_bound]
    if bound and ours.seconds:
        share = sum(costs[i].ours.seconds for i in bound) / ours.seconds
        log(f"  {len(bound)} job(s), {share:.0%} of that time, wait on image decoding with their `workers` (a "
            "protocol's default is 2): more workers per GPU shorten them")  # fmt: skip
    notes = sorted({s.note for s in splits.values() if s is not None and s.note})
    log("  assumptions: training = 3x the forward of what trains; test scored at ~1 + 2 ln(epochs) new best epochs; "
        "the seed recomputes the frozen foundation every step (train with augmentation), val every epoch, test once, "
        "and the k-NN bank for every k; fine-tuning costs the same in both; image decode from the datasets' typical "
        "image sizes (README \"Scale\")" + (f"; {'; '.join(notes)}" if notes else ""))  # fmt: skip
    return {
        "rates": rates.describe(),
        "jobs": {i: {"ours": asdict(c.ours), "seed": asdict(c.seed)} for i, c in costs.items()},
        "total": asdict(ours),
        "seed_total": asdict(seed),
        "hours": hours,
        "seed_hours": seed_hours,
        "frozen_hours": mine.seconds / 3600,
        "frozen_seed_hours": theirs.seconds / 3600,
        "data_bound": bound,
        "not_estimated": unknown,
    }
