"""Stage two's runners: each protocol read from a cache, with results written as JSON, CSV and PNG.

Only the cache reader is used here; no model backend is imported.
"""

from __future__ import annotations

import time

import numpy as np

from fmcache.cache.reader import CacheReader
from fmcache.dist import pick_device
from fmcache.errors import FmcacheError
from fmcache.frozen.cka import compute_cka
from fmcache.frozen.cka_read import select
from fmcache.frozen.common import (
    is_paper_feature,
    label_settings,
    protocol_dir,
    resolve_metric,
    result_source,
    views_and_warmup,
)
from fmcache.frozen.features import FeatureSource, resolve_layers, resolve_pool, standardize, train_stats
from fmcache.frozen.headfiles import BANK, LinearHeads
from fmcache.frozen.knn import knn_evaluate, knn_rows
from fmcache.frozen.linear import train_linear_grid
from fmcache.frozen.sklearn_ref import fit_sklearn_reference
from fmcache.frozen.specs import CkaSpec, KnnSpec, ProbeSpec
from fmcache.frozen.subsets import (
    Subset,
    over_subsets,
    rows_of,
    subset_drop_last,
    subset_settings,
    subset_source,
    take,
    write_subset,
)
from fmcache.frozen.views import pooled_views
from fmcache.plots import plot_cka_heatmap, plot_knn_vs_k, plot_knn_vs_layer, plot_probe_curves, plot_probe_vs_layer
from fmcache.progress import progress_bar
from fmcache.results import (
    HEADS,
    heads_record,
    start_result,
    write_head_grid,
    write_result,
)
from fmcache.training import warmup_note

VIEWS_IGNORED = "k-NN ignores the cache's {k} augmented views per train image: bank and queries are center crops"


def run_knn(spec: KnnSpec, progress: bool = False, log=print) -> dict:
    """Weighted k-NN (train split as the bank) for each requested layer, into its own result folder.

    Writes ``result.csv`` (one row per layer × split × k), plots, ``predictions.npz`` (the best k on the last layer,
    chosen on val) and ``result.json`` last (``fmcache.results``). With ``--train-fraction``/``--train-per-class``,
    one such folder per (amount, repeat), the bank cut to the subset, then the curve (:func:`finish_label_efficiency`).
    """
    reader = CacheReader(spec.cache, uncertain=spec.uncertain)
    return over_subsets(reader, spec, "knn", lambda subset: _run_knn(reader, spec, subset, log), log)


def _subset_ks(ks: tuple[int, ...], subset: Subset | None, log) -> tuple[int, ...]:
    """A subset's bank may hold fewer samples than the largest k: those k run as the whole bank (said once)."""
    if subset is None or max(ks) <= len(subset.train):
        return ks
    log(
        f"note: subset {subset.tag()} has {len(subset.train)} train samples; k > {len(subset.train)} runs as "
        f"k = {len(subset.train)}"
    )
    return tuple(dict.fromkeys(min(k, len(subset.train)) for k in ks))


