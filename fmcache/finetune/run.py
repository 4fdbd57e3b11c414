"""``fmcache finetune``: the LR × seed grid of end-to-end runs, and its results in the probe's JSON/CSV schema.

Every run starts from the same foundation: the registry model with weights from exactly one source, built as
``extract`` builds it (:func:`fmcache.models.create_foundation`, seeded), so a cache of the starting point
and a cache of the export compare layer by layer. Runs go to ``<out>/<dataset>/<model>/<key12>/``, one
subfolder per (lr, seed) with its checkpoint, export and ``run.json``; the key covers every setting but the LR
and seed lists, so a grid that grows reuses the runs it already finished. The grid's result goes beside them, in
``<key12>/finetune_<head>-<settings_hash12>/`` (``fmcache.results``: result.json, result.csv, predictions.npz).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fmcache.dist import is_main_process, world_size
from fmcache.errors import FmcacheError
from fmcache.files import ensure_writable_dir
from fmcache.finetune.loop import (
    BEST_PREDICTIONS,
    Labelled,
    RunSettings,
    Trainer,
    resolve_amp,
    split_ids,
    split_labels,
)
from fmcache.finetune.model import FineTuneModel, parse_freeze
from fmcache.finetune.spec import FinetuneSpec
from fmcache.headgrid import ProbeResult, summarise
from fmcache.progress import progress_bar
from fmcache.results import ResultSource, result_folder, safe_name, settings_hash, write_head_grid
from fmcache.training import HeadRecords, batch_starts

# Left out of the folder key but in each run's checkpoint: a rerun that changes one of these in the same --out is
# refused by --resume (it would continue another run) and starts over with --no-resume.
TRAINING_ONLY = ("epochs", "batch_size", "drop_last", "accum", "clip", "amp", "schedule", "layer_decay",
                 "weight_decay")  # fmt: skip


def _extract_spec(spec: FinetuneSpec, dataset: str, data_root: Path):
    """The equivalent ``ExtractSpec``: norm, weights identity and seeded random init come from extract's code."""
    from fmcache.extract.plan import ExtractSpec

    return ExtractSpec(
        dataset=dataset, data_root=data_root, model=spec.model, weights=spec.weights, random_init=spec.random_init,
        img_size=spec.img_size, norm=spec.norm, gray=spec.gray, dataset_options=dict(spec.dataset_options),
        arch_overrides=dict(spec.arch_overrides),
    )  # fmt: skip


def build_foundation(spec: FinetuneSpec, img_size: int):
    """The starting foundation, built exactly as ``extract`` builds it (the same seeded factory)."""
    from fmcache.models import create_foundation

    return create_foundation(spec.model, weights=spec.weights, random_init=spec.random_init, img_size=img_size,
                             arch_overrides=spec.arch_overrides or None)  # fmt: skip


def build_model(spec: FinetuneSpec, img_size: int, num_classes: int, seed: int) -> tuple[FineTuneModel, dict]:
    """Foundation + freshly seeded head with the freezing applied; the head weights report for the results."""
    foundation = build_foundation(spec, img_size)
    head_input = "pooled" if spec.head == "linear" else "tokens"
    drop = spec.drop_after
    model = FineTuneModel(foundation, nn.Identity(), head_input, parse_freeze(spec.freeze), drop)
    with torch.no_grad():
        probe = model.features(torch.zeros(1, 3, img_size, img_size))
    lora = _inject_lora(spec, model, seed) if spec.method == "lora" else None
    torch.manual_seed(seed)
    info: dict = {"kind": spec.head}
    if spec.head == "linear":
        head: nn.Module = nn.Linear(probe.shape[-1], num_classes)
    else:
        from fmcache.frozen.heads import build_head, load_deit_weights

        head = build_head("deit", probe.shape[-1], num_classes, depth=spec.head_depth)
        if spec.head_random_init:
            info["weights"] = "random"
        else:
            info["weights"] = load_deit_weights(head, spec.head_weights or "imagenet")
    final = FineTuneModel(foundation, head, head_input, model.freeze, model.drop_after, model.stages, spec.method)
    final.lora = lora
    return final, info


