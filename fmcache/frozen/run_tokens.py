"""Runner of ``fmcache probe --head deit|attentive``: token heads per cached layer, results beside the linear probe's.

Each run gets its own folder, ``<out>/<dataset>/<model>/<key12>/probe_<head>-<settings_hash12>/`` (``fmcache.results``),
with ``result.json`` (the linear probe's schema under ``details``: per LR × seed val curve, best epoch, test at best;
best LR by mean val; test mean ± std; timings), ``result.csv``, ``predictions.npz``, per-LR curves, and with several
layers ``probe_<head>_vs_layer.csv/png`` (the decapitation study, the paper's Fig. 5). Checkpoints go to
``checkpoints/`` in the same folder, so a rerun with the same settings resumes them.
"""

from __future__ import annotations

import time
from pathlib import Path

from fmcache.cache.reader import CacheReader
from fmcache.choices import PAPER_TOKENS
from fmcache.dist import pick_device
from fmcache.files import atomic_write_bytes
from fmcache.frozen.common import label_settings, protocol_dir, resolve_metric, result_source, views_and_warmup
from fmcache.frozen.headfiles import TOKEN, layer_prefix, layer_tag, save_heads
from fmcache.frozen.heads import deit_pretrained_state
from fmcache.frozen.specs import TokenProbeSpec
from fmcache.frozen.subsets import (
    Subset,
    over_subsets,
    rows_of,
    subset_drop_last,
    subset_settings,
    subset_source,
    write_subset,
)
from fmcache.frozen.token_layers import LayerSpec, check_token_layers, layer_spec, paper_tokens_note, token_norm_for
from fmcache.frozen.tokens import TokenGridSettings, TokenSplit, should_preload, train_token_grid
from fmcache.headgrid import ProbeResult
from fmcache.plots import plot_probe_curves, plot_probe_vs_layer
from fmcache.progress import progress_bar
from fmcache.results import HEADS, csv_bytes, heads_record, start_result, write_head_grid
from fmcache.training import check_checkpoint, checkpoint_position, warmup_note

EVAL = ("train", "val", "test")


def checkpoint_path(folder: Path, head: str, layer: int | str) -> Path:
    return folder / "checkpoints" / f"probe_{head}_{layer_tag(layer)}.pt"


def _head_source(spec: TokenProbeSpec):
    """(pretrained tensors or None, the record of where the head's weights came from); the spec checked the choice."""
    if spec.head == "attentive":
        return None, {"source": "random", "seeded": "per seed"}
    if spec.head_random_init:
        return None, {"source": "random", "seeded": "per seed", "depth": spec.head_depth}
    return deit_pretrained_state(spec.head_weights or "imagenet", spec.head_depth)


def run_token_probe(spec: TokenProbeSpec, progress: bool = False, log=print) -> dict:
    """Token heads (``deit`` or ``attentive``) for the LR × seed grid on each requested cached token layer; with
    ``--train-fraction``/``--train-per-class`` one folder per (amount, repeat), then the label-efficiency curve."""
    reader = CacheReader(spec.cache, uncertain=spec.uncertain)
    answer = over_subsets(
        reader, spec, f"probe_{spec.head}", lambda subset: _run_token_probe(reader, spec, subset, progress, log), log
    )
    return {**answer, "head": spec.head}