def _run_knn(reader: CacheReader, spec: KnnSpec, subset: Subset | None, log) -> dict:
    """One k-NN run: on the whole train split (``subset`` None, the plain run) or on a subset of it."""
    ks, temperature, splits = _subset_ks(spec.ks, subset, log), spec.temperature, list(spec.eval_splits)
    metric = resolve_metric(reader, spec.metric)
    layers = resolve_layers(reader, spec.layer)
    pools = resolve_pool(reader, spec.pool, layers)
    features = FeatureSource(reader, layers, pools)
    train_rows = rows_of(subset, "train")
    start = time.perf_counter()
    per_layer, rows = {}, []
    for number in layers:
        queries = {
            s: (take(features.get(s, number), rows_of(subset, s)), take(reader.labels(s), rows_of(subset, s)))
            for s in splits
        }
        result = knn_evaluate(
            take(features.get("train", number), train_rows),
            take(reader.labels("train"), train_rows),
            queries,
            ks,
            temperature=temperature,
            metric=metric,
            multilabel=reader.multilabel,
            num_classes=len(reader.class_names),
            label_names=reader.class_names if reader.multilabel else None,
            use_gpu=spec.use_gpu,
            keep_scores=True,
            overwrite=True,
        )
        scores = result.pop("scores")  # the protocol's payload stays JSON; scores go to predictions.npz
        if number == layers[-1]:
            last_scores = scores
        per_layer[number] = result
        rows += knn_rows(result, layer=number, pool="+".join(pools))
    settings = {
        **label_settings(reader),
        "ks": [int(k) for k in spec.ks],
        "temperature": float(temperature),
        "layers": layers,
        "pool": pools,
        "metric": metric,
        "eval_splits": splits,
        **subset_settings(subset),
    }
    folder = start_result(protocol_dir(reader, spec.out, "knn", settings))
    subset_facts = write_subset(folder, reader, subset)
    payload = {"cache": str(reader.path), "layers": per_layer, "total_seconds": time.perf_counter() - start}
    if reader.views_k:  # the bank and the queries are center crops; augmented views are for trained heads
        payload["views"] = VIEWS_IGNORED.format(k=reader.views_k)
    best = _knn_best(per_layer[layers[-1]], layers[-1])
    summary = {
        "rows": [{key: r[key] for key in ("layer", "split", "k", "temperature", "value")} for r in rows],
        "best": best,
    }
    source = subset_source(result_source(reader, tuple(splits)), subset)
    predictions = source.predictions({s: last_scores[s][best["k"]][None] for s in splits}, [-1])
    last_timings = per_layer[layers[-1]]["timings"]
    timings = source.timings(last_timings["index_seconds"], last_timings["inference_seconds_per_sample"])
    timings["total_seconds"] = payload["total_seconds"]
    if spec.plots:
        plot_knn_vs_k(folder / "knn_vs_k.png", per_layer[layers[-1]])
    if spec.plots and len(layers) > 1:
        plot_knn_vs_layer(folder / "knn_vs_layer.png", per_layer)
    write_result(
        folder,
        protocol="knn",
        settings=settings,
        metric=metric,
        timings=timings,
        summary=summary,
        details=payload,
        rows=rows,
        predictions=predictions,
        **source.identity(),
        extra={
            **source.facts(),
            "paper_feature": is_paper_feature(reader, layers, pools),
            "heads": knn_bank_record(best, pools, ks, temperature, len(take(reader.ids("train"), train_rows))),
            **subset_facts,
        },
    )
    return {
        "folder": folder,
        "metric": metric,
        "layers": per_layer,
        "rows": rows,
        "views_note": payload.get("views"),
        "best": best,
    }


def knn_bank_record(best: dict, pools: list[str], ks: tuple[int, ...], temperature: float, n_bank: int) -> dict:
    """k-NN's ``heads`` entry: no file (its bank is the cache's train split, the subset's rows in ``subsets.npz``
    for a label-efficiency run), and what ``fmcache transfer`` needs to rebuild it: the layer, pool, k chosen on
    val, T, and the ks searched (the search runs at the largest, so the best k's neighbours are found as here)."""
    what = (
        f"no heads: k-NN's bank is the source cache's train split ({n_bank} samples), layer {best['layer']}, pool "
        f"{'+'.join(pools)}, k {best['k']} (chosen on val), T {temperature:g}"
    )
    apply = {
        "kind": BANK,
        "layers": [best["layer"]],
        "pool": pools,
        "k": best["k"],
        "ks": [int(k) for k in ks],
        "temperature": float(temperature),
        "seeds": [-1],
        "n_bank": n_bank,
    }
    return heads_record(None, None, what, apply)


def _knn_best(result: dict, layer: int) -> dict:
    """The k with the best val metric on ``layer`` (test when val was not asked; the smallest k on ties)."""
    by_k = result["splits"].get("val") or result["splits"]["test"]
    values = {k: (-np.inf if m["value"] is None or np.isnan(m["value"]) else m["value"]) for k, m in by_k.items()}
    best_k = max(values, key=lambda k: (values[k], -int(k)))
    test = result["splits"].get("test", {}).get(best_k)
    return {
        "k": int(best_k),
        "layer": layer,
        "test": None if test is None else test["value"],
        "val": None if "val" not in result["splits"] else result["splits"]["val"][best_k]["value"],
    }


def run_probe(spec: ProbeSpec, progress: bool = False, log=print) -> dict:
    """The paper's frozen linear protocol over the whole LR × seed grid, from cached pooled features.

    Writes into its own result folder (``fmcache.results``): ``result.csv`` (one row per layer × LR × seed), curve
    plots, ``predictions.npz`` (the last layer's best LR, every seed) and ``result.json`` last.

    ``spec.views`` on (the default when the cache has augmented views) trains every head on one cached view per
    train sample per epoch (:mod:`fmcache.frozen.views`); off, or a cache without views, trains on the center crops.

    ``spec.standardize`` z-scores features with train-split statistics first (as a non-affine BatchNorm in MAE's
    linear probe): feature scales differ by orders of magnitude across models and layers, and one LR grid must
    serve them all.

    With ``--train-fraction``/``--train-per-class``, one such folder per (amount, repeat): heads train on the subset
    (its own z-score statistics and warmup), val stays full unless it follows, then the label-efficiency curve.
    """
    reader = CacheReader(spec.cache, uncertain=spec.uncertain)
    return over_subsets(
        reader, spec, "probe_linear", lambda subset: _run_probe(reader, spec, subset, progress, log), log
    )


