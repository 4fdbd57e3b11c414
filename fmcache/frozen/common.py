"""What every stage-two runner asks of its cache first: the metric, the result folder, the result source, and (for
trained heads) whether the cached augmented views are used and the paper's warmup for the dataset."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fmcache import metrics
from fmcache.cache.reader import CacheReader
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes, ensure_writable_dir
from fmcache.frozen.subsets import Subset
from fmcache.label_efficiency import label_efficiency_folder, label_efficiency_rows
from fmcache.plots import plot_label_efficiency
from fmcache.results import (
    RESULT_JSON,
    SUBSETS,
    ResultSource,
    base_settings,
    csv_bytes,
    npz_bytes,
    result_folder,
    safe_name,
    to_jsonable,
)
from fmcache.training import batch_starts, fit_warmup, paper_warmup

EVAL_SPLITS = ("val", "test")


def resolve_metric(reader: CacheReader, metric: str | None) -> str:
    """``metric`` if given, else the metric the cache's manifest records for its dataset (extract wrote it)."""
    if metric:
        return metrics.check_metric(metric)
    recorded = reader.manifest["dataset"].get("metric")
    if not recorded:
        raise FmcacheError(
            f"cache {reader.path} records no dataset metric (it predates that record); pass --metric, or remove the "
            "cache folder and run the same extract again"
        )
    return metrics.metric_for_labels(recorded, reader.multilabel, owner=f"dataset {reader.dataset!r}")


def results_dir(reader: CacheReader, out: Path) -> Path:
    """The cache's folder of results, ``<out>/<dataset>/<model>/<key12>``; each evaluation has a subfolder in it."""
    return Path(out) / safe_name(reader.dataset) / safe_name(reader.model) / reader.key[:12]


def protocol_dir(reader: CacheReader, out: Path, protocol: str, settings: dict) -> Path:
    """``<out>/<dataset>/<model>/<key12>/<protocol>-<settings_hash12>``: one folder per evaluation and settings."""
    return result_folder(out, reader.dataset, reader.model, reader.key, protocol, settings)


def result_source(reader: CacheReader, splits: tuple[str, ...] = EVAL_SPLITS) -> ResultSource:
    """The results contract's view of a cache: identity, extraction time per image, the splits' ids and labels."""
    return ResultSource(
        dataset=reader.dataset, model=reader.model, cache_key=reader.key,
        weights=reader.manifest.get("weights", {}),
        extract_seconds_per_image=reader.manifest.get("timings", {}).get("s_per_img"),
        ids={s: reader.ids(s) for s in splits}, labels={s: reader.labels(s) for s in splits},
        split=reader.manifest.get("inputs", {}).get("dataset", {}).get("split"),
        img_size=reader.manifest.get("model", {}).get("img_size"),
    )  # fmt: skip


def views_and_warmup(
    reader: CacheReader, views: str | None, epochs: int, batch_size: int, drop_last: bool, n_train: int | None = None
) -> tuple[bool, dict]:
    """What every trained head grid resolves first: whether ``--views`` is used (:mod:`fmcache.frozen.views`), and
    the paper's warmup for the dataset, fitted to this run's length (``warmup_epochs`` or ``warmup_iters``);
    ``n_train`` is a train subset's size (default: the whole train split)."""
    from fmcache.frozen.views import use_views

    with_views = use_views(reader, views)
    n_train = len(reader.rows("train")) if n_train is None else n_train
    batch_starts(n_train, batch_size, drop_last)  # a train split smaller than one batch fails here, before any write
    return with_views, fit_warmup(paper_warmup(reader.dataset), epochs, n_train, batch_size, drop_last)


def is_paper_feature(reader: CacheReader, layers: list[int], pools: list[str]) -> bool:
    """Whether a pooled read is the paper's feature: the last layer, and ``paper`` or the kind the paper pools
    (CLS after the final norm, or the patch mean), which the cache stores as the same numbers (Table 1's input)."""
    kind = reader.manifest["model"].get("pooled_kind")
    return layers == [reader.num_layers] and (pools == ["paper"] or (kind in ("cls", "mean") and pools == [kind]))


# -- label efficiency (--train-fraction / --train-per-class): what every runner does with its subsets ---------------


def _subset_plan(reader: CacheReader, spec) -> list[Subset] | None:
    """The spec's subsets, every one drawn and checked before any run; None for a plain run (no subset option)."""
    from fmcache.frozen.subsets import plan

    if spec.train_fraction is None and spec.train_per_class is None:
        return None
    return plan(reader.labels("train"), reader.labels("val"), reader.class_names, reader.multilabel,
                spec.train_fraction or (), spec.train_per_class or (), spec.subset_repeats,
                spec.val_fraction_follows)  # fmt: skip


def over_subsets(reader: CacheReader, spec, protocol: str, run_one: Callable[[Subset | None], dict], log) -> dict:
    """A runner's whole answer: ``run_one(None)`` for a plain run; with ``--train-fraction``/``--train-per-class``,
    ``run_one`` per planned subset (all drawn and checked first), then the label-efficiency curve."""
    subsets = _subset_plan(reader, spec)
    if subsets is None:
        return run_one(None)
    folders = [run_one(subset)["folder"] for subset in subsets]
    return finish_label_efficiency(reader, spec, protocol, folders, subsets, log)