def _inject_lora(spec: FinetuneSpec, model: FineTuneModel, seed: int) -> dict:
    """peft adapters in the blocks that train (K+1..I), seeded by the run's seed; what the result reports."""
    from fmcache.finetune.lora import inject, is_lora_parameter, resolve_targets

    f = model.foundation
    targets = resolve_targets(model.stages, f.name, f.layer_unit, spec.lora_targets)
    blocks = range(model.first_trainable_block, model.used_blocks)
    modules = inject(model.stages, blocks, targets, spec.lora_rank, spec.lora_alpha, spec.lora_dropout, seed)
    params = sum(p.numel() for n, p in f.root.named_parameters() if is_lora_parameter(n))
    return {"rank": spec.lora_rank, "alpha": spec.lora_alpha, "dropout": spec.lora_dropout, "targets": list(targets),
            "blocks": [blocks.start + 1, blocks.stop], "modules": len(modules), "adapter_parameters": params}  # fmt: skip


# full fine-tuning's result folders keep the names they had before --method existed: its fields enter the keys only
# for --method lora (with the targets resolved on the model, so the default and the same list named share a folder)
METHOD_FIELDS = ("method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def _method_doc(spec: FinetuneSpec, lora: dict | None) -> dict:
    if spec.method == "full" or lora is None:
        return {}
    return {"method": spec.method, "lora_rank": spec.lora_rank, "lora_alpha": spec.lora_alpha,
            "lora_dropout": spec.lora_dropout, "lora_targets": list(lora["targets"])}  # fmt: skip


# -- data ----------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    splits: dict
    dataset: str
    class_names: list[str]
    multilabel: bool
    metric: str
    img_size: int
    identity: dict  # what the run's key records about the data
    notes: list[str] = field(default_factory=list)


def online_data(spec: FinetuneSpec) -> Data:
    """Images with the train augmentation (train) and the eval transform (val/test), as PROTOCOLS.md."""
    from fmcache.data import ImageDataset, build_transform, default_metric, load_dataset, train_augmentation
    from fmcache.data.describe import empty_split_warning
    from fmcache.data.transforms import check_gray_for
    from fmcache.extract.plan import resolve_norm
    from fmcache.metrics import check_metric
    from fmcache.models import get_spec

    ex = _extract_spec(spec, spec.dataset, Path(spec.data_root))
    check_gray_for(spec.gray, spec.dataset)
    index = load_dataset(spec.dataset, spec.data_root, **spec.dataset_options)
    img_size = int(spec.img_size or get_spec(spec.model).default_img_size)
    mean, std, norm_source = resolve_norm(ex)
    positions = {
        s: index.indices(s)[: spec.limit] if spec.limit else index.indices(s) for s in ("train", "val", "test")
    }
    empty = empty_split_warning(index.name, {s: len(p) for s, p in positions.items()})
    if empty:
        raise FmcacheError(empty)
    eval_tf, eval_desc = build_transform(img_size, None, mean, std, gray=spec.gray)
    train_tf = train_augmentation(img_size, mean, std, gray=spec.gray)
    splits = {
        s: Labelled(ImageDataset(index, positions[s], train_tf if s == "train" else eval_tf), index.labels)
        for s in ("train", "val", "test")
    }
    identity = {"dataset": index.name, "fingerprint": index.fingerprint(), "labels": index.labels_fingerprint(),
                "split": index.split_info, "options": index.options, "limit": spec.limit,
                "transform": {**eval_desc, "norm_source": norm_source}}  # fmt: skip
    metric = check_metric(spec.metric) if spec.metric else default_metric(index)
    return Data(splits, index.name, list(index.class_names), bool(index.multilabel), metric, img_size, identity)


def cached_data(spec: FinetuneSpec) -> tuple[Data, object]:
    """Layer-K tokens of a cache (K = --freeze): the same model and weights identity, or refused."""
    from fmcache.cache.reader import CacheReader
    from fmcache.extract.plan import weights_identity
    from fmcache.frozen.common import resolve_metric
    from fmcache.models import get_spec

    freeze = parse_freeze(spec.freeze)
    if not isinstance(freeze, int) or freeze < 1:
        raise FmcacheError("--from-cache needs --freeze K (K >= 1): the cached layer-K tokens feed block K+1")
    reader = CacheReader(spec.from_cache)
    inputs = reader.manifest.get("inputs", {})
    cached_model = inputs.get("model", {})
    if reader.model != get_spec(spec.model).name:
        raise FmcacheError(f"cache {reader.path} holds {reader.model}, not {spec.model}; extract {spec.model} first")
    mine = weights_identity(_extract_spec(spec, reader.dataset, Path(reader.manifest["dataset"]["root"])))
    if cached_model.get("weights") != mine or (cached_model.get("arch_overrides") or {}) != spec.arch_overrides:
        raise FmcacheError(
            f"cache {reader.path} was extracted with other weights ({cached_model.get('weights')}) than this run "
            f"({mine}); extract with the same --weights/--random-init"
        )
    img_size = int(inputs.get("img_size") or reader.manifest["model"]["img_size"])
    if spec.img_size is not None and spec.img_size != img_size:
        raise FmcacheError(f"cache {reader.path} was extracted at {img_size} px, not --img-size {spec.img_size}")
    splits = {s: Labelled(reader.tokens(s, freeze), None) for s in ("train", "val", "test")}
    if spec.limit:
        from torch.utils.data import Subset

        for s in splits:
            inner = splits[s].inner
            keep = list(range(min(spec.limit, len(inner))))
            sub = Subset(inner, keep)
            sub.labels = inner.labels[keep]  # type: ignore[attr-defined]
            splits[s] = Labelled(sub, None)
    identity = {"cache": reader.key, "layer": freeze}
    metric = resolve_metric(reader, spec.metric)
    notes = [f"from cache {reader.path}: blocks 1..{freeze} are not run and see no augmentation (center crops)"]
    data = Data(splits, reader.dataset, reader.class_names, reader.multilabel, metric, img_size, identity, notes)
    return data, reader


# -- the grid ------------------------------------------------------------------------------------------------------


def run_key(spec: FinetuneSpec, data: Data, weights: dict, lora: dict | None = None) -> str:
    doc = {k: v for k, v in asdict(spec).items()
           if k not in ("lrs", "seeds", "out", "resume", "workers", "tensorboard", "device", "from_cache",
                        "dataset_options", "data_root", *TRAINING_ONLY, *METHOD_FIELDS)}  # fmt: skip
    doc.update(_method_doc(spec, lora))
    doc.update(data=data.identity, weights=weights)
    return settings_hash(doc)


def run_finetune(spec: FinetuneSpec, progress: bool = True, log=print) -> dict:
    """Train every LR × seed run (resuming finished or interrupted ones) and write the grid's result folder.

    Returns ``folder`` (the result folder, ``<out>/<dataset>/<model>/<key12>/finetune_<head>-<hash12>``) and
    ``runs_folder`` (``<key12>``, with one subfolder per LR × seed).
    """
    from fmcache.dist import close_dist, init_dist, pick_device
    from fmcache.extract.plan import weights_identity
    from fmcache.models import get_spec
    from fmcache.training import fit_warmup, paper_warmup

    get_spec(spec.model)  # unknown names fail before any data is read
    resolve_amp(spec.amp, pick_device(spec.device))
    main = is_main_process()
    if spec.from_cache is not None:
        data, _ = cached_data(spec)
    else:
        data = online_data(spec)
    weights = weights_identity(_extract_spec(spec, data.dataset, Path(spec.data_root or ".")))
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
    tb = _tensorboard(spec, folder) if spec.tensorboard and main else None
    dist = init_dist(spec.device)
    amp = resolve_amp(spec.amp, dist.device)
    n_train = len(data.splits["train"])
    warmup = fit_warmup(paper_warmup(data.dataset), spec.epochs, n_train, spec.batch_size * spec.accum * dist.world,
                        spec.drop_last)  # fmt: skip
    seeds = list(spec.seeds)
    results: dict[tuple[float, int], dict] = {}
    try:
        total = len(spec.lrs) * len(seeds) * spec.epochs * n_train
        with progress_bar(progress and dist.main, total, f"finetune {spec.model}", "finetune") as advance:
            for lr in spec.lrs:
                for seed in seeds:
                    model = model0 if (lr, seed) == (spec.lrs[0], seeds[0]) else build_model(
                        spec, data.img_size, len(data.class_names), seed)[0]  # fmt: skip
                    model0 = None  # type: ignore[assignment]  (every run starts from the pristine foundation)
                    settings = RunSettings(
                        lr=lr, seed=seed, epochs=spec.epochs, batch_size=spec.batch_size, drop_last=spec.drop_last,
                        accum=spec.accum,
                        clip=spec.clip, amp=amp, schedule=spec.schedule, warmup=warmup,
                        weight_decay=spec.weight_decay, layer_decay=spec.layer_decay, metric=data.metric,
                        multilabel=data.multilabel, label_names=data.class_names if data.multilabel else None,
                        workers=spec.workers, from_cache=spec.from_cache is not None, export=export,
                        extra={"key": key},
                    )  # fmt: skip
                    trainer = Trainer(model, data.splits, settings, folder / f"lr{lr:g}_seed{seed}", dist,
                                      spec.resume, advance, log, tb)  # fmt: skip
                    results[(lr, seed)] = trainer.run()
    finally:
        close_dist(dist)
        if tb is not None:
            tb.close()
    summary = _summarise(folder, data.metric, list(spec.lrs), seeds, results)
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
        "layers": {layer: entry},
        "notes": data.notes,
        **_sizes(results),
    }
    if lora is not None:
        details["lora"] = lora
    if dist.main:
        if summary.predictions is None:
            details["notes"] = [*data.notes, "runs from an older fmcache saved no predictions; rerun with --no-resume"]
        source = ResultSource(
            dataset=data.dataset, model=spec.model, cache_key=None, weights=weights,
            ids={s: split_ids(data.splits[s]) for s in ("val", "test")},
            labels={s: split_labels(data.splits[s]) for s in ("val", "test")},
            split=data.identity.get("split"), img_size=data.img_size,
        )  # fmt: skip
        write_head_grid(
            result_dir, source, protocol=f"finetune_{spec.head}", settings=settings, metric=data.metric,
            per_layer={layer: entry}, rows=rows, predictions=summary.predictions, details=details,
            extra={"run_key": key}, timings_extra=entry["timings"],
        )  # fmt: skip
    return {"folder": result_dir, "runs_folder": folder, "metric": data.metric, "layers": {layer: entry},
            "rows": rows, "notes": data.notes, "lora": lora, **_sizes(results)}  # fmt: skip