def _run_probe(reader: CacheReader, spec: ProbeSpec, subset: Subset | None, progress: bool, log) -> dict:
    """One linear grid: on the whole train split (``subset`` None, the plain run) or on a subset of it."""
    lrs, epochs, batch_size, schedule = spec.lrs, spec.epochs, spec.batch_size, spec.schedule
    metric = resolve_metric(reader, spec.metric)
    layers = resolve_layers(reader, spec.layer)
    pools = resolve_pool(reader, spec.pool, layers)
    if spec.sklearn and reader.multilabel:
        raise FmcacheError("--sklearn fits a single-label LogisticRegression; it does not apply to multi-label data")

    drop_last = subset_drop_last(subset, batch_size, spec.drop_last, log)
    n_train = None if subset is None else len(subset.train)
    with_views, warmup = views_and_warmup(reader, spec.views, epochs, batch_size, drop_last, n_train)
    features = FeatureSource(reader, layers, pools)
    seed_list = list(spec.seeds)
    settings = {
        **label_settings(reader),
        "head": spec.head,
        "lrs": [float(lr) for lr in lrs],
        "seeds": seed_list,
        "epochs": epochs,
        "batch_size": batch_size,
        "drop_last": spec.drop_last,
        "layers": layers,
        "pool": pools,
        "metric": metric,
        "weight_decay": spec.weight_decay,
        "schedule": schedule,
        "standardize": spec.standardize,
        "best_epoch": spec.best_epoch,
        **warmup,
        "views": {"used": with_views, "k": reader.views_k if with_views else 0},
        **subset_settings(subset),
    }
    folder = start_result(protocol_dir(reader, spec.out, "probe_linear", settings))
    subset_facts = write_subset(folder, reader, subset)
    if subset_facts and warmup_note(reader.dataset, warmup):  # said in the result, not only in its settings
        subset_facts["subset"]["warmup"] = warmup_note(reader.dataset, warmup)
    per_layer, rows, predictions, kept = {}, [], None, LinearHeads(seed_list, pools, spec.standardize)
    for number in layers:
        data = [
            (take(features.get(s, number), rows_of(subset, s)), take(reader.labels(s), rows_of(subset, s)))
            for s in ("train", "val", "test")
        ]
        train_views = take(pooled_views(reader, number, pools), rows_of(subset, "train")) if with_views else None
        mean = std = None
        if spec.standardize:
            # the center crops' train statistics, for the views too: val and test are scaled exactly as with
            # --views off
            mean, std = train_stats(data[0][0])
            data = [(standardize(x, mean, std), y) for x, y in data]
            if train_views is not None:
                train_views = standardize(train_views, mean, std)
        heads = len(lrs) * len(seed_list)
        with progress_bar(
            progress, epochs, f"layer {number}", f"probe {heads} heads, layer {number}", "epoch/s"
        ) as advance:
            result = train_linear_grid(
                *data[0],
                *data[1],
                *data[2],
                lrs=lrs,
                seeds=seed_list,
                num_classes=len(reader.class_names),
                metric=metric,
                multilabel=reader.multilabel,
                epochs=epochs,
                batch_size=batch_size,
                weight_decay=spec.weight_decay,
                schedule=schedule,
                best_epoch=spec.best_epoch,
                label_names=reader.class_names if reader.multilabel else None,
                device=spec.device,
                on_epoch=lambda _: advance(1),
                train_views=train_views,
                drop_last=drop_last,
                **warmup,
            )
        entry = result.to_dict()
        kept.add(number, result, mean, std)
        if spec.sklearn:
            entry["sklearn"] = fit_sklearn_reference(*data[0], *data[1], *data[2], metric=metric)
        per_layer[number] = entry
        predictions = result.predictions  # the last layer's is the headline (summary's top level)
        rows += [{"layer": number, "pool": "+".join(pools), **r} for r in result.rows()]
        suffix = "" if len(layers) == 1 else f"_layer{number:02d}"
        if spec.plots:
            plot_probe_curves(folder / f"probe_linear_curves{suffix}.png", result.curves, metric=f"val {metric}")
    if spec.plots and len(layers) > 1:
        plot_probe_vs_layer(folder / "probe_linear_vs_layer.png", per_layer, metric)
    details = {"cache": str(reader.path), "sklearn": spec.sklearn, "layers": per_layer}
    heads_facts = kept.write(folder / HEADS, reader)  # before result.json, which vouches for it
    write_head_grid(
        folder,
        subset_source(result_source(reader), subset),
        protocol="probe_linear",
        settings=settings,
        metric=metric,
        per_layer=per_layer,
        rows=rows,
        predictions=predictions,
        details=details,
        extra={"paper_feature": is_paper_feature(reader, layers, pools), "heads": heads_facts, **subset_facts},
    )
    return {"folder": folder, "metric": metric, "layers": per_layer, "rows": rows, "views": settings["views"]}


