"""Stage two's runners: each protocol read from a cache, with results written as JSON, CSV and PNG.

Only the cache reader is used here; no model backend is imported.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache import metrics
from fmcache.cache.reader import CacheReader
from fmcache.errors import FmcacheError
from fmcache.frozen.features import FeatureSource, resolve_layers, resolve_pool, standardize_splits, train_stats
from fmcache.frozen.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_evaluate, knn_rows
from fmcache.progress import progress_bar
from fmcache.results import (
    plot_knn_vs_k,
    plot_knn_vs_layer,
    plot_probe_curves,
    plot_probe_vs_layer,
    probe_summary,
    result_folder,
    safe_name,
    start_result,
    write_result,
)
from fmcache.training import fit_warmup, paper_warmup

EVAL_SPLITS = ("val", "test")
VIEWS_IGNORED = "k-NN ignores the cache's {k} augmented views per train image: bank and queries are center crops"


def results_dir(reader: CacheReader, out: Path) -> Path:
    """The cache's folder of results, ``<out>/<dataset>/<model>/<key12>``; each evaluation has a subfolder in it."""
    return Path(out) / safe_name(reader.dataset) / safe_name(reader.model) / reader.key[:12]


def protocol_dir(reader: CacheReader, out: Path, protocol: str, settings: dict) -> Path:
    """``<out>/<dataset>/<model>/<key12>/<protocol>-<settings_hash12>``: one folder per evaluation and settings."""
    return result_folder(out, reader.dataset, reader.model, reader.key, protocol, settings)


def result_identity(reader: CacheReader) -> dict:
    """The contract's identity keys of a result read from ``reader`` (``fmcache.results.write_result``)."""
    return {
        "dataset": reader.dataset,
        "model": reader.model,
        "cache_key": reader.key,
        "weights": reader.manifest.get("weights", {}),
    }


def result_timings(reader: CacheReader, train_seconds: float | None, inference_s_per_sample: float | None) -> dict:
    """The contract's timings: train s, inference s/sample, and extraction s/image when the cache recorded it."""
    timings = {"train_seconds": train_seconds, "inference_seconds_per_sample": inference_s_per_sample}
    extract = reader.manifest.get("timings", {}).get("s_per_img")
    if extract is not None:
        timings["extract_seconds_per_image"] = extract
    return timings


def split_predictions(reader: CacheReader, scores: dict[str, np.ndarray], seeds: Sequence[int]) -> dict:
    """predictions.npz arrays: ``<split>_ids``, ``<split>_labels``, ``<split>_scores`` (S, n, C) and ``seeds``."""
    arrays: dict[str, np.ndarray] = {"seeds": np.asarray(list(seeds), dtype=np.int64)}
    for split, split_scores in scores.items():
        arrays[f"{split}_ids"] = reader.ids(split)
        arrays[f"{split}_labels"] = reader.labels(split)
        arrays[f"{split}_scores"] = np.asarray(split_scores, dtype=np.float32)
    return arrays


def dataset_metric(reader: CacheReader, metric: str | None) -> str:
    """``metric`` if given, else the metric the dataset names for its label kind.

    The cache records that metric at extraction; older manifests without it ask the dataset registry.
    """
    if metric:
        return metrics.check_metric(metric)
    recorded = reader.manifest["dataset"].get("metric")
    if recorded:
        return metrics.metric_for_labels(recorded, reader.multilabel, owner=f"dataset {reader.dataset!r}")
    from fmcache.data.registry import metric_for

    return metric_for(reader.dataset, reader.multilabel)


def grid_views_and_warmup(reader: CacheReader, views: str | None, epochs: int, batch_size: int) -> tuple[bool, dict]:
    """What every trained head grid resolves first: whether ``--views`` is used (:mod:`fmcache.frozen.views`), and
    the paper's warmup for the dataset, fitted to this run's length (``warmup_epochs`` or ``warmup_iters``)."""
    from fmcache.frozen.views import use_views

    with_views = use_views(reader, views)
    return with_views, fit_warmup(paper_warmup(reader.dataset), epochs, len(reader.rows("train")), batch_size)


def write_grid_result(
    reader: CacheReader, folder: Path, protocol: str, settings: dict, metric: str, per_layer: dict, rows: list,
    predictions: dict, details: dict,
) -> None:  # fmt: skip
    """A head grid's ``result.json``/CSV/predictions: train seconds summed and inference s/sample averaged over the
    layers, the summary of the seeds (``settings["seeds"]``), and the last layer's best-LR predictions."""
    train_seconds = sum(e["timings"]["train_seconds"] for e in per_layer.values())
    inference = float(np.mean([e["timings"]["inference_seconds_per_sample"] for e in per_layer.values()]))
    scores = {"val": predictions["val_scores"], "test": predictions["test_scores"]}
    write_result(
        folder, protocol=protocol, settings=settings, metric=metric,
        timings=result_timings(reader, train_seconds, inference),
        summary=probe_summary(per_layer, len(settings["seeds"])), details=details, rows=rows,
        predictions=split_predictions(reader, scores, predictions["seeds"]), **result_identity(reader),
    )  # fmt: skip


