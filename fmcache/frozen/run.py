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
from fmcache.results import plot_knn_vs_k, plot_knn_vs_layer, plot_probe_curves, plot_probe_vs_layer, write_results
from fmcache.training import fit_warmup, paper_warmup

EVAL_SPLITS = ("val", "test")
VIEWS_IGNORED = "k-NN ignores the cache's {k} augmented views per train image: bank and queries are center crops"


def results_dir(reader: CacheReader, out: Path) -> Path:
    safe_model = reader.model.replace(":", "_").replace("/", "_")
    return Path(out) / reader.dataset / safe_model / reader.key[:12]


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


def _settings_header(reader: CacheReader, **settings) -> dict:
    import fmcache

    return {
        "fmcache_version": fmcache.__version__,
        "cache": str(reader.path),
        "cache_key": reader.key,
        "dataset": reader.dataset,
        "model": reader.model,
        "weights": reader.manifest.get("weights", {}),
        "extract_s_per_img": reader.manifest.get("timings", {}).get("s_per_img"),
        "settings": settings,
    }


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
    """Weighted k-NN (train split as the bank) for each requested layer; writes knn.{json,csv} and plots."""
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
        )
        per_layer[number] = result
        rows += knn_rows(result, layer=number, pool="+".join(pools))
    folder = results_dir(reader, out)
    payload = _settings_header(reader, ks=list(ks), temperature=temperature, layers=layers, pool=pools, metric=metric)
    payload.update({"layers": per_layer, "total_seconds": time.perf_counter() - start})
    if reader.views_k:  # the bank and the queries are center crops; augmented views are for trained heads
        payload["views"] = VIEWS_IGNORED.format(k=reader.views_k)
    write_results(folder, "knn", payload, rows)
    if plots:
        plot_knn_vs_k(folder / "knn_vs_k.png", per_layer[layers[-1]])
    if plots and len(layers) > 1:
        plot_knn_vs_layer(folder / "knn_vs_layer.png", per_layer)
    return {"folder": folder, "metric": metric, "layers": per_layer, "rows": rows, "views_note": payload.get("views")}


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

    ``views`` on (the default when the cache has augmented views) trains every head on one cached view per train
    sample per epoch (:mod:`fmcache.frozen.views`); off, or a cache without views, trains on the center crops.

    ``standardize`` z-scores features with train-split statistics first (as a non-affine BatchNorm in MAE's
    linear probe): feature scales differ by orders of magnitude across models and layers, and one LR grid must
    serve them all.
    """
    from fmcache.frozen.linear import fit_sklearn_reference, train_linear_grid

    if head != "linear":
        raise FmcacheError(f"unknown --head '{head}'; this version trains linear heads (use --head linear)")
    metric = dataset_metric(reader, metric)
    layers = resolve_layers(reader, layer)
    pools = resolve_pool(reader, pool, layers)
    if batch_size < 1 or epochs < 1:
        raise FmcacheError(f"--batch-size and --epochs must be at least 1, got {batch_size} and {epochs}")
    if sklearn and reader.multilabel:
        raise FmcacheError("--sklearn fits a single-label LogisticRegression; it does not apply to multi-label data")
    from fmcache.frozen.views import pooled_views, use_views

    with_views = use_views(reader, views)
    source = FeatureSource(reader, layers, pools)
    warmup = fit_warmup(paper_warmup(reader.dataset), epochs, len(reader.rows("train")), batch_size)
    folder = results_dir(reader, out)
    per_layer, rows = {}, []
    for number in layers:
        data = [(source.get(s, number), reader.labels(s)) for s in ("train", "val", "test")]
        train_views = pooled_views(reader, number, pools) if with_views else None
        if standardize and train_views is not None:
            # the center crops' train statistics, so val and test are scaled exactly as with --views off
            mean, std = train_stats(data[0][0])
            train_views = ((train_views - mean) / std).astype(np.float32)
        if standardize:
            data = standardize_splits(data)
        heads = len(lrs) * (seeds if isinstance(seeds, int) else len(seeds))
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
        rows += [{"layer": number, "pool": "+".join(pools), **r} for r in result.rows()]
        suffix = "" if len(layers) == 1 else f"_layer{number:02d}"
        if plots:
            plot_probe_curves(folder / f"probe_linear_curves{suffix}.png", result.curves, metric=f"val {metric}")
    payload = _settings_header(reader, head=head, lrs=list(lrs), seeds=seeds, epochs=epochs, batch_size=batch_size,
                               layers=layers, pool=pools, metric=metric, weight_decay=weight_decay,
                               schedule=schedule, standardize=standardize, **warmup)  # fmt: skip
    payload["settings"]["views"] = {"used": with_views, "k": reader.views_k if with_views else 0}
    payload["layers"] = per_layer
    write_results(folder, "probe_linear", payload, rows)
    if plots and len(layers) > 1:
        plot_probe_vs_layer(folder / "probe_linear_vs_layer.png", per_layer, metric)
    views_used = payload["settings"]["views"]
    return {"folder": folder, "metric": metric, "layers": per_layer, "rows": rows, "views": views_used}


def _cache_summary(reader: CacheReader) -> dict:
    return {"cache": str(reader.path), "cache_key": reader.key, "dataset": reader.dataset, "model": reader.model}


def cka_dir(a: CacheReader, b: CacheReader | None, out: Path) -> Path:
    """Self-CKA sits beside the cache's other protocols; A × B gets a folder named after B, so runs never collide."""
    folder = results_dir(a, out)
    if b is None:
        return folder
    return folder / f"cka_vs_{b.model.replace(':', '_').replace('/', '_')}_{b.key[:12]}"


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
    """Linear CKA of the layers of one cache (every pair) or of two caches (A × B); writes cka.{json,csv} and a heatmap.

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
    settings = {"layers": sel_a.labels, "layers_b": labels_b, "pool": sel_a.pool,
                "pool_b": (sel_b or sel_a).pool, "split": split, "estimator": estimator, "debiased": debiased,
                "batch_size": batch_size if estimator == "minibatch" else None, "device": str(dev)}  # fmt: skip
    payload = _settings_header(reader, **settings)
    payload.update(
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
    folder = cka_dir(reader, reader_b, out)
    write_results(folder, "cka", payload, rows)
    if plots:
        model_b = (reader_b or reader).model
        kind = "debiased" if debiased else "biased"
        plot_cka_heatmap(
            folder / "cka_heatmap.png", matrix, sel_a.labels, labels_b,
            title=f"linear CKA ({kind}, {estimator}), {split}, n={result['n']}",
            ylabel=f"{reader.model} layer ({sel_a.pool})", xlabel=f"{model_b} layer ({(sel_b or sel_a).pool})",
        )  # fmt: skip
    return {"folder": folder, "matrix": matrix, "rows": rows, "n": result["n"], "row_layers": sel_a.labels,
            "col_layers": labels_b, "estimator": estimator, "debiased": debiased}  # fmt: skip
