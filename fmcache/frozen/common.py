"""What every stage-two runner asks of its cache first: the metric, the result folder, the result source, and (for
trained heads) whether the cached augmented views are used and the paper's warmup for the dataset."""

from __future__ import annotations

from pathlib import Path

from fmcache import metrics
from fmcache.cache.reader import CacheReader
from fmcache.errors import FmcacheError
from fmcache.frozen.views import use_views
from fmcache.results import (
    ResultSource,
    result_folder,
    safe_name,
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
        dataset=reader.dataset,
        model=reader.model,
        cache_key=reader.key,
        weights=reader.manifest.get("weights", {}),
        extract_seconds_per_image=reader.manifest.get("timings", {}).get("s_per_img"),
        ids={s: reader.ids(s) for s in splits},
        labels={s: reader.labels(s) for s in splits},
        split=reader.manifest.get("inputs", {}).get("dataset", {}).get("split"),
        img_size=reader.manifest.get("model", {}).get("img_size"),
        groups={s: g for s in splits if (g := reader.groups(s)) is not None},
        meta={s: reader.metadata(s) for s in splits},
        group_unit=reader.group_unit,
        label_policy=reader.label_policy,
    )


def views_and_warmup(
    reader: CacheReader, views: str | None, epochs: int, batch_size: int, drop_last: bool, n_train: int | None = None
) -> tuple[bool, dict]:
    """What every trained head grid resolves first: whether ``--views`` is used (:mod:`fmcache.frozen.views`), and
    the paper's warmup for the dataset, fitted to this run's length (``warmup_epochs`` or ``warmup_iters``);
    ``n_train`` is a train subset's size (default: the whole train split)."""
    with_views = use_views(reader, views)
    n_train = len(reader.rows("train")) if n_train is None else n_train
    batch_starts(n_train, batch_size, drop_last)  # a train split smaller than one batch fails here, before any write
    return with_views, fit_warmup(paper_warmup(reader.dataset), epochs, n_train, batch_size, drop_last)


def label_settings(reader: CacheReader) -> dict:
    """What a result's settings say about its labels: the policy, for a dataset that has one (CheXpert's uncertain
    observations); nothing otherwise, so other datasets' folders keep their names."""
    policy = reader.label_policy
    return {} if policy is None else {"uncertain": policy["uncertain"]}


def is_paper_feature(reader: CacheReader, layers: list[int], pools: list[str]) -> bool:
    """Whether a pooled read is the paper's feature: the last layer, and ``paper`` or the kind the paper pools
    (CLS after the final norm, or the patch mean), which the cache stores as the same numbers (Table 1's input)."""
    kind = reader.manifest["model"].get("pooled_kind")
    return layers == [reader.num_layers] and (pools == ["paper"] or (kind in ("cls", "mean") and pools == [kind]))