def _check_eval_splits(eval_splits: Sequence[str]) -> list[str]:
    splits = [s for s in eval_splits if s]
    # the train split is the bank: querying it would let every sample find itself
    bad = [s for s in splits if s not in ("val", "test")]
    if bad or not splits:
        raise FmcacheError(f"bad --eval '{','.join(eval_splits)}'; use val, test or val,test")
    return splits


def run_knn(
    reader: CacheReader,
    out: Path = Path("results"),
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    layer: str | int = "last",
    pool: str = "auto",
    eval_splits: Sequence[str] = EVAL_SPLITS,
    metric: str | None = None,
    use_gpu: bool | None = None,
    plots: bool = True,
) -> dict:
    """Weighted k-NN (train split as the bank) for each requested layer, into its own result folder.

    Writes ``result.csv`` (one row per layer × split × k), plots, ``predictions.npz`` (the best k on the last layer,
    chosen on val) and ``result.json`` last (``fmcache.results``).
    """
    metric = dataset_metric(reader, metric)
    layers = resolve_layers(reader, layer)
    pools = resolve_pool(reader, pool, layers)
    splits = _check_eval_splits(eval_splits)
    source = FeatureSource(reader, layers, pools)
    start = time.perf_counter()
    per_layer, rows = {}, []
    for number in layers:
        queries = {s: (source.get(s, number), reader.labels(s)) for s in splits}
        result = knn_evaluate(
            source.get("train", number),
            reader.labels("train"),
            queries,
            ks,
            temperature=temperature,
            metric=metric,
            multilabel=reader.multilabel,
            num_classes=len(reader.class_names),
            label_names=reader.class_names if reader.multilabel else None,
            use_gpu=use_gpu,
            keep_scores=True,
        )
        scores = result.pop("scores")  # the protocol's payload stays JSON; scores go to predictions.npz
        if number == layers[-1]:
            last_scores = scores
        per_layer[number] = result
        rows += knn_rows(result, layer=number, pool="+".join(pools))
    settings = {"ks": [int(k) for k in ks], "temperature": float(temperature), "layers": layers, "pool": pools,
                "metric": metric, "eval_splits": splits}  # fmt: skip
    folder = start_result(protocol_dir(reader, out, "knn", settings))
    payload = {"cache": str(reader.path), "layers": per_layer, "total_seconds": time.perf_counter() - start}
    if reader.views_k:  # the bank and the queries are center crops; augmented views are for trained heads
        payload["views"] = VIEWS_IGNORED.format(k=reader.views_k)
    best = _knn_best(per_layer[layers[-1]], layers[-1])
    summary = {
        "rows": [{key: r[key] for key in ("layer", "split", "k", "temperature", "value")} for r in rows],
        "best": best,
    }
    predictions = split_predictions(reader, {s: last_scores[s][best["k"]][None] for s in splits}, [-1])
    last_timings = per_layer[layers[-1]]["timings"]
    timings = result_timings(reader, last_timings["index_seconds"], last_timings["inference_seconds_per_sample"])
    timings["total_seconds"] = payload["total_seconds"]
    if plots:
        plot_knn_vs_k(folder / "knn_vs_k.png", per_layer[layers[-1]])
    if plots and len(layers) > 1:
        plot_knn_vs_layer(folder / "knn_vs_layer.png", per_layer)
    write_result(
        folder, protocol="knn", settings=settings, metric=metric, timings=timings, summary=summary, details=payload,
        rows=rows, predictions=predictions, **result_identity(reader),
    )  # fmt: skip
    return {"folder": folder, "metric": metric, "layers": per_layer, "rows": rows, "views_note": payload.get("views"),
            "best": best}  # fmt: skip


def _knn_best(result: dict, layer: int) -> dict:
    """The k with the best val metric on ``layer`` (test when val was not asked; the smallest k on ties)."""
    by_k = result["splits"].get("val") or result["splits"]["test"]
    values = {k: (-np.inf if m["value"] is None or np.isnan(m["value"]) else m["value"]) for k, m in by_k.items()}
    best_k = max(values, key=lambda k: (values[k], -int(k)))
    test = result["splits"].get("test", {}).get(best_k)
    return {"k": int(best_k), "layer": layer, "test": None if test is None else test["value"],
            "val": None if "val" not in result["splits"] else result["splits"]["val"][best_k]["value"]}  # fmt: skip


