"""What a fine-tune run reads: images with the train augmentation and the eval transform, or a cache's layer-K
tokens (``--from-cache``), with what the run key records about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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


def online_data(spec: FinetuneSpec) -> Data:
    """Images with the train augmentation (train) and the eval transform (val/test), as PROTOCOLS.md."""
    from fmcache.data import (
        ImageDataset,
        build_transform,
        default_metric,
        load_dataset,
        train_augmentation,
    )  # deferred: torchvision
    from fmcache.data.describe import empty_split_warning  # deferred: torchvision
    from fmcache.data.registry import check_gray_for  # deferred: torchvision
    from fmcache.extract.plan import resolve_norm  # deferred: h5py, torchvision

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
    splits = {
        s: Labelled(ImageDataset(index, positions[s], train_tf if s == "train" else eval_tf), index.labels)
        for s in ("train", "val", "test")
    }
    identity = {
        "dataset": index.name,
        "fingerprint": index.fingerprint(),
        "labels": index.labels_fingerprint(),
        "split": index.split_info,
        "options": index.options,
        "limit": spec.limit,
        "transform": {**eval_desc, "norm_source": norm_source},
    }
    metric = check_metric(spec.metric) if spec.metric else default_metric(index)
    return Data(splits, index.name, list(index.class_names), bool(index.multilabel), metric, img_size, identity)


def cached_data(spec: FinetuneSpec) -> tuple[Data, object]:
    """Layer-K tokens of a cache (K = --freeze): the same model and weights identity, or refused."""
    from fmcache.cache.reader import CacheReader  # deferred: h5py
    from fmcache.extract.plan import weights_identity  # deferred: h5py, torchvision
    from fmcache.frozen.common import resolve_metric  # deferred: h5py

    freeze = parse_freeze(spec.freeze)
    if not isinstance(freeze, int) or freeze < 1:
        raise FmcacheError("--from-cache needs --freeze K (K >= 1): the cached layer-K tokens feed block K+1")
    reader = CacheReader(spec.from_cache)
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
    return data, reader
