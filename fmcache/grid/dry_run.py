"""``fmcache grid CONFIG --dry-run``: the plan before anything runs, grouped by the paper's tables and figures.

A dry run is how a user plans before downloading anything: it needs no data. A dataset root that is missing (or still
the config's ``/path/to/...`` placeholder) is planned from the official release's image count, with one line saying
so. Every job is listed under the paper outputs it feeds (:func:`fmcache.report.paper.outputs_of`, the same rule the
report uses to place its results), so a reader sees at once what reproduces Table 1, Fig. 4, and so on.

Every job to run is checked as the run checks it: its spec is built by the run's own function
(:func:`fmcache.grid.run.spec_of`, with a placeholder for the cache it will read), so a value the run would refuse
(``epochs: -3``, an unknown choice) is one ``refused:`` line naming the job and the reason; a refused job is not priced,
and the dry run then exits 2: a plan that says "this grid cannot run" is not a success.

Then the cost (:func:`print_cost`, the model in :mod:`fmcache.cost.estimate`): per job forward passes, FLOPs, bytes
written and read and the estimated time on a device (``--device-rate``: a preset, a FLOP/s number, or what
``fmcache calibrate`` measured; a damaged calibration is one error line naming the file), with the seed's online cost
of the same results beside it. Every run a job does is priced: one per label-efficiency subset (on its own train
size; the whole split once), and a LoRA fine-tune with its adapters, not the whole foundation, as what trains and
what its checkpoints hold.
"""

from __future__ import annotations

from dataclasses import asdict

from fmcache.cost.counting import Counts
from fmcache.cost.estimate import Cost, DataSize, Estimator, estimate_jobs
from fmcache.cost.rates import resolve_rates
from fmcache.cost.text import count_text, duration, si
from fmcache.grid.config import EXTRACT, GridConfig, Log, label
from fmcache.grid.jobs import PIXELS, Job
from fmcache.protocols import get_protocol, names
from fmcache.report.paper import OUTPUTS, outputs_of

STAGE_ONE = "stage one"  # extraction jobs feed whatever reads their cache


def paper_outputs(job: Job) -> list[str]:
    """The paper outputs a job feeds (extract jobs: :data:`STAGE_ONE`)."""
    if job.is_stage_one:
        return [STAGE_ONE]
    protocol = get_protocol(job.kind)
    options = dict(job.options)
    if protocol.pairs:
        if job.model_b is not None:
            options["model_b"], options["across_models"] = job.model_b["name"], True
        if options.get("after_finetune"):
            options["same_model"] = True
    img_size = job.model.get("img_size")
    return outputs_of(protocol, options, job.model["name"], int(img_size) if img_size else None)


# what the report shows beyond the paper's outputs: an applying job's section (report "External validation",
# "Corruption robustness"), or a supplementary table
BEYOND = ("external validation", "corruption robustness", "supplementary")


def _beyond_the_paper(job: Job) -> str:
    if job.is_stage_one or not get_protocol(job.kind).applies:
        return "supplementary"
    return "corruption robustness" if job.extract.get("corrupt") else "external validation"


def describe(grid: GridConfig, jobs: list[Job], done: set[str], log: Log) -> dict[str, list[str]]:
    """Log the jobs per kind and per paper output; returns {output: job ids}."""
    log(f"grid {grid.source}: {len(jobs)} job(s), {len(done)} done, {len(jobs) - len(done)} to run")
    log(f"results: {grid.results}   cache: {grid.cache_root}")
    for kind in (PIXELS, EXTRACT, *names()):
        of_kind = [j for j in jobs if j.kind == kind]
        if of_kind:
            n_done = sum(j.id in done for j in of_kind)
            log(f"  {kind:<16} {len(of_kind):>4} job(s)  {n_done:>4} done  {len(of_kind) - n_done:>4} to run")
    groups: dict[str, list[str]] = {}
    for job in jobs:
        for output in paper_outputs(job) or [_beyond_the_paper(job)]:
            groups.setdefault(output, []).append(job.id)
    log("by the paper's tables and figures:")
    for key in [STAGE_ONE, *OUTPUTS, *BEYOND]:
        ids = groups.get(key, [])
        title = f"{OUTPUTS[key].label}: {OUTPUTS[key].caption}" if key in OUTPUTS else key
        if not ids:
            if key in OUTPUTS:
                log(f"  {title}: no job (the config runs nothing for it)")
            continue
        n_done = sum(i in done for i in ids)
        models = sorted({i.rsplit("/", 1)[-1].partition("@")[0] for i in ids})  # not each corrupted cache
        shown = ", ".join(models[:6]) + (f" and {len(models) - 6} more" if len(models) > 6 else "")
        log(f"  {title}: {len(ids)} job(s), {n_done} done; {shown}")
    return groups


# -- the cost ----------------------------------------------------------------------------------------------------------

ROWS_PER_JOB = 60  # more pending jobs than this: one row per kind and model (summed over datasets and variants)


def _hours(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.2g}"