def _cache_summary(reader: CacheReader) -> dict:
    return {"cache": str(reader.path), "cache_key": reader.key, "dataset": reader.dataset, "model": reader.model}


def cka_settings(
    a_labels,
    b_labels,
    pool_a: str,
    pool_b: str,
    split: str,
    estimator: str,
    debiased: bool,
    batch_size: int,
    reader_b: CacheReader | None,
) -> dict:
    """CKA's folder-naming settings; A × B names cache B (its full key), so each pair gets its own folder."""
    settings = {
        "layers": a_labels,
        "layers_b": b_labels,
        "pool": pool_a,
        "pool_b": pool_b,
        "split": split,
        "estimator": estimator,
        "debiased": debiased,
        "batch_size": batch_size if estimator == "minibatch" else None,
    }
    if reader_b is not None:
        settings.update(cache_b_key=reader_b.key, model_b=reader_b.model, dataset_b=reader_b.dataset)
    return settings


def run_cka(spec: CkaSpec, progress: bool = False, log=print) -> dict:
    """Linear CKA of the layers of one cache (every pair) or of two caches (A × B), into its own result folder.

    Writes ``result.csv`` (one row per layer pair), a heatmap and ``result.json`` (cache A's identity; B's key in the
    settings). No predictions.

    ``spec.estimator`` None picks exact for pooled features and minibatch for token maps. Every check runs before
    anything is written.
    """
    start = time.perf_counter()
    reader = CacheReader(spec.cache)
    reader_b = None if spec.cache_b is None else CacheReader(spec.cache_b)
    split, debiased, batch_size = spec.split, spec.debiased, spec.batch_size
    sel_a = select(reader, spec.layers, spec.pool)
    sel_b = None if reader_b is None else select(reader_b, spec.layers_b or spec.layers, spec.pool)
    estimator = spec.estimator or ("minibatch" if spec.pool == "tokens" else "exact")
    dev = pick_device(spec.device)
    result = compute_cka(sel_a, sel_b, split, estimator, debiased, batch_size, dev)
    matrix = result["matrix"]
    labels_b = sel_a.labels if sel_b is None else sel_b.labels
    rows = [
        {"layer_a": la, "layer_b": lb, "cka": float(matrix[i, j])}
        for i, la in enumerate(sel_a.labels)
        for j, lb in enumerate(labels_b)
    ]
    settings = cka_settings(
        sel_a.labels, labels_b, sel_a.pool, (sel_b or sel_a).pool, split, estimator, debiased, batch_size, reader_b
    )
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
    folder = start_result(protocol_dir(reader, spec.out, "cka", settings))
    if spec.plots:
        model_b = (reader_b or reader).model
        kind = "debiased" if debiased else "biased"
        plot_cka_heatmap(
            folder / "cka_heatmap.png",
            matrix,
            sel_a.labels,
            labels_b,
            title=f"linear CKA ({kind}, {estimator}), {split}, n={result['n']}",
            ylabel=f"{reader.model} layer ({sel_a.pool})",
            xlabel=f"{model_b} layer ({(sel_b or sel_a).pool})",
        )
    # no head is trained; "inference" is the CKA computation per sample (reads excluded)
    source = result_source(reader, ())
    timings = source.timings(None, result["timings"]["compute_seconds"] / max(1, result["n"]))
    timings.update(payload["timings"])
    summary = {"layers_a": sel_a.labels, "layers_b": labels_b, "matrix": matrix}
    write_result(
        folder,
        protocol="cka",
        settings=settings,
        metric="linear_cka",
        timings=timings,
        summary=summary,
        details=payload,
        rows=rows,
        extra=source.facts(),
        **source.identity(),
    )
    return {
        "folder": folder,
        "matrix": matrix,
        "rows": rows,
        "n": result["n"],
        "row_layers": sel_a.labels,
        "col_layers": labels_b,
        "estimator": estimator,
        "debiased": debiased,
    }