def run_probe(
    reader: CacheReader,
    out: Path = Path("results"),
    head: str = "linear",
    lrs: Sequence[float] = (1e-5, 3e-5, 1e-4, 1e-3),
    seeds: int | Sequence[int] = 5,
    epochs: int = 100,
    batch_size: int = 64,
    layer: str | int = "last",
    pool: str = "auto",
    metric: str | None = None,
    weight_decay: float = 1e-5,
    schedule: str = "constant",
    sklearn: bool = False,
    device: str | None = None,
    standardize: bool = True,
    progress: bool = False,
    plots: bool = True,
    views: str | None = None,
) -> dict:
    """The paper's frozen linear protocol over the whole LR × seed grid, from cached pooled features.

    Writes into its own result folder (``fmcache.results``): ``result.csv`` (one row per layer × LR × seed), curve
    plots, ``predictions.npz`` (the last layer's best LR, every seed) and ``result.json`` last.

    ``views`` on (the default when the cache has augmented views) trains every head on one cached view per train
    sample per epoch (:mod:`fmcache.frozen.views`); off, or a cache without views, trains on the center crops.

    ``standardize`` z-scores features with train-split statistics first (as a non-affine BatchNorm in MAE's
    linear probe): feature scales differ by orders of magnitude across models and layers, and one LR grid must
    serve them all.
    """
    from fmcache.frozen.linear import train_linear_grid
    from fmcache.frozen.sklearn_ref import fit_sklearn_reference

    if head != "linear":
        raise FmcacheError(f"unknown --head '{head}'; this version trains linear heads (use --head linear)")
    metric = dataset_metric(reader, metric)
    layers = resolve_layers(reader, layer)
    pools = resolve_pool(reader, pool, layers)
    if batch_size < 1 or epochs < 1:
        raise FmcacheError(f"--batch-size and --epochs must be at least 1, got {batch_size} and {epochs}")
    if sklearn and reader.multilabel:
        raise FmcacheError("--sklearn fits a single-label LogisticRegression; it does not apply to multi-label data")
    from fmcache.frozen.views import pooled_views

    with_views, warmup = grid_views_and_warmup(reader, views, epochs, batch_size)
    source = FeatureSource(reader, layers, pools)
    seed_list = list(range(seeds)) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    settings = {"head": head, "lrs": [float(lr) for lr in lrs], "seeds": seed_list, "epochs": epochs,
                "batch_size": batch_size, "layers": layers, "pool": pools, "metric": metric,
                "weight_decay": weight_decay, "schedule": schedule, "standardize": standardize, **warmup,
                "views": {"used": with_views, "k": reader.views_k if with_views else 0}}  # fmt: skip
    folder = start_result(protocol_dir(reader, out, "probe_linear", settings))
    per_layer, rows, predictions = {}, [], None
    for number in layers:
        data = [(source.get(s, number), reader.labels(s)) for s in ("train", "val", "test")]
        train_views = pooled_views(reader, number, pools) if with_views else None
        if standardize and train_views is not None:
            # the center crops' train statistics, so val and test are scaled exactly as with --views off
            mean, std = train_stats(data[0][0])
            train_views = ((train_views - mean) / std).astype(np.float32)
        if standardize:
            data = standardize_splits(data)
        heads = len(lrs) * len(seed_list)
        with progress_bar(
            progress, epochs, f"layer {number}", f"probe {heads} heads, layer {number}", "epoch/s"
        ) as advance:
            result = train_linear_grid(
                *data[0], *data[1], *data[2],
                lrs=lrs, seeds=seeds, num_classes=len(reader.class_names), metric=metric,
                multilabel=reader.multilabel, epochs=epochs, batch_size=batch_size, weight_decay=weight_decay,
                schedule=schedule, label_names=reader.class_names if reader.multilabel else None,
                device=device, on_epoch=lambda _: advance(1), train_views=train_views, **warmup,
            )  # fmt: skip
        entry = result.to_dict()
        if sklearn:
            entry["sklearn"] = fit_sklearn_reference(*data[0], *data[1], *data[2], metric=metric)
        per_layer[number] = entry
        predictions = result.predictions  # the last layer's is the headline (summary's top level)
        rows += [{"layer": number, "pool": "+".join(pools), **r} for r in result.rows()]
        suffix = "" if len(layers) == 1 else f"_layer{number:02d}"
        if plots:
            plot_probe_curves(folder / f"probe_linear_curves{suffix}.png", result.curves, metric=f"val {metric}")
    if plots and len(layers) > 1:
        plot_probe_vs_layer(folder / "probe_linear_vs_layer.png", per_layer, metric)
    details = {"cache": str(reader.path), "sklearn": sklearn, "layers": per_layer}
    write_grid_result(reader, folder, "probe_linear", settings, metric, per_layer, rows, predictions, details)
    return {"folder": folder, "metric": metric, "layers": per_layer, "rows": rows, "views": settings["views"]}