def _row(title: str, n: int, ours, seed, width: int) -> str:
    seed_cells = f"{count_text(seed.forwards):>8} {duration(seed.seconds):>9}" if seed.seconds else f"{'-':>8} {'-':>9}"
    return (
        f"  {title:<{width}} {n:>4} {count_text(ours.forwards):>8} {si(ours.flops, 'FLOP'):>11} "
        f"{si(ours.written, 'B'):>9} {si(ours.read, 'B'):>9} {duration(ours.seconds):>9}   {seed_cells}"
    )


def print_cost(jobs: list[Job], splits: dict[str, DataSize | None], log: Log, device_rate: str | None = None) -> dict:
    """Log the cost of ``jobs`` per job (or per kind and model) and in total, the seed's beside it; returns it.

    ``device_rate``: ``--device-rate`` (None: this machine's calibration, else the H200 preset)."""
    rates = resolve_rates(device_rate, log)
    counts = Counts(log=log)  # a damaged kept count is counted again, with a note
    estimator = Estimator(rates, splits, counts)
    found = estimate_jobs(estimator, jobs)
    # the same jobs on the old data path: no pixel cache, every image decoded every epoch, last.pt every epoch
    old_path = estimate_jobs(Estimator(rates, splits, counts, data_path="images"), jobs)
    costs, unknown = found.costs, {}
    for job in jobs:
        if job.id in found.failed:  # said once per model and dataset
            unknown.setdefault(f"{job.model['name']} on {job.dataset['name']}", found.failed[job.id])
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
    log(
        f"  {'job' if per_job else 'kind, model (all datasets and variants)':<{width}} {'jobs':>4} {'forwards':>8} "
        f"{'FLOPs':>11} {'written':>9} {'read':>9} {'time':>9}   {'seed: fwd':>8} {'time':>9}"
    )

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
    log(
        f"total: {count_text(ours.forwards)} foundation forwards, {si(ours.flops, 'FLOP')}, {si(ours.written, 'B')} "
        f"written, {si(ours.read, 'B')} read; about {_hours(ours.seconds)} device-hours on {rates.label} "
        f"({duration(ours.seconds)} one job after another)"
    )
    saving = f", {seed.seconds / ours.seconds:.1f}x fmcache's" if ours.seconds else ""
    log(
        f"the seed's online protocol for the same results: {count_text(seed.forwards)} foundation forwards, "
        f"{si(seed.flops, 'FLOP')}; about {_hours(seed.seconds)} device-hours{saving}"
    )
    frozen = [j.id for j in jobs if j.id in costs and not j.reads_images and not j.is_pixels]
    mine, theirs = total(frozen)
    if frozen and len(frozen) < len(costs):
        ratio = f" ({theirs.seconds / mine.seconds:.0f}x)" if mine.seconds else ""
        log(
            f"  without fine-tuning, what the cache changes: {_hours(mine.seconds)} vs the "
            f"seed's {_hours(theirs.seconds)} device-hours{ratio}"
        )
    old = sum(c.ours.seconds for i, c in old_path.costs.items() if i in costs)
    pixel_jobs = [j.id for j in jobs if j.id in costs and j.is_pixels]
    old_hours = old / 3600
    if any(j.reads_images for j in jobs if j.id in costs):
        pixels = (
            f"{len(pixel_jobs)} pixel cache job(s), {si(total(pixel_jobs)[0].written, 'B')}; " if pixel_jobs else ""
        )
        log(
            f"  fine-tuning's data path: this config's ({pixels}the fine-tunes' pixels, augment and checkpoint_every) "
            f"{_hours(ours.seconds)} device-hours vs {_hours(old)} on the old path (every image decoded every epoch, "
            f"the augmentation in the loader, last.pt after every epoch): {old / max(ours.seconds, 1e-9):.1f}x"
        )
    bound = [i for i, c in costs.items() if c.data_bound]
    if bound and ours.seconds:
        share = sum(costs[i].ours.seconds for i in bound) / ours.seconds
        kinds: dict[str, int] = {}
        for i in bound:
            kinds[i.split("/")[0]] = kinds.get(i.split("/")[0], 0) + 1
        log(
            f"  {len(bound)} job(s) ({', '.join(f'{k} {n}' for k, n in kinds.items())}), {share:.0%} of that time, "
            "wait on their data path (decoding, pixel reads, the augmentation in the loader) with their `workers` (a "
            "protocol's default is 2): more workers per GPU, a pixel cache (pixels: on) or augment: device shorten them"
        )
    if estimator.data_ratio:
        log(
            f"  fine-tunes: the slowest one's loader needs {estimator.data_ratio:.2f}x of its compute time with its "
            f"`workers`" + (" (none waits on it)" if estimator.data_ratio <= 1 else "")
        )
    notes = sorted({s.note for s in splits.values() if s is not None and s.note})
    log(
        "  assumptions: training = 3x the forward of what trains; test scored at ~1 + 2 ln(epochs) new best epochs; "
        "the seed recomputes the frozen foundation every step (train with augmentation), val every epoch, test once, "
        "and the k-NN bank for every k; fine-tuning: the same model work in both, the seed's data path decodes every "
        "image every epoch; image decode from the datasets' typical image sizes, pixel reads and the augmentation on "
        'the device from the device rates (README "Scale")' + (f"; {'; '.join(notes)}" if notes else "")
    )
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
        "data_ratio": estimator.data_ratio,
        "old_path_hours": old_hours,
        "not_estimated": unknown,
    }
