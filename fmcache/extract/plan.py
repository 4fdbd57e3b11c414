"""Stage one's plan: the validated request (``ExtractSpec``), what it selects, and every input of the cache key.

Everything here is decided before a model is built or a file written: the samples to cache, the normalisation,
the token layers, the weights identity, the dataset fingerprint, and so the key and the cache folder.
:func:`plan` is cheap (it reads the label files and stats the images, decodes none and builds no model), so the
grid asks it whether a cache is complete before deciding to run an extract.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmcache.cache.annotations import META
from fmcache.cache.folder import CacheFolder
from fmcache.cache.key import SCHEMA_VERSION, cache_key
from fmcache.cache.views import SEED as VIEWS_SEED
from fmcache.data import DatasetIndex, build_transform, dataset_norm, load_dataset
from fmcache.data.corruptions import parse_corruption
from fmcache.data.external import EXTERNAL
from fmcache.data.registry import check_gray_for
from fmcache.data.registry import get_spec as get_dataset_spec
from fmcache.data.transforms import (
    train_augmentation,
    train_augmentation_spec,
)
from fmcache.errors import FmcacheError
from fmcache.extract.spec import ExtractSpec, parse_tokens
from fmcache.files import sha256_file
from fmcache.labels import DEFAULT_UNCERTAIN, UNCERTAINTY
from fmcache.models import RANDOM_INIT_SEED, get_spec

DTYPES = {"fp16": np.float16, "fp32": np.float32}  # --dtype → what the shards store


def _stage_one_options(spec: ExtractSpec, log) -> dict:
    """The dataset options a cache is made with: a label policy is stage two's choice (the cache keeps the raw
    annotations and the seed's U-Zeros labels), so one cache serves every policy."""
    options = dict(spec.dataset_options)
    asked = options.get("uncertain")
    if asked is not None and asked != DEFAULT_UNCERTAIN:
        log(
            f"note: --uncertain {asked} is a stage-two choice: the cache keeps the raw annotations (and the seed's "
            f"U-Zeros labels); pass --uncertain {asked} to knn, probe or finetune --from-cache"
        )
        options["uncertain"] = DEFAULT_UNCERTAIN
    return options


def select_positions(index: DatasetIndex, limit: int | None, test_only: bool = False) -> np.ndarray:
    """Global indices to cache: all, or the first ``limit`` of each split (sorted, canonical order); only the test
    split's with ``test_only`` (a corrupted cache: it scores heads trained on the clean one)."""
    if test_only:
        test = index.indices("test")
        return np.asarray(test if limit is None else test[:limit], dtype=np.int64)
    if limit is None:
        return np.arange(len(index), dtype=np.int64)
    if limit < 1:
        raise FmcacheError(f"--limit must be at least 1, got {limit}")
    parts = [index.indices(s)[:limit] for s in ("train", "val", "test")]
    return np.sort(np.concatenate(parts)).astype(np.int64)


def resolve_norm(spec: ExtractSpec) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    if spec.norm == "model":
        model_spec = get_spec(spec.model)
        return model_spec.mean, model_spec.std, "model"
    if spec.norm == "dataset":
        norm, source = dataset_norm(spec.dataset), "dataset"
        task_source = get_dataset_spec(spec.dataset).source
        if norm is None and task_source is not None and dataset_norm(task_source) is not None:
            # an external set has no statistics of its own: it is normalised as the paper dataset whose heads it
            # scores (``fmcache transfer`` compares caches of one transform), so its features are comparable
            norm, source = dataset_norm(task_source), f"dataset:{task_source}"
        if norm is None:  # generic layouts carry no statistics of their own
            model_spec = get_spec(spec.model)
            return model_spec.mean, model_spec.std, "model"
        return norm[0], norm[1], source
    raise FmcacheError(f"unknown --norm '{spec.norm}'; use dataset or model")


def weights_identity(spec: ExtractSpec) -> dict:
    """How the weights enter the key: hub id, file sha256, or random (never silently one for another)."""
    model_spec = get_spec(spec.model)
    if spec.weights is not None and spec.random_init:
        raise FmcacheError("--weights and --random-init exclude each other; pass one")
    if spec.weights is not None:
        path = Path(spec.weights)
        if not path.is_file():
            raise FmcacheError(f"weights file {path} does not exist; check the --weights path")
        return {"source": "file", "sha256": sha256_file(path)}
    if spec.random_init:
        return {"source": "random", "seed": RANDOM_INIT_SEED}
    return {"source": "hub", "id": model_spec.hub_id}


def content_fingerprint(index: DatasetIndex, log=print) -> str:
    """sha256 over (relative path, sha256 of the bytes) of every image, in index order (``--fingerprint content``).

    Unlike the default (path, size, mtime), it catches an image edited in place that kept its size and mtime,
    and it survives a copy that resets mtimes; the price is reading every image once per run.
    """
    log(f"hashing {len(index)} image files (--fingerprint content)")

    def one(path: Path) -> str:
        try:
            return sha256_file(path)
        except OSError as exc:
            raise FmcacheError(
                f"cannot fingerprint dataset {index.name}: {path} is not readable ({exc.strerror}); "
                "restore the file or reload the dataset"
            ) from exc

    digest = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=8) as pool:  # hashlib releases the GIL; file reads overlap
        for path, file_hash in zip(index.paths, pool.map(one, index.paths), strict=True):
            digest.update(f"{index.relative(path)}\t{file_hash}\n".encode())
    return digest.hexdigest()


