"""``fmcache finetune``: the LR × seed grid of end-to-end runs, and its results in the probe's JSON/CSV schema.

Every run starts from the same foundation: the registry model with weights from exactly one source, built as
``extract`` builds it (:func:`fmcache.models.create_foundation`, seeded), so a cache of the starting point
and a cache of the export compare layer by layer. Runs go to ``<out>/<dataset>/<model>/<key12>/``, one
subfolder per (lr, seed) with its checkpoint, export and ``run.json``; the key covers every setting but the LR
and seed lists, so a grid that grows reuses the runs it already finished. The grid's result goes beside them, in
``<key12>/finetune_<head>-<settings_hash12>/`` (``fmcache.results``: result.json, result.csv, predictions.npz).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from fmcache.choices import BEST_EPOCH_RULES
from fmcache.dist import close_dist, init_dist, is_main_process, pick_device, world_size
from fmcache.errors import FmcacheError
from fmcache.files import ensure_writable_dir
from fmcache.finetune.build import METHOD_FIELDS, build_model, extract_spec, method_doc
from fmcache.finetune.data import Data, cached_data, online_data
from fmcache.finetune.loop import (
    BEST_PREDICTIONS,
    RunSettings,
    Trainer,
    resolve_amp,
    split_ids,
    split_labels,
)
from fmcache.finetune.spec import FinetuneSpec
from fmcache.headgrid import ProbeResult, summarise
from fmcache.models import get_spec
from fmcache.progress import progress_bar
from fmcache.results import ResultSource, result_folder, safe_name, settings_hash, write_head_grid
from fmcache.training import HeadRecords, batch_starts, fit_warmup, paper_warmup

# Left out of the folder key but in each run's checkpoint: a rerun that changes one of these in the same --out is
# refused by --resume (it would continue another run) and starts over with --no-resume.
TRAINING_ONLY = (
    "epochs",
    "batch_size",
    "drop_last",
    "accum",
    "clip",
    "amp",
    "schedule",
    "layer_decay",
    "weight_decay",
    "best_epoch",
    "eval_precision",
)


# Where the pixels come from and how often last.pt is written change no number (a pixel cache feeds the PIL
# augmentation bit-identical crops; a resume replays the epochs since its checkpoint): neither enters a key. The
# augmentation on the device draws other pixels, so ``augment: device`` enters both keys (:func:`augment_doc`);
# the default keeps every existing folder name.
DATA_PATH_FIELDS = ("pixels", "augment", "cache_root", "checkpoint_every")


def augment_doc(spec: FinetuneSpec) -> dict:
    return {} if spec.augment == "cpu" else {"augment": spec.augment}


# -- the grid ------------------------------------------------------------------------------------------------------


def run_key(spec: FinetuneSpec, data: Data, weights: dict, lora: dict | None = None) -> str:
    doc = {
        k: v
        for k, v in asdict(spec).items()
        if k
        not in (
            "lrs",
            "seeds",
            "out",
            "resume",
            "workers",
            "tensorboard",
            "device",
            "from_cache",
            "dataset_options",
            "data_root",
            *TRAINING_ONLY,
            *METHOD_FIELDS,
            *DATA_PATH_FIELDS,
        )
    }
    doc.update(method_doc(spec, lora), **augment_doc(spec))
    doc.update(data=data.identity, weights=weights)
    return settings_hash(doc)


def run_finetune(spec: FinetuneSpec, progress: bool = True, log=print) -> dict:
    """Train every LR × seed run (resuming finished or interrupted ones) and write the grid's result folder.

    Returns ``folder`` (the result folder, ``<out>/<dataset>/<model>/<key12>/finetune_<head>-<hash12>``) and
    ``runs_folder`` (``<key12>``, with one subfolder per LR × seed).
    """
    from fmcache.extract.plan import weights_identity  # deferred: h5py, torchvision

    get_spec(spec.model)  # unknown names fail before any data is read
    resolve_amp(spec.amp, pick_device(spec.device))
    main = is_main_process()
    if spec.from_cache is not None:
        data, _ = cached_data(spec)
    else:
        data = online_data(spec)
    weights = weights_identity(extract_spec(spec, data.dataset, Path(spec.data_root or ".")))
    # freezing is checked on the real model before any process group or file: a bad K is one line, nothing written
    model0, head_info = build_model(spec, data.img_size, len(data.class_names), spec.seeds[0])
    if spec.from_cache is not None and model0.stages is None:
        raise FmcacheError(f"--from-cache needs a model made of blocks; {spec.model} is not")
    # a train split smaller than one batch fails here, before any folder is written (each rank gets its share)
    batch_starts(-(-len(data.splits["train"]) // world_size()), spec.batch_size, spec.drop_last)
    if main:
        ensure_writable_dir(Path(spec.out))
    export = any(p.requires_grad for p in model0.foundation.parameters())
    layer = model0.used_blocks or None
    lora = model0.lora
    key = run_key(spec, data, weights, lora)
    folder = Path(spec.out) / safe_name(data.dataset) / safe_name(spec.model) / key[:12]
    if spec.random_init and main:
        log(f"WARNING: {spec.model} runs with RANDOM weights (--random-init); not pretrained")
    for note in data.notes:
        if main:
            log(f"note: {note}")
    for hint in data.hints:
        if main:
            log(hint)
    tb = _tensorboard(spec, folder) if spec.tensorboard and main else None
    dist = init_dist(spec.device)
    amp = resolve_amp(spec.amp, dist.device)
    n_train = len(data.splits["train"])
    warmup = fit_warmup(
        paper_warmup(data.dataset), spec.epochs, n_train, spec.batch_size * spec.accum * dist.world, spec.drop_last
    )
    seeds = list(spec.seeds)
    results: dict[tuple[float, int], dict] = {}
    try:
        total = len(spec.lrs) * len(seeds) * spec.epochs * n_train
        with progress_bar(progress and dist.main, total, f"finetune {spec.model}", "finetune") as advance:
            for lr in spec.lrs:
                for seed in seeds:
                    model = (
                        model0
                        if (lr, seed) == (spec.lrs[0], seeds[0])
                        else build_model(spec, data.img_size, len(data.class_names), seed)[0]
                    )
                    model0 = None  # type: ignore[assignment]  (every run starts from the pristine foundation)
                    settings = RunSettings(
                        lr=lr,
                        seed=seed,
                        epochs=spec.epochs,
                        batch_size=spec.batch_size,
                        drop_last=spec.drop_last,
                        accum=spec.accum,
                        clip=spec.clip,
                        amp=amp,
                        schedule=spec.schedule,
                        warmup=warmup,
                        weight_decay=spec.weight_decay,
                        layer_decay=spec.layer_decay,
                        best_epoch=spec.best_epoch,
                        eval_precision=spec.eval_precision,
                        metric=data.metric,
                        multilabel=data.multilabel,
                        label_names=data.class_names if data.multilabel else None,
                        workers=spec.workers,
                        checkpoint_every=float(spec.checkpoint_every),
                        from_cache=spec.from_cache is not None,
                        export=export,
                        extra={"key": key},
                    )
                    trainer = Trainer(
                        model,
                        data.splits,
                        settings,
                        folder / f"lr{lr:g}_seed{seed}",
                        dist,
                        spec.resume,
                        advance,
                        log,
                        tb,
                        data.batches,
                    )
                    results[(lr, seed)] = trainer.run()
    finally:
        close_dist(dist)
        if tb is not None:
            tb.close()
    summary = _summarise(folder, data.metric, list(spec.lrs), seeds, results, spec.best_epoch)
    entry = summary.to_dict()
    entry["timings"].update(_timings(results))
    entry["head"] = head_info
    rows = [{"layer": layer, "head": spec.head, "freeze": spec.freeze, **r} for r in summary.rows()]
    effective = spec.batch_size * spec.accum * dist.world
    settings = result_settings(spec, amp, warmup, dist.world, effective, head_info, lora)
    result_dir = result_folder(spec.out, data.dataset, spec.model, key, f"finetune_{spec.head}", settings)
    details = {
        "run_key": key,
        "runs_folder": str(folder),
        "cache": str(spec.from_cache) if spec.from_cache else None,
        "cache_key": data.identity.get("cache"),
        "data_root": str(spec.data_root) if spec.data_root else None,
        "workers": spec.workers,
        "device": str(dist.device),
        # where the pixels came from: the image files, or a pixel cache (its key); how the train augmentation ran
        "data_source": data.source,
        "augment": {"place": spec.augment, **(data.batches.spec() if data.batches is not None else {})},
        "checkpoint_every": spec.checkpoint_every,
        "layers": {layer: entry},
        "notes": data.notes,
        **_sizes(results),
    }
    if lora is not None:
        details["lora"] = lora
    if dist.main:
        if summary.predictions is None:
            details["notes"] = [*data.notes, "runs from an older fmcache saved no predictions; rerun with --no-resume"]
        ids = {s: split_ids(data.splits[s]) for s in ("val", "test")}
        facts = {s: data.sample_facts(ids[s]) for s in ids}
        source = ResultSource(
            dataset=data.dataset,
            model=spec.model,
            cache_key=None,
            weights=weights,
            ids=ids,
            labels={s: split_labels(data.splits[s]) for s in ("val", "test")},
            split=data.identity.get("split"),
            img_size=data.img_size,
            groups={s: g for s, (g, _) in facts.items() if g is not None},
            meta={s: m for s, (_, m) in facts.items()},
            group_unit=data.group_unit,
            label_policy=data.label_policy,
        )
        write_head_grid(
            result_dir,
            source,
            protocol=f"finetune_{spec.head}",
            settings=settings,
            metric=data.metric,
            per_layer={layer: entry},
            rows=rows,
            predictions=summary.predictions,
            details=details,
            extra={"run_key": key},
            timings_extra=entry["timings"],
        )
    return {
        "folder": result_dir,
        "runs_folder": folder,
        "metric": data.metric,
        "layers": {layer: entry},
        "rows": rows,
        "notes": data.notes,
        "lora": lora,
        **_sizes(results),
    }


def _sizes(results: dict) -> dict:
    """What trains and what a checkpoint weighs (``last.pt``: the trainable tensors, their optimizer state, RNG);
    runs finished by an older fmcache recorded neither."""
    runs = list(results.values())
    params = [r["trainable_parameters"] for r in runs if r.get("trainable_parameters") is not None]
    sizes = [r["checkpoint_bytes"] for r in runs if r.get("checkpoint_bytes") is not None]
    return {"trainable_parameters": params[0] if params else None, "checkpoint_bytes": max(sizes) if sizes else None}


def result_settings(
    spec: FinetuneSpec, amp: str, warmup: dict, world: int, effective: int, head: dict, lora: dict | None = None
) -> dict:
    """Every setting that changes the numbers, for the result folder's hash: not paths, workers, device, logging.

    ``head`` is the head weights report (``build_model``), so DeiT heads from other weights get other folders;
    ``lora`` is the adapters' report (``build_model``), whose resolved targets enter the settings.
    """
    skip = ("out", "resume", "workers", "tensorboard", "device", "data_root", "from_cache", *METHOD_FIELDS)
    settings = {k: v for k, v in asdict(spec).items() if k not in (*skip, *DATA_PATH_FIELDS)}
    settings.update(method_doc(spec, lora), **augment_doc(spec))
    settings.update(
        lrs=[float(lr) for lr in spec.lrs],
        seeds=list(spec.seeds),
        from_cache=spec.from_cache is not None,
        amp=amp,
        warmup=warmup,
        world_size=world,
        effective_batch_size=effective,
        head_weights_identity=_without_paths(head),
    )
    return settings


def _without_paths(info: dict) -> dict:
    # the head weights' sha256 names them; where the file sits (a hub cache, a cluster path) changes no number
    return {k: _without_paths(v) if isinstance(v, dict) else v for k, v in info.items() if k != "path"}


def _summarise(
    folder: Path, metric: str, lrs: list[float], seeds: list[int], results: dict, best_epoch: str
) -> ProbeResult:
    """The runs as one head grid (head = lr_index × n_seeds + seed_index, as the frozen grids), summarised by
    :func:`fmcache.headgrid.summarise`: best LR by mean val, test mean ± std over seeds, each run's best epoch's
    predictions (read back from its folder; none if an older run saved none)."""
    runs = [results[(lr, seed)] for lr in lrs for seed in seeds]
    records = HeadRecords(len(runs), max(len(r["curve"]) for r in runs), BEST_EPOCH_RULES[best_epoch])
    for h, (run, (lr, seed)) in enumerate(zip(runs, ((lr, s) for lr in lrs for s in seeds), strict=True)):
        for epoch, value in enumerate(run["curve"]):
            records.observe(epoch, {h: value})
        records.test_metrics[h] = run["test"]
        path = folder / f"lr{lr:g}_seed{seed}" / BEST_PREDICTIONS
        if path.is_file():
            with np.load(path) as npz:
                records.best_val_probs[h], records.best_test_probs[h] = npz["val_scores"], npz["test_scores"]
    # inference time: the mean of the runs' own per-image times
    records.forward_seconds = float(sum(r["timings"]["inference_s_per_img"] for r in runs))
    records.forward_samples = len(runs)
    train_seconds = float(sum(r["timings"]["train_seconds"] for r in runs))
    return summarise(metric, lrs, seeds, records, {}, train_seconds)


def _timings(results: dict) -> dict:
    runs = list(results.values())
    per_epoch = [r["timings"]["train_s_per_epoch"] for r in runs if r["timings"]["train_s_per_epoch"] is not None]
    return {
        "train_s_per_epoch": float(np.mean(per_epoch)) if per_epoch else None,
        "inference_s_per_img": float(np.mean([r["timings"]["inference_s_per_img"] for r in runs])),
        "peak_memory_bytes": max(r["timings"]["peak_memory_bytes"] for r in runs),
        "effective_batch_size": runs[0]["effective_batch_size"],
    }


def _tensorboard(spec: FinetuneSpec, folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise FmcacheError("--tensorboard needs the tensorboard package; pip install tensorboard") from None
    return SummaryWriter(str(folder / "tensorboard"))
