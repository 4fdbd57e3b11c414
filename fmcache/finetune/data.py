"""What a fine-tune run reads: images with the train augmentation and the eval transform, or a cache's layer-K
tokens (``--from-cache``), with what the run key records about them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmcache.errors import FmcacheError
from fmcache.finetune.build import extract_spec
from fmcache.finetune.loop import Labelled
from fmcache.finetune.spec import FinetuneSpec, parse_freeze
from fmcache.metrics import check_metric
from fmcache.models import get_spec


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
    source: str = "images"  # where the pixels came from (result details.data_source): images, or pixels:<key>
    batches: object | None = None  # --augment device: the loop's per-batch transform (finetune.pixels.DeviceBatches)
    hints: list[str] = field(default_factory=list)  # said at the start, not stored in the result
    # the report's evidence: each sample's independent unit and metadata columns, looked up by the ids the
    # predictions carry; the unit's name and the label policy the labels went through
    annotate: Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]] | None = None
    group_unit: str | None = None
    label_policy: dict | None = None

    def sample_facts(self, ids: np.ndarray) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """(groups, metadata columns) of the samples ``ids``; (None, {}) when the source keeps none."""
        return (None, {}) if self.annotate is None else self.annotate(np.asarray(ids, dtype=np.int64))


def index_facts(index) -> Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Look-ups by global index position (the online path's ids) into a dataset index."""
    groups = index.groups()
    return lambda ids: (groups[ids], {name: column[ids] for name, column in index.metadata.items()})


def cache_facts(reader) -> Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]] | None:
    """Look-ups by sample id into a cache's annotations; None for a cache made before 0.4 (it keeps none)."""
    splits = [s for s in ("train", "val", "test") if reader.groups(s) is not None]
    if not splits:
        return None
    ids = np.concatenate([reader.ids(s) for s in splits])
    order = np.argsort(ids, kind="stable")
    groups = np.concatenate([reader.groups(s) for s in splits])
    metadata = {name: np.concatenate([reader.metadata(s)[name] for s in splits]) for name in reader.metadata(splits[0])}

    def lookup(wanted: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        rows = order[np.searchsorted(ids, wanted, sorter=order)]
        return groups[rows], {name: column[rows] for name, column in metadata.items()}

    return lookup


def online_data(spec: FinetuneSpec) -> Data:
    """Images with the train augmentation (train) and the eval transform (val/test), as PROTOCOLS.md."""
    from fmcache.data import (
        build_transform,
        default_metric,
        load_dataset,
        train_augmentation,
    )  # deferred: torchvision
    from fmcache.data.describe import empty_split_warning  # deferred: torchvision
    from fmcache.data.registry import check_gray_for  # deferred: torchvision
    from fmcache.extract.plan import resolve_norm  # deferred: h5py, torchvision
    from fmcache.finetune.pixels import image_data_path  # deferred: h5py

    ex = extract_spec(spec, spec.dataset, Path(spec.data_root))
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
    fingerprint = index.fingerprint()
    # images or a pixel cache, the augmentation in the loader or on the device (fmcache.finetune.pixels)
    path = image_data_path(
        spec, index, positions, {"train": train_tf, "eval": eval_tf}, eval_desc, (mean, std), img_size, fingerprint
    )
    splits = {s: Labelled(path.splits[s], index.labels) for s in ("train", "val", "test")}
    identity = {
        "dataset": index.name,
        "fingerprint": fingerprint,
        "labels": index.labels_fingerprint(),
        "split": index.split_info,
        "options": index.options,
        "limit": spec.limit,
        "transform": {**eval_desc, "norm_source": norm_source},
    }
    metric = check_metric(spec.metric) if spec.metric else default_metric(index)
    data = Data(splits, index.name, list(index.class_names), bool(index.multilabel), metric, img_size, identity)
    data.source, data.batches, data.hints = path.source, path.batches, path.hints
    data.annotate, data.group_unit = index_facts(index), index.group_unit
    if index.options.get("uncertain") is not None:  # the loader applied it: images carry no raw annotations here
        data.label_policy = {"uncertain": index.options["uncertain"], "applied": "stage one"}
    return data


def cached_data(spec: FinetuneSpec) -> tuple[Data, object]:
    """Layer-K tokens of a cache (K = --freeze): the same model and weights identity, or refused."""
    from fmcache.cache.reader import CacheReader  # deferred: h5py
    from fmcache.extract.plan import weights_identity  # deferred: h5py, torchvision
    from fmcache.frozen.common import resolve_metric  # deferred: h5py

    freeze = parse_freeze(spec.freeze)
    if not isinstance(freeze, int) or freeze < 1:
        raise FmcacheError("--from-cache needs --freeze K (K >= 1): the cached layer-K tokens feed block K+1")
    # the label policy is stage two's: the cache keeps the raw annotations (fmcache.labels)
    reader = CacheReader(spec.from_cache, uncertain=spec.dataset_options.get("uncertain"))
    inputs = reader.manifest.get("inputs", {})
    cached_model = inputs.get("model", {})
    if reader.model != get_spec(spec.model).name:
        raise FmcacheError(f"cache {reader.path} holds {reader.model}, not {spec.model}; extract {spec.model} first")
    mine = weights_identity(extract_spec(spec, reader.dataset, Path(reader.manifest["dataset"]["root"])))
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
    data.source = f"tokens:{reader.key}"
    data.annotate, data.group_unit, data.label_policy = cache_facts(reader), reader.group_unit, reader.label_policy
    return data, reader