def _sizes(results: dict) -> dict:
    """What trains and what a checkpoint weighs (``last.pt``: the trainable tensors, their optimizer state, RNG);
    runs finished by an older fmcache recorded neither."""
    runs = list(results.values())
    params = [r["trainable_parameters"] for r in runs if r.get("trainable_parameters") is not None]
    sizes = [r["checkpoint_bytes"] for r in runs if r.get("checkpoint_bytes") is not None]
    return {"trainable_parameters": params[0] if params else None, "checkpoint_bytes": max(sizes) if sizes else None}


def result_settings(spec: FinetuneSpec, amp: str, warmup: dict, world: int, effective: int, head: dict,
                    lora: dict | None = None) -> dict:  # fmt: skip
    """Every setting that changes the numbers, for the result folder's hash: not paths, workers, device, logging.

    ``head`` is the head weights report (``build_model``), so DeiT heads from other weights get other folders;
    ``lora`` is the adapters' report (``build_model``), whose resolved targets enter the settings.
    """
    skip = ("out", "resume", "workers", "tensorboard", "device", "data_root", "from_cache", *METHOD_FIELDS)
    settings = {k: v for k, v in asdict(spec).items() if k not in skip}
    settings.update(_method_doc(spec, lora))
    settings.update(lrs=[float(lr) for lr in spec.lrs], seeds=list(spec.seeds), from_cache=spec.from_cache
                    is not None, amp=amp, warmup=warmup, world_size=world, effective_batch_size=effective,
                    head_weights_identity=_without_paths(head))  # fmt: skip
    return settings


def _without_paths(info: dict) -> dict:
    # the head weights' sha256 names them; where the file sits (a hub cache, a cluster path) changes no number
    return {k: _without_paths(v) if isinstance(v, dict) else v for k, v in info.items() if k != "path"}


def _summarise(folder: Path, metric: str, lrs: list[float], seeds: list[int], results: dict) -> ProbeResult:
    """The runs as one head grid (head = lr_index × n_seeds + seed_index, as the frozen grids), summarised by
    :func:`fmcache.headgrid.summarise`: best LR by mean val, test mean ± std over seeds, each run's best epoch's
    predictions (read back from its folder; none if an older run saved none)."""
    runs = [results[(lr, seed)] for lr in lrs for seed in seeds]
    records = HeadRecords(len(runs), max(len(r["curve"]) for r in runs))
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