def _run_token_probe(reader: CacheReader, spec: TokenProbeSpec, subset: Subset | None, progress: bool, log) -> dict:
    """One token-head grid: on the whole train split (``subset`` None, the plain run) or on a subset of it."""
    head, lrs, epochs, batch_size, schedule = spec.head, list(spec.lrs), spec.epochs, spec.batch_size, spec.schedule
    metric = resolve_metric(reader, spec.metric)
    layers = check_token_layers(reader, spec.layer)
    norm = token_norm_for(reader, spec.token_norm)
    seed_list = list(spec.seeds)
    note = paper_tokens_note(reader, layers) if spec.token_norm == "seed" else None
    if note:
        log(note)
    specs = {n: layer_spec(reader, n, norm, head) for n in layers}
    loads = {n: should_preload(reader, n, spec.preload) for n in layers}
    dev = pick_device(spec.device)
    drop_last = subset_drop_last(subset, batch_size, spec.drop_last, log)
    n_train = None if subset is None else len(subset.train)
    with_views, warmup = views_and_warmup(reader, spec.views, epochs, batch_size, drop_last, n_train)
    pretrained, weights_info = _head_source(spec)
    head_depth, heads_per_pass = spec.head_depth, spec.heads_per_pass
    weights_record = {k: v for k, v in weights_info.items() if k in ("source", "hub_id", "sha256", "depth")}
    stem = f"probe_{head}"
    # what names the folder: every setting that changes the numbers (not passes, preload, workers or device, which
    # only change how they are computed; the checkpoint still records those and refuses a resume across them)
    shared = {
        **label_settings(reader),
        "head": head,
        "lrs": [float(x) for x in lrs],
        "seeds": seed_list,
        "epochs": epochs,
        "batch_size": batch_size,
        "drop_last": spec.drop_last,
        "metric": metric,
        "weight_decay": spec.weight_decay,
        "schedule": schedule,
        "best_epoch": spec.best_epoch,
        "token_norm": norm,
        "head_weights": weights_record,
        "head_depth": head_depth if head == "deit" else None,
        **subset_settings(subset),
    }
    settings = {
        **shared,
        **warmup,
        "layers": layers,
        "views": {"used": with_views, "k": reader.views_k if with_views else 0},
    }
    folder = protocol_dir(reader, spec.out, stem, settings)
    common = {
        **shared,
        "cache_key": reader.key,
        "warmup": warmup,
        "heads_per_pass": heads_per_pass,
        "device": dev.type,
        "views": reader.views_k if with_views else 0,
    }
    ckpt_settings = {n: {**common, "layer": n} for n in layers}
    resumes = {}
    if spec.resume:  # refuse a mismatched checkpoint before anything is trained or written
        for n in layers:
            if check_checkpoint(checkpoint_path(folder, head, n), ckpt_settings[n]):
                resumes[n] = checkpoint_position(checkpoint_path(folder, head, n))
    start_result(folder)
    subset_facts = write_subset(folder, reader, subset)
    if subset_facts and warmup_note(reader.dataset, warmup):  # said in the result, not only in its settings
        subset_facts["subset"]["warmup"] = warmup_note(reader.dataset, warmup)
    per_layer, rows, read_info, predictions, kept = {}, [], {}, None, {}
    n_heads = len(lrs) * len(seed_list)
    n_passes = -(-n_heads // (heads_per_pass or n_heads))
    for n in layers:
        if n in resumes:  # as fine-tuning does: a rerun says where it picks up
            log(f"resumed {stem} layer {n} {_resume_point(resumes[n], epochs, n_passes)}")
        t0 = time.perf_counter()
        splits = [
            TokenSplit(reader, s, n, loads[n], spec.workers, with_views and s == "train", rows_of(subset, s))
            for s in EVAL
        ]
        read_info[n] = {"preloaded": loads[n], "read_seconds": time.perf_counter() - t0}
        cfg = TokenGridSettings(
            head,
            list(lrs),
            seed_list,
            len(reader.class_names),
            metric,
            reader.multilabel,
            epochs,
            batch_size,
            spec.weight_decay,
            warmup,
            schedule,
            1.0,
            head_depth,
            heads_per_pass,
            reader.class_names if reader.multilabel else None,
            drop_last,
            spec.best_epoch,
        )
        with progress_bar(
            progress,
            epochs * max(1, -(-n_heads // (heads_per_pass or n_heads))),
            f"layer {n}",
            f"{head} {n_heads} heads, layer {n}",
            "epoch/s",
        ) as advance:
            result = train_token_grid(
                specs[n],
                *splits,
                cfg,
                dev,
                pretrained,
                checkpoint_path(folder, head, n),
                ckpt_settings[n],
                spec.resume,
                on_epoch=lambda _: advance(1),
            )
        entry = result.to_dict()
        kept[n] = result  # its best-LR heads' states, for heads.safetensors
        entry["timings"]["token_read"] = read_info[n]
        per_layer[n] = entry
        predictions = result.predictions  # the last layer's is the headline, as the linear probe
        rows += [{"layer": n, "head": head, **r} for r in result.rows()]
        suffix = "" if len(layers) == 1 else f"_{layer_tag(n)}"
        if spec.plots:
            plot_probe_curves(folder / f"{stem}_curves{suffix}.png", result.curves, metric=f"val {metric}")
    if len(layers) > 1:
        _write_vs_layer(folder, stem, head, per_layer, metric, spec.plots)
    details = {
        "cache": str(reader.path),
        "token_norm_option": spec.token_norm,
        "head_weights": weights_info,
        "head_random_init": weights_info["source"] == "random",
        "heads_per_pass": heads_per_pass,
        "device": dev.type,
        "layers": per_layer,
    }
    heads_facts = _save_heads(folder, reader, head, seed_list, norm, head_depth, specs, kept, log)  # before the json
    write_head_grid(
        folder,
        subset_source(result_source(reader), subset),
        protocol=stem,
        settings=settings,
        metric=metric,
        per_layer=per_layer,
        rows=rows,
        predictions=predictions,
        details=details,
        extra={"paper_feature": _paper_tokens(reader, layers, norm), "heads": heads_facts, **subset_facts},
    )
    return {
        "folder": folder,
        "metric": metric,
        "layers": per_layer,
        "rows": rows,
        "head": head,
        "head_weights": weights_info,
    }


def _save_heads(
    folder: Path,
    reader: CacheReader,
    head: str,
    seeds: list[int],
    norm: str,
    depth: int,
    specs: dict[int | str, LayerSpec],
    results: dict[int | str, ProbeResult],
    log,
) -> dict:
    """``heads.safetensors``: each layer's best-LR heads, one per seed at its best epoch, streamed from the best-state
    files the grid kept; the record says what rebuilding them needs (head kind, depth, token width and grid, norm).

    A rerun that finds every epoch done in a checkpoint of an fmcache that kept no best states has none to save: its
    numbers are written as before, and the record says how to get the heads (``--no-resume``)."""
    if not all(state.available for r in results.values() for state in r.heads["states"]):
        log(f"warning: {folder.name}: its checkpoint kept no best head states; rerun with --no-resume to save heads")
        what = "none saved: the checkpoint this run resumed kept no best states; rerun the probe with --no-resume"
        return heads_record(None, None, what, {"kind": None})
    entries = [
        entry
        for n, result in results.items()
        for seed, state in zip(seeds, result.heads["states"], strict=True)
        for entry in state.entries(layer_prefix(n, seed))
    ]
    apply = {
        "kind": TOKEN,
        "head": head,
        "layers": list(results),
        "seeds": seeds,
        "best_lr": {n: float(r.best_lr) for n, r in results.items()},
        "best_epochs": {n: list(r.per_lr[r.best_lr]["best_epochs"]) for n, r in results.items()},
        "token_norm": norm,
        "depth": depth if head == "deit" else None,
        "in_dim": {n: specs[n].dim for n in results},
        "tokens": {n: specs[n].num_tokens for n in results},
        "grid": {n: None if specs[n].grid is None else list(specs[n].grid) for n in results},
    }
    what = (
        f"{head} heads of layer {', '.join(map(str, results))}: each of the {len(seeds)} seeds at the best LR, at its "
        "best val epoch (every parameter, float32)"
    )
    return save_heads(folder / HEADS, entries, reader, what, apply)


def _resume_point(position: dict, epochs: int, n_passes: int) -> str:
    """Where a checkpoint left the grid: the next (pass, epoch) it recorded, in words."""
    p, epoch = int(position.get("pass", 0)), int(position.get("epoch", 0))
    if p >= n_passes:
        return "from its checkpoint: every epoch was done"
    of_passes = f" of pass {p + 1} of {n_passes}" if n_passes > 1 else ""
    return f"after epoch {epoch} of {epochs}{of_passes}"


def _paper_tokens(reader: CacheReader, layers: list, norm: str) -> bool:
    """Whether the head read what the paper's DeiT head reads (Table 1's input): ``paper`` tokens, or the last
    layer's patch tokens under the model's own rule (the same numbers for the pre-/post-norm rules)."""
    if layers == [PAPER_TOKENS]:
        return True
    rule = reader.manifest["model"].get("head_tokens")
    want = {"prenorm": "none", "final": "final"}.get(rule or "")
    return layers == [reader.num_layers] and want is not None and norm == want


def _write_vs_layer(folder: Path, stem: str, head: str, per_layer: dict, metric: str, plots: bool) -> None:
    """The decapitation curve: best-LR test metric (mean ± std over seeds) per layer, as CSV and PNG."""
    rows = [
        {
            "layer": n,
            "best_lr": e["best_lr"],
            "metric": metric,
            "val_mean": e["val_mean"],
            "val_std": e["val_std"],
            "test_mean": e["test_mean"],
            "test_std": e["test_std"],
        }
        for n, e in per_layer.items()
    ]
    atomic_write_bytes(folder / f"{stem}_vs_layer.csv", csv_bytes(rows))
    if plots:
        plot_probe_vs_layer(
            folder / f"{stem}_vs_layer.png",
            per_layer,
            metric,
            title=f"{head} head per layer (decapitation)",
            xlabel="foundation layer whose tokens feed the head",
        )