def rows_of(subset: Subset | None, split: str) -> np.ndarray | None:
    """A split's positions under ``subset`` (train, or val when it follows); None: every row, as a plain run."""
    if subset is None:
        return None
    return subset.train if split == "train" else subset.val if split == "val" else None


def take(values: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """``values`` at ``rows`` (None: all of them, the array itself, so a plain run's input is untouched)."""
    return values if rows is None else values[rows]


def subset_settings(subset: Subset | None) -> dict:
    """What a subset adds to the folder-naming settings: nothing for a plain run, so its folder keeps its name."""
    return {} if subset is None else subset.settings()


def subset_drop_last(subset: Subset | None, batch_size: int, drop_last: bool, log) -> bool:
    """A subset smaller than one batch trains on itself as one batch per epoch: drop_last would drop it all."""
    if subset is None or not drop_last or len(subset.train) >= batch_size:
        return drop_last
    log(f"note: subset {subset.tag()} has {len(subset.train)} train samples, fewer than the batch size "
        f"{batch_size}: one batch of all of them per epoch (drop_last does not apply)")  # fmt: skip
    return False


def subset_source(source: ResultSource, subset: Subset | None) -> ResultSource:
    """The result source of a run on ``subset``: val ids and labels cut to the subset when val follows."""
    rows = rows_of(subset, "val")
    if rows is None or "val" not in source.ids:
        return source
    ids, labels = dict(source.ids), dict(source.labels)
    ids["val"], labels["val"] = ids["val"][rows], labels["val"][rows]
    return dataclasses.replace(source, ids=ids, labels=labels)


def write_subset(folder: Path, reader: CacheReader, subset: Subset | None) -> dict:
    """``subsets.npz`` in a subset run's folder (positions and sample ids, so anyone can re-run exactly these rows)
    and the facts ``result.json`` records about it; nothing for a plain run."""
    if subset is None:
        return {}
    arrays = {"train_rows": subset.train, "train_ids": reader.ids("train")[subset.train]}
    if subset.val is not None:
        arrays.update(val_rows=subset.val, val_ids=reader.ids("val")[subset.val])
    atomic_write_bytes(folder / SUBSETS, npz_bytes(arrays))
    facts = {"n_train": len(subset.train), "n_train_split": len(reader.rows("train")), "file": SUBSETS}
    if not reader.multilabel:
        labels = reader.labels("train")[subset.train].astype(np.int64)
        facts["train_per_class"] = np.bincount(labels, minlength=len(reader.class_names)).tolist()
    if subset.val is not None:
        facts["n_val"] = len(subset.val)
    return {"subset": facts}


def finish_label_efficiency(reader: CacheReader, spec, protocol: str, folders: list[Path], subsets: list[Subset],
                            log) -> dict:  # fmt: skip
    """After every subset run of a curve: its ``label_efficiency/`` folder (CSV, PNG, all subsets, JSON last), and
    the runner's answer: ``folder`` is the last run's (the grid's ledger records it; it is written last, so it is
    complete only when every run is), ``folders`` every run's."""
    docs = [json.loads((Path(f) / RESULT_JSON).read_text()) for f in folders]
    curve = {"train_fraction": spec.train_fraction, "train_per_class": spec.train_per_class,
             "subset_repeats": spec.subset_repeats, "val_fraction_follows": spec.val_fraction_follows}  # fmt: skip
    settings = {**base_settings(docs[0]), "label_efficiency": curve}
    folder = ensure_writable_dir(label_efficiency_folder(spec.out, reader.dataset, reader.model, reader.key, protocol,
                                                         settings))  # fmt: skip
    (folder / "label_efficiency.json").unlink(missing_ok=True)  # written last: its presence vouches for the rest
    rows = label_efficiency_rows(docs)
    atomic_write_bytes(folder / "label_efficiency.csv", csv_bytes(rows))
    arrays = {}
    for s in subsets:
        arrays[f"{s.tag()}_train_rows"], arrays[f"{s.tag()}_train_ids"] = s.train, reader.ids("train")[s.train]
        if s.val is not None:
            arrays[f"{s.tag()}_val_rows"], arrays[f"{s.tag()}_val_ids"] = s.val, reader.ids("val")[s.val]
    atomic_write_bytes(folder / SUBSETS, npz_bytes(arrays))
    metric = docs[0]["metric"]
    if spec.plots:
        lines: dict[str, list] = {}
        for row in rows:
            lines.setdefault(f"{protocol} layer {row['layer']}", []).append(row)
        plot_label_efficiency(folder / "label_efficiency.png", lines, metric,
                              f"{reader.dataset}, {reader.model}: {protocol}")  # fmt: skip
    document = {"protocol": protocol, "dataset": reader.dataset, "model": reader.model, "cache_key": reader.key,
                "metric": metric, "settings": settings, "rows": rows, "folders": [str(f) for f in folders]}  # fmt: skip
    atomic_write_bytes(folder / "label_efficiency.json", (json.dumps(to_jsonable(document), indent=2) + "\n").encode())
    log(f"label efficiency: {len(folders)} runs; curve in {folder}")
    return {"folder": folders[-1], "folders": folders, "label_efficiency": folder, "rows": rows, "metric": metric,
            "protocol": protocol}  # fmt: skip
