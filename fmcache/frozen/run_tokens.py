"""Runner of ``fmcache probe --head deit|attentive``: token heads per cached layer, results beside the linear probe's.

Each run gets its own folder, ``<out>/<dataset>/<model>/<key12>/probe_<head>-<settings_hash12>/`` (``fmcache.results``),
with ``result.json`` (the linear probe's schema under ``details``: per LR × seed val curve, best epoch, test at best;
best LR by mean val; test mean ± std; timings), ``result.csv``, ``predictions.npz``, per-LR curves, and with several
layers ``probe_<head>_vs_layer.csv/png`` (the decapitation study, the paper's Fig. 5). Checkpoints go to
``checkpoints/`` in the same folder, so a rerun with the same settings resumes them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.cache.reader import CacheReader
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes
from fmcache.frozen.heads import DEIT_DEPTH, HEADS, deit_pretrained_state
from fmcache.frozen.run import dataset_metric, grid_views_and_warmup, protocol_dir, write_grid_result
from fmcache.frozen.tokens import (
    GridConfig,
    TokenSplit,
    check_token_layers,
    layer_spec,
    should_preload,
    token_norm_for,
    train_token_grid,
)
from fmcache.progress import progress_bar
from fmcache.results import csv_bytes, new_figure, plot_probe_curves, save_png, start_result
from fmcache.training import check_checkpoint, lr_multiplier, pick_device

EVAL = ("train", "val", "test")


def checkpoint_path(folder: Path, head: str, layer: int) -> Path:
    return folder / "checkpoints" / f"probe_{head}_layer{layer:02d}.pt"


def _head_source(head: str, head_weights: str | None, random_init: bool, depth: int):
    """(pretrained tensors or None, the record of where the head's weights came from); checks before any work."""
    if head == "attentive":
        if head_weights is not None:
            raise FmcacheError("--head-weights applies to --head deit; the attentive head has no pretrained weights")
        return None, {"source": "random", "seeded": "per seed"}
    if not 1 <= depth <= DEIT_DEPTH:
        raise FmcacheError(f"--head-depth must lie in 1..{DEIT_DEPTH} (DeiT-B's blocks), got {depth}")
    if random_init:
        if head_weights is not None:
            raise FmcacheError("pass either --head-weights or --head-random-init, not both")
        return None, {"source": "random", "seeded": "per seed", "depth": depth}
    state, info = deit_pretrained_state(head_weights or "imagenet", depth)
    return state, info


def run_token_probe(
    reader: CacheReader,
    out: Path = Path("results"),
    head: str = "deit",
    lrs: Sequence[float] = (1e-5, 3e-5, 1e-4, 1e-3),
    seeds: int | Sequence[int] = 5,
    epochs: int = 100,
    batch_size: int = 64,
    layer: str = "last",
    metric: str | None = None,
    weight_decay: float = 1e-5,
    schedule: str = "constant",
    head_weights: str | None = None,
    head_random_init: bool = False,
    head_depth: int = DEIT_DEPTH,
    token_norm: str = "seed",
    preload: str = "auto",
    heads_per_pass: int = 0,
    resume: bool = True,
    workers: int = 2,
    device: str | None = None,
    progress: bool = False,
    plots: bool = True,
    views: str | None = None,
) -> dict:
    """Token heads (``deit`` or ``attentive``) for the LR × seed grid on each requested cached token layer."""
    if head not in HEADS:
        raise FmcacheError(f"unknown --head '{head}'; use linear, {' or '.join(HEADS)}")
    metric = dataset_metric(reader, metric)
    layers = check_token_layers(reader, layer)
    norm = token_norm_for(reader, token_norm)
    if batch_size < 1 or epochs < 1 or heads_per_pass < 0 or workers < 0:
        raise FmcacheError("--batch-size and --epochs must be at least 1, --heads-per-pass and --workers at least 0")
    lr_multiplier(0, 1, 0, schedule)  # an unknown schedule fails before any work
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise FmcacheError("give at least one seed (--seeds N)")
    specs = {n: layer_spec(reader, n, norm, head) for n in layers}
    loads = {n: should_preload(reader, n, preload) for n in layers}
    dev = pick_device(device)
    with_views, warmup = grid_views_and_warmup(reader, views, epochs, batch_size)
    pretrained, weights_info = _head_source(head, head_weights, head_random_init, head_depth)
    weights_record = {k: v for k, v in weights_info.items() if k in ("source", "hub_id", "sha256", "depth")}
    stem = f"probe_{head}"
    # what names the folder: every setting that changes the numbers (not passes, preload, workers or device, which
    # only change how they are computed; the checkpoint still records those and refuses a resume across them)
    settings = {"head": head, "lrs": [float(x) for x in lrs], "seeds": seed_list, "epochs": epochs,
                "batch_size": batch_size, "layers": layers, "metric": metric, "weight_decay": weight_decay,
                "schedule": schedule, **warmup, "token_norm": norm,
                "head_weights": weights_record,
                "head_depth": head_depth if head == "deit" else None,
                "views": {"used": with_views, "k": reader.views_k if with_views else 0}}  # fmt: skip
    folder = protocol_dir(reader, out, stem, settings)
    common = {"cache_key": reader.key, "head": head, "lrs": [float(x) for x in lrs], "seeds": seed_list,
              "epochs": epochs, "batch_size": batch_size, "weight_decay": weight_decay, "schedule": schedule,
              "warmup": warmup, "metric": metric, "head_weights": weights_record,
              "head_depth": head_depth if head == "deit" else None,
              "token_norm": norm, "heads_per_pass": heads_per_pass, "device": dev.type,
              "views": reader.views_k if with_views else 0}  # fmt: skip
    ckpt_settings = {n: {**common, "layer": n} for n in layers}
    if resume:  # refuse a mismatched checkpoint before anything is trained or written
        for n in layers:
            check_checkpoint(checkpoint_path(folder, head, n), ckpt_settings[n])
    start_result(folder)
    per_layer, rows, read_info, predictions = {}, [], {}, None
    n_heads = len(lrs) * len(seed_list)
    for n in layers:
        t0 = time.perf_counter()
        splits = [TokenSplit(reader, s, n, loads[n], workers, with_views and s == "train") for s in EVAL]
        read_info[n] = {"preloaded": loads[n], "read_seconds": time.perf_counter() - t0}
        cfg = GridConfig(head, list(lrs), seed_list, len(reader.class_names), metric, reader.multilabel, epochs,
                         batch_size, weight_decay, warmup, schedule, 1.0, head_depth, heads_per_pass,
                         reader.class_names if reader.multilabel else None)  # fmt: skip
        with progress_bar(progress, epochs * max(1, -(-n_heads // (heads_per_pass or n_heads))), f"layer {n}",
                          f"{head} {n_heads} heads, layer {n}", "epoch/s") as advance:  # fmt: skip
            result = train_token_grid(
                specs[n], *splits, cfg, dev, pretrained, checkpoint_path(folder, head, n), ckpt_settings[n], resume,
                on_epoch=lambda _: advance(1),
            )  # fmt: skip
        entry = result.to_dict()
        entry["timings"]["token_read"] = read_info[n]
        per_layer[n] = entry
        predictions = result.predictions  # the last layer's is the headline, as the linear probe
        rows += [{"layer": n, "head": head, **r} for r in result.rows()]
        suffix = "" if len(layers) == 1 else f"_layer{n:02d}"
        if plots:
            plot_probe_curves(folder / f"{stem}_curves{suffix}.png", result.curves, metric=f"val {metric}")
    if len(layers) > 1:
        _write_vs_layer(folder, stem, head, per_layer, metric, plots)
    details = {"cache": str(reader.path), "token_norm_option": token_norm, "head_weights": weights_info,
               "head_random_init": weights_info["source"] == "random", "heads_per_pass": heads_per_pass,
               "device": dev.type, "layers": per_layer}  # fmt: skip
    write_grid_result(reader, folder, stem, settings, metric, per_layer, rows, predictions, details)
    return {"folder": folder, "metric": metric, "layers": per_layer, "rows": rows, "head": head,
            "head_weights": weights_info}  # fmt: skip


def _write_vs_layer(folder: Path, stem: str, head: str, per_layer: dict, metric: str, plots: bool) -> None:
    """The decapitation curve: best-LR test metric (mean ± std over seeds) per layer, as CSV and PNG."""
    rows = [
        {"layer": n, "best_lr": e["best_lr"], "metric": metric, "val_mean": e["val_mean"], "val_std": e["val_std"],
         "test_mean": e["test_mean"], "test_std": e["test_std"]}
        for n, e in per_layer.items()
    ]  # fmt: skip
    atomic_write_bytes(folder / f"{stem}_vs_layer.csv", csv_bytes(rows))
    if not plots:
        return
    fig, (ax,) = new_figure()
    layers = [int(n) for n in per_layer]
    means = np.array([e["test_mean"] for e in per_layer.values()], dtype=np.float64)
    stds = np.array([e["test_std"] for e in per_layer.values()], dtype=np.float64)
    ax.errorbar(layers, means, yerr=np.nan_to_num(stds), marker="o", capsize=3)
    ax.set_xlabel("foundation layer whose tokens feed the head")
    ax.set_ylabel(f"test {metric} (best LR, mean ± std over seeds)")
    ax.set_title(f"{head} head per layer (decapitation)")
    save_png(fig, folder / f"{stem}_vs_layer.png")