def key_inputs(spec: ExtractSpec, index: DatasetIndex, positions: np.ndarray, transform_desc: dict, log=print) -> dict:
    """What the key hashes, but the views: model and weights, transform, dtype, tokens, shard layout and dataset."""
    model_spec = get_spec(spec.model)
    dataset = {
        "name": index.name,
        "fingerprint": index.fingerprint() if spec.fingerprint == "stat" else content_fingerprint(index, log),
        "labels": index.labels_fingerprint(),  # the cache stores labels: a relabelled CSV needs a new cache
        "split": index.split_info,
        "options": index.options,
        "limit": spec.limit,
        "n": len(positions),
    }
    if spec.fingerprint != "stat":  # only when asked for, so every existing default key stays the same
        dataset["fingerprint_mode"] = spec.fingerprint
    return {
        "schema": SCHEMA_VERSION,
        "model": {
            "name": model_spec.name,
            "backend": model_spec.backend,
            "arch": model_spec.arch,
            "weights": weights_identity(spec),
            "arch_overrides": spec.arch_overrides,
            # a build change that moved this model's features (registry ``build``): older caches get another key
            **({"build": model_spec.build} if model_spec.build else {}),
        },
        "img_size": transform_desc.get("crop"),
        "transform": transform_desc,
        "dtype": spec.dtype,
        # only when asked for: "auto" keeps every existing key (bf16 autocast on a GPU, fp32 on a CPU, as before)
        **({"precision": spec.precision} if spec.precision != "auto" else {}),
        "layers": "all",
        "tokens": parse_tokens(spec.tokens),
        "shard_size": spec.shard_size,  # the shard layout: a resume with another size would mix two layouts
        "dataset": dataset,
    }


def views_inputs(spec: ExtractSpec, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """The key's ``views`` entry: K, and with K > 0 the seed and PROTOCOLS' train augmentation they are drawn with."""
    if not spec.views:
        return {"k": 0}
    augmentation = train_augmentation_spec(img_size, mean, std, gray=spec.gray)
    return {"k": spec.views, "seed": VIEWS_SEED, "augmentation": augmentation}


def cache_dir(cache_root: Path, dataset: str, model: str, key: str) -> Path:
    safe_model = model.replace(":", "_").replace("/", "_")
    return Path(cache_root) / dataset / safe_model / key[:12]


@dataclass
class ExtractPlan:
    """A checked request with everything decided: samples, transforms, key inputs, key and cache folder."""

    spec: ExtractSpec
    index: DatasetIndex
    positions: np.ndarray
    img_size: int
    transform: object
    transform_desc: dict
    augment: object | None  # PROTOCOLS' train augmentation for --views K (the one finetune uses), else None
    inputs: dict
    key: str
    folder: Path
    num_shards: int
    cache: CacheFolder
    # an external set (all test by design) or a corrupted test cache: its heads come from another cache
    evaluation_only: bool = False

    def split_counts(self) -> dict[str, int]:
        """Samples of each split that this run caches (after --limit)."""
        return {s: int(np.isin(self.positions, self.index.indices(s)).sum()) for s in ("train", "val", "test")}

    def shard_positions(self, shard: int) -> np.ndarray:
        size = self.spec.shard_size
        return self.positions[shard * size : (shard + 1) * size]

    def is_complete(self) -> bool:
        return self.cache.is_complete()

    def annotations(self) -> tuple[dict[str, np.ndarray], dict]:
        """The cached samples' annotations (:mod:`fmcache.cache.annotations`): arrays and the manifest's facts."""
        index, rows = self.index, self.positions
        arrays: dict[str, np.ndarray] = {"ids": rows, "split": index.split[rows], "groups": index.groups()[rows]}
        if index.raw_labels is not None:
            arrays["raw_labels"] = index.raw_labels[rows]
        arrays.update({f"{META}{name}": column[rows] for name, column in index.metadata.items()})
        facts = {
            "raw_label_names": list(index.raw_label_names),
            "group_unit": index.group_unit,
            "metadata": sorted(index.metadata),
            # CheXpert-style observations: stage two applies --uncertain to the raw labels (fmcache.labels)
            "label_policy": UNCERTAINTY if "uncertain" in index.options and index.raw_labels is not None else None,
            "class_names": list(index.class_names),
        }
        return arrays, facts


def plan(spec: ExtractSpec, log=print) -> ExtractPlan:
    """Everything about an extraction that needs no model and no decoded image: the key and the cache folder."""
    index = load_dataset(spec.dataset, spec.data_root, **_stage_one_options(spec, log))
    corruption = parse_corruption(spec.corrupt, index.name) if spec.corrupt else None
    positions = select_positions(index, spec.limit, test_only=corruption is not None)
    model_spec = get_spec(spec.model)
    img_size = int(spec.img_size or model_spec.default_img_size)
    mean, std, norm_source = resolve_norm(spec)
    check_gray_for(spec.gray, spec.dataset)
    transform, desc = build_transform(
        img_size, spec.resize, mean, std, interpolation=spec.interpolation, gray=spec.gray, corruption=corruption
    )
    transform_desc = {**desc, "norm_source": norm_source}
    inputs = key_inputs(spec, index, positions, transform_desc, log)
    inputs["views"] = views_inputs(spec, img_size, mean, std)
    augment = train_augmentation(img_size, mean, std, gray=spec.gray) if spec.views else None
    key = cache_key(inputs)
    folder = cache_dir(spec.cache_root, index.name, model_spec.name, key)
    return ExtractPlan(
        spec=spec,
        index=index,
        positions=positions,
        img_size=img_size,
        transform=transform,
        transform_desc=transform_desc,
        augment=augment,
        inputs=inputs,
        key=key,
        folder=folder,
        num_shards=max(1, -(-len(positions) // spec.shard_size)),
        cache=CacheFolder(folder, key, verify=spec.verify, log=log),
        evaluation_only=corruption is not None or index.split_info.get("mode") == EXTERNAL,
    )