def _cache_summary(reader: CacheReader) -> dict:
    return {"cache": str(reader.path), "cache_key": reader.key, "dataset": reader.dataset, "model": reader.model}


def cka_settings(a_labels, b_labels, pool_a: str, pool_b: str, split: str, estimator: str, debiased: bool,
                 batch_size: int, reader_b: CacheReader | None) -> dict:  # fmt: skip
    """CKA's folder-naming settings; A × B names cache B (its full key), so each pair gets its own folder."""
    settings = {"layers": a_labels, "layers_b": b_labels, "pool": pool_a, "pool_b": pool_b, "split": split,
                "estimator": estimator, "debiased": debiased,
                "batch_size": batch_size if estimator == "minibatch" else None}  # fmt: skip
    if reader_b is not None:
        settings.update(cache_b_key=reader_b.key, model_b=reader_b.model, dataset_b=reader_b.dataset)
    return settings


def run_cka(
    reader: CacheReader,
    reader_b: CacheReader | None = None,
    out: Path = Path("results"),
    layers: str = "all",
    layers_b: str | None = None,
    pool: str = "auto",
    split: str = "test",
    estimator: str | None = None,
    debiased: bool = True,
    batch_size: int = 256,
    plots: bool = True,
    device: str | None = None,
) -> dict:
    """Linear CKA of the layers of one cache (every pair) or of two caches (A × B), into its own result folder.

    Writes ``result.csv`` (one row per layer pair), a heatmap and ``result.json`` (cache A's identity; B's key in the
    settings). No predictions.

    ``estimator`` None picks exact for pooled features and minibatch for token maps. Every check runs before anything
    is written.
    """
    from fmcache.frozen.cka import compute_cka, select
    from fmcache.results import plot_cka_heatmap
    from fmcache.training import pick_device

    start = time.perf_counter()
    sel_a = select(reader, layers, pool)
    sel_b = None if reader_b is None else select(reader_b, layers_b or layers, pool)
    estimator = estimator or ("minibatch" if pool == "tokens" else "exact")
    dev = pick_device(device)
    result = compute_cka(sel_a, sel_b, split, estimator, debiased, batch_size, dev)
    matrix = result["matrix"]
    labels_b = sel_a.labels if sel_b is None else sel_b.labels
    rows = [
        {"layer_a": la, "layer_b": lb, "cka": float(matrix[i, j])}
        for i, la in enumerate(sel_a.labels)
        for j, lb in enumerate(labels_b)
    ]
    settings = cka_settings(sel_a.labels, labels_b, sel_a.pool, (sel_b or sel_a).pool, split, estimator, debiased,
                            batch_size, reader_b)  # fmt: skip
    payload = dict(
        device=str(dev),
        cache_a=_cache_summary(reader),
        cache_b=_cache_summary(reader_b or reader),
        split=split,
        n=result["n"],
        row_layers=sel_a.labels,
        col_layers=labels_b,
        matrix=matrix,
        timings={**result["timings"], "total_seconds": time.perf_counter() - start},
    )
    if "batches" in result:
        payload["batches"] = result["batches"]
    folder = start_result(protocol_dir(reader, out, "cka", settings))
    if plots:
        model_b = (reader_b or reader).model
        kind = "debiased" if debiased else "biased"
        plot_cka_heatmap(
            folder / "cka_heatmap.png", matrix, sel_a.labels, labels_b,
            title=f"linear CKA ({kind}, {estimator}), {split}, n={result['n']}",
            ylabel=f"{reader.model} layer ({sel_a.pool})", xlabel=f"{model_b} layer ({(sel_b or sel_a).pool})",
        )  # fmt: skip
    # no head is trained; "inference" is the CKA computation per sample (reads excluded)
    timings = result_timings(reader, None, result["timings"]["compute_seconds"] / max(1, result["n"]))
    timings.update(payload["timings"])
    summary = {"layers_a": sel_a.labels, "layers_b": labels_b, "matrix": matrix}
    write_result(
        folder, protocol="cka", settings=settings, metric="linear_cka", timings=timings, summary=summary,
        details=payload, rows=rows, **result_identity(reader),
    )  # fmt: skip
    return {"folder": folder, "matrix": matrix, "rows": rows, "n": result["n"], "row_layers": sel_a.labels,
            "col_layers": labels_b, "estimator": estimator, "debiased": debiased}  # fmt: skip
