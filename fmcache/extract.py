"""Stage one: run a frozen foundation once over a dataset and write the keyed, resumable HDF5 cache.

The cache lives in ``<cache_root>/<dataset>/<model>/<key12>/``. Shards cover fixed slices of the dataset's
canonical order and batches never span two shards, so an interrupted, resumed or multi-process run computes
every shard from exactly the same batches and gives the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from rich.markup import escape
from torch.utils.data import DataLoader, Dataset

import fmcache
from fmcache.cache.key import SCHEMA_VERSION, cache_key
from fmcache.cache.lock import CacheLock
from fmcache.cache.manifest import MANIFEST, read_manifest, shard_entries, write_manifest
from fmcache.cache.shards import BackgroundWriter, ShardWriter, finished_shards, remove_orphans
from fmcache.cache.verify import DAMAGED_DIR, ShardCheck, drop_from_manifest, quarantine, verify_cache
from fmcache.cache.views import IDS as VIEW_IDS
from fmcache.cache.views import SEED as VIEWS_SEED
from fmcache.cache.views import views_datasets
from fmcache.data import DatasetIndex, ImageDataset, build_transform, dataset_norm, default_metric, load_dataset
from fmcache.data.describe import empty_split_warning
from fmcache.data.transforms import (
    GRAY_MODES,
    GRAYSCALE_DATASETS,
    INTERPOLATIONS,
    train_augmentation,
    train_augmentation_spec,
)
from fmcache.data.views import ViewsImageDataset
from fmcache.dist import Dist, close_dist, init_dist
from fmcache.errors import FmcacheError
from fmcache.files import ensure_writable_dir, sha256_file
from fmcache.models import Foundation, FoundationOutput, create_foundation, get_spec
from fmcache.models.final_norm import final_norm_params
from fmcache.progress import progress_bar

DTYPES = {"fp16": np.float16, "fp32": np.float32}
ON_BAD_IMAGE = ("error", "skip")
NORMS = ("dataset", "model")
COMPRESSIONS = (None, "gzip", "lzf")
FINGERPRINTS = ("stat", "content")  # path + size + mtime (cheap), or the bytes of every image
RANDOM_INIT_SEED = 0  # --random-init weights are seeded so every process and every resume builds the same model


@dataclass(frozen=True)
class ExtractSpec:
    """Everything ``fmcache extract`` needs; a YAML config or the CLI flags fill it in."""

    dataset: str
    data_root: Path
    model: str
    weights: Path | None = None
    random_init: bool = False
    img_size: int | None = None
    resize: int | None = None
    interpolation: str = "bilinear"
    gray: str = "repeat"  # repeat | seed (grayscale datasets: the seed's red-channel kernel, see data/transforms.py)
    norm: str = "dataset"  # dataset | model; csv/imagefolder have no dataset statistics and use the model's
    tokens: str = "none"  # none | last | all | comma-separated 1-based layer numbers
    dtype: str = "fp16"
    batch_size: int = 64
    workers: int = 2
    shard_size: int = 1024
    cache_root: Path = Path("cache")
    limit: int | None = None
    on_bad_image: str = "error"
    compression: str | None = None  # None or gzip / lzf
    compile: bool = False
    device: str | None = None
    fingerprint: str = "stat"  # stat | content; content hashes every image's bytes into the key
    verify: bool = False  # hash-check every finished shard before trusting or resuming the cache
    allow_empty_split: bool = False  # an empty train/val/test split is refused unless the user means it
    views: int = 0  # K seeded augmented views of every train image, besides its center crop (cache/views.py)
    dataset_options: dict = field(default_factory=dict)
    arch_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check choices, types and ranges once, so bad values fail as one clear line before any work."""
        for name, low in (("batch_size", 1), ("shard_size", 1), ("workers", 0), ("views", 0)):
            _check_int(name, getattr(self, name), low)
        for name in ("img_size", "resize", "limit"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        choices = {
            "norm": NORMS,
            "dtype": tuple(DTYPES),
            "on_bad_image": ON_BAD_IMAGE,
            "compression": COMPRESSIONS,
            "interpolation": tuple(INTERPOLATIONS),
            "fingerprint": FINGERPRINTS,
            "gray": GRAY_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(str(a) for a in allowed if a is not None)
                raise FmcacheError(f"unknown --{name.replace('_', '-')} '{getattr(self, name)}'; use {shown}")
        if self.device not in (None, "auto", "cpu") and not str(self.device).startswith("cuda"):
            raise FmcacheError(f"unknown --device '{self.device}'; use auto, cpu or cuda")
        parse_tokens(self.tokens)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FmcacheError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")


# -- planning ----------------------------------------------------------------------------------------------------


def select_positions(index: DatasetIndex, limit: int | None) -> np.ndarray:
    """Global indices to cache: all, or the first ``limit`` of each split (sorted, canonical order)."""
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
        norm = dataset_norm(spec.dataset)
        if norm is None:  # generic layouts carry no statistics of their own
            model_spec = get_spec(spec.model)
            return model_spec.mean, model_spec.std, "model"
        return norm[0], norm[1], "dataset"
    raise FmcacheError(f"unknown --norm '{spec.norm}'; use dataset or model")


def parse_tokens(tokens: str) -> str | list[int]:
    """Normalise the --tokens request: 'none', 'last', 'all' or a sorted list of 1-based layer numbers."""
    text = str(tokens).strip().lower()
    if text in ("none", "last", "all", ""):
        return text or "none"
    try:
        layers = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise FmcacheError(f"bad --tokens '{tokens}'; use none, last, all or layer numbers like 4,8,12") from None
    if not layers or layers[0] < 1:
        raise FmcacheError(f"bad --tokens '{tokens}'; layer numbers start at 1")
    return layers


def token_layers(request: str | list[int], num_layers: int) -> list[int]:
    if request == "none":
        return []
    if request == "last":
        return [num_layers]
    if request == "all":
        return list(range(1, num_layers + 1))
    bad = [n for n in request if n > num_layers]
    if bad:
        raise FmcacheError(f"--tokens asks for layer {bad[0]} but the model has {num_layers} layers")
    return list(request)


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
    from concurrent.futures import ThreadPoolExecutor

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
    model_spec = get_spec(spec.model)
    if spec.dtype not in DTYPES:
        raise FmcacheError(f"unknown --dtype '{spec.dtype}'; use {' or '.join(DTYPES)}")
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
        },
        "img_size": transform_desc.get("crop"),
        "transform": transform_desc,
        "dtype": spec.dtype,
        "layers": "all",
        "tokens": parse_tokens(spec.tokens),
        "shard_size": spec.shard_size,  # the shard layout: a resume with another size would mix two layouts
        "dataset": dataset,
    }


def cache_dir(cache_root: Path, dataset: str, model: str, key: str) -> Path:
    safe_model = model.replace(":", "_").replace("/", "_")
    return Path(cache_root) / dataset / safe_model / key[:12]


# -- model output → arrays ---------------------------------------------------------------------------------------


def _stack_padded(per_layer: list[torch.Tensor], width: int) -> torch.Tensor:
    """(B, L, D_max): hierarchical models have stage widths that differ; zero padding, true widths in the manifest."""
    return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in per_layer], dim=1)


def pack_outputs(out: FoundationOutput, layers_tok: list[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    width = max(t.shape[-1] for t in out.tokens)
    arrays = {"pooled/mean": _stack_padded(out.pooled_mean, width), "pooled/paper": out.pooled}
    if out.pooled_cls is not None:
        arrays["pooled/cls"] = _stack_padded(out.pooled_cls, width)
    for number in layers_tok:
        arrays[f"tokens/layer_{number:02d}"] = out.tokens[number - 1]
    packed = {k: v.to(dtype) for k, v in arrays.items()}
    bad = [k for k, v in packed.items() if not bool(torch.isfinite(v).all())]
    if bad:  # fp16 tops out at 65504; inf would turn into NaN after L2 normalisation downstream
        hint = " (values exceed fp16's range; use --dtype fp32)" if dtype == torch.float16 else ""
        raise FmcacheError(f"the model produced non-finite {bad[0]} features{hint}")
    return packed


def describe_model(model: Foundation, device: torch.device, img_size: int, layers_req: str | list[int]) -> dict:
    """Shapes of one forward pass on a blank image: layers, widths, prefix tokens and token-map sizes."""
    with torch.no_grad():
        out = model(torch.zeros(1, 3, img_size, img_size, device=device))
    num_layers = len(out.tokens)
    layers_tok = token_layers(layers_req, num_layers)
    return {
        "name": model.spec.name,
        "backend": model.spec.backend,
        "arch": model.spec.arch,
        "pooled_kind": out.pooled_kind,
        "num_layers": num_layers,
        "layer_dims": [int(t.shape[-1]) for t in out.tokens],
        "num_prefix_tokens": out.num_prefix_tokens,
        "paper_dim": int(out.pooled.shape[-1]),
        "pools": (["cls"] if out.pooled_cls is not None else []) + ["mean", "paper"],
        "token_layers": layers_tok,
        "token_shapes": {str(n): list(out.tokens[n - 1].shape[1:]) for n in layers_tok},
        "img_size": img_size,
        # tokens are cached pre-norm; stage two applies this norm itself (probe --token-norm final)
        "final_norm": final_norm_params(model.adapter),
    }


# -- data --------------------------------------------------------------------------------------------------------


class _Guarded(Dataset):
    """Returns a failure record instead of raising, so a bad image surfaces as one clean line in the main process."""

    def __init__(self, inner: ImageDataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        try:
            return self.inner[i]
        except FmcacheError as exc:
            return None, int(self.inner.indices[i]), str(exc)


def _collate(items: list) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]], tuple | None]:
    """Center crops, their ids, failures, and (views (m·K, C, H, W), their m ids) when the items carry views."""
    good = [it for it in items if it[0] is not None]
    bad = [(it[1], it[2]) for it in items if it[0] is None]
    images = torch.stack([it[0] for it in good]) if good else None
    with_views = [it for it in good if len(it) == 3 and it[2] is not None]
    views = (torch.cat([it[2] for it in with_views]), [it[1] for it in with_views]) if with_views else None
    return images, [it[1] for it in good], bad, views


# -- the run -----------------------------------------------------------------------------------------------------


def _open_check(path: Path, index: int) -> ShardCheck:
    """Without a manifest, a finished shard counts as damaged only when it does not open as HDF5."""
    try:
        with h5py.File(path, "r"):
            return ShardCheck(index=index, file=path.name, state="ok")
    except Exception as exc:  # h5py raises several types for a broken file
        return ShardCheck(index=index, file=path.name, state="damaged", problem=f"does not open ({exc})")


def _versions() -> dict:
    out = {"fmcache": fmcache.__version__, "torch": torch.__version__}
    for pkg in ("timm", "open_clip_torch", "transformers", "h5py", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class Extractor:
    """One extraction run; ``run()`` returns the cache directory."""

    def __init__(self, spec: ExtractSpec, progress: bool = True, log=print):
        self.spec = spec
        self.progress = progress
        self.log = log
        self.index = load_dataset(spec.dataset, spec.data_root, **spec.dataset_options)
        self.positions = select_positions(self.index, spec.limit)
        model_spec = get_spec(spec.model)
        self.img_size = int(spec.img_size or model_spec.default_img_size)
        mean, std, self.norm_source = resolve_norm(spec)
        if spec.gray == "seed" and spec.dataset not in GRAYSCALE_DATASETS:
            raise FmcacheError(
                f"--gray seed applies to grayscale datasets (cbis_ddsm, chexpert), not {spec.dataset}; drop the flag"
            )
        self.transform, desc = build_transform(
            self.img_size, spec.resize, mean, std, interpolation=spec.interpolation, gray=spec.gray
        )
        self.transform_desc = {**desc, "norm_source": self.norm_source}
        self.inputs = key_inputs(spec, self.index, self.positions, self.transform_desc, log)
        # views: PROTOCOLS' train augmentation (the one finetune uses), K draws per train image, seeded per view
        self.augment = train_augmentation(self.img_size, mean, std, gray=spec.gray) if spec.views else None
        self.inputs["views"] = {"k": spec.views}
        if spec.views:
            self.inputs["views"].update(
                seed=VIEWS_SEED, augmentation=train_augmentation_spec(self.img_size, mean, std, gray=spec.gray)
            )
        self.key = cache_key(self.inputs)
        self.folder = cache_dir(spec.cache_root, self.index.name, model_spec.name, self.key)
        self.num_shards = max(1, -(-len(self.positions) // spec.shard_size))

    def split_counts(self) -> dict[str, int]:
        """Samples of each split that this run caches (after --limit)."""
        return {s: int(np.isin(self.positions, self.index.indices(s)).sum()) for s in ("train", "val", "test")}

    def previous_manifest(self, quiet: bool = False) -> dict | None:
        """The manifest on disk, or None; an unreadable one is rebuilt from the shard files, not fatal."""
        if not self.folder.is_dir():
            return None
        try:
            manifest = read_manifest(self.folder)
        except FmcacheError as exc:
            if not quiet:
                self.log(f"[yellow]{escape(str(exc).split(';')[0])}; rebuilding it from the shard files[/]")
            return None
        return manifest if manifest and manifest.get("key") == self.key else None

    def is_complete(self) -> bool:
        """The manifest says complete and every shard passes the cheap checks (or the full ones with --verify)."""
        manifest = self.previous_manifest(quiet=True)
        if not manifest or manifest.get("status") != "complete":
            return False
        return not verify_cache(self.folder, full=self.spec.verify, manifest=manifest).damaged

    def shard_positions(self, shard: int) -> np.ndarray:
        size = self.spec.shard_size
        return self.positions[shard * size : (shard + 1) * size]

    def run(self) -> Path:
        counts = self.split_counts()
        empty = empty_split_warning(self.index.name, counts)
        if empty and not self.spec.allow_empty_split:  # refused before any model is built or file written
            raise FmcacheError(f"{empty}; or pass --allow-empty-split if you mean it")
        manifest = self.previous_manifest()
        if manifest and manifest.get("status") == "complete":
            # cheap by default (a stat and a metadata read per shard); --verify also compares every sha256
            report = verify_cache(self.folder, full=self.spec.verify, manifest=manifest)
            if not report.damaged:
                self.log(f"cache already complete: {self.folder}")
                self._log_skipped(manifest, already=True)
                return self.folder
            self.log(f"[yellow]{escape(report.summary())}; recomputing them[/]")
        dist = init_dist(self.spec.device)
        lock = CacheLock(self.folder)
        fresh = not self.folder.exists()
        try:
            if dist.main:
                ensure_writable_dir(self.folder)
                lock.acquire()
                if lock.stale_message:
                    self.log(lock.stale_message)
                removed = remove_orphans(self.folder)
                if removed:
                    self.log(f"removed {len(removed)} unfinished shard file(s) from an interrupted run")
                self._set_aside_damaged()
            dist.barrier()
            self._extract(dist)
            for part in dist.all_gather_object(self._written):  # also the barrier before the final manifest
                self._written.update(part)
            if dist.main:
                manifest = self._write_manifest()
                if manifest["status"] != "complete":
                    raise FmcacheError(f"extraction ended with missing shards in {self.folder}; rerun the command")
                self._log_skipped(manifest)
        except BaseException:
            # only a run that held the lock may clean up: a refused run must not touch the winner's files
            if dist.main and fresh and lock.held:
                self._remove_if_empty(lock)
            raise
        finally:
            if dist.main:
                lock.release()
            close_dist(dist)
        return self.folder

    def _set_aside_damaged(self) -> None:
        """Under the lock: finished shards that fail the checks move to damaged/, so this run recomputes them."""
        if not finished_shards(self.folder):
            return
        manifest = self.previous_manifest(quiet=True)
        if manifest is None:  # no usable manifest: all that can be checked is that each shard opens
            checks = [_open_check(path, index) for index, path in sorted(finished_shards(self.folder).items())]
        else:
            checks = verify_cache(self.folder, full=self.spec.verify, manifest=manifest).checks
        moved = quarantine(self.folder, checks)
        if moved:
            names = ", ".join(f"{file} ({c.problem})" for file, _ in moved for c in checks if c.file == file)
            self.log(
                f"[yellow]moved {len(moved)} damaged shard(s) to {DAMAGED_DIR}/ for recomputation: {escape(names)}[/]"
            )
            if manifest is not None:
                drop_from_manifest(self.folder, manifest)  # partial at once, even if this run is interrupted

    def _log_skipped(self, manifest: dict, already: bool = False) -> None:
        """One line: how many bad images were left out, and the first few paths (``fmcache info`` lists all)."""
        skipped = manifest.get("skipped", [])
        if not skipped:
            return
        if already and self.spec.on_bad_image == "error":
            self.log(
                f"[yellow]note: this cache was built with {len(skipped)} bad image(s) skipped; see `fmcache info`[/]"
            )
            return
        first = ", ".join(str(s["path"]) for s in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        self.log(
            f"[yellow]skipped {len(skipped)} bad image(s) (--on-bad-image skip): {escape(first)}{more}; "
            f"`fmcache info {escape(str(self.folder))}` lists them all[/]"
        )

    def _remove_if_empty(self, lock: CacheLock) -> None:
        """A fresh run that failed before finishing any shard leaves no folder behind.

        Called only while this run holds the lock, so the manifest and temporary files are its own.
        """
        if not self.folder.is_dir() or finished_shards(self.folder):
            return
        (self.folder / MANIFEST).unlink(missing_ok=True)
        remove_orphans(self.folder)
        lock.release()
        with contextlib.suppress(OSError):
            self.folder.rmdir()  # fails harmlessly when another run has put its lock in it meanwhile
            self.folder.parent.rmdir()  # <model>/ and <dataset>/ too, when nothing else lives there
            self.folder.parent.parent.rmdir()

    # The manifest is rebuilt from the shard files, so every rank's finished work is listed after a crash too.
    def _write_manifest(self) -> dict:
        previous = self.previous_manifest(quiet=True) or {}
        known = {s["file"]: s for s in previous.get("shards", []) if "sha256" in s}
        known.update(getattr(self, "_written", {}))
        entries = shard_entries(self.folder, self.key, known)
        return write_manifest(self.folder, self._base, entries, self.num_shards)

    def _build_model(self, device: torch.device) -> Foundation:
        spec = self.spec
        # Random init is seeded: a resumed or multi-rank run must rebuild exactly the same random weights,
        # otherwise shards written by different processes would come from different models.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = create_foundation(
                spec.model,
                weights=spec.weights,
                random_init=spec.random_init,
                img_size=self.img_size,
                arch_overrides=spec.arch_overrides or None,
            ).to(device)
        differs = model.weights_source.get("differs_from_paper")
        if differs and int(os.environ.get("RANK", "0")) == 0:
            self.log(f"[yellow]note: {escape(differs)}[/]")
        if spec.random_init and int(os.environ.get("RANK", "0")) == 0:
            self.log(
                f"[bold red]WARNING: {spec.model} runs with RANDOM weights (--random-init); "
                "features are not pretrained[/]"
            )
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    def _extract(self, dist: Dist) -> None:
        device = dist.device
        if device.type == "cpu":
            # identical bytes across runs, resumes and process counts need deterministic kernels; the caller's
            # setting is restored afterwards (this runs inside other programs and test sessions too)
            previous = (
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
            )
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                self._extract_all(dist)
            finally:
                torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        else:
            self._extract_all(dist)

    def _extract_all(self, dist: Dist) -> None:
        spec = self.spec
        device = dist.device
        model = self._build_model(device)
        model_info = describe_model(model, device, self.img_size, self.inputs["tokens"])
        self._base = self._manifest_base(model, model_info)
        forward = torch.compile(model) if spec.compile else model
        self._written: dict[str, dict] = {}
        if dist.main:
            self._write_manifest()
        done = set(finished_shards(self.folder))
        mine = [s for s in range(self.num_shards) if s % dist.world == dist.rank and s not in done]
        total = sum(len(self.shard_positions(s)) for s in mine)
        writer = BackgroundWriter()
        try:
            with progress_bar(self.progress and dist.main, total, f"{spec.model} → {self.folder}") as advance:
                for shard in mine:
                    self._extract_shard(shard, forward, model_info, device, writer, advance)
                    if dist.world == 1:
                        self._write_manifest()
        finally:
            writer.close()

    def _manifest_base(self, model: Foundation, model_info: dict) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "key": self.key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "inputs": self.inputs,
            "model": model_info,
            "weights": model.weights_source,
            "dataset": {
                "name": self.index.name,
                "root": str(self.index.root),
                "fingerprint": self.inputs["dataset"]["fingerprint"],
                "class_names": list(self.index.class_names),
                "multilabel": bool(self.index.multilabel),
                "metric": default_metric(self.index),
                "split_counts": {
                    s: int(np.isin(self.positions, self.index.indices(s)).sum()) for s in ("train", "val", "test")
                },
                "problems": list(self.index.problems),
            },
            "shard_size": self.spec.shard_size,
            "dtype": self.spec.dtype,
            "versions": _versions(),
            **({"views": {**self.inputs["views"], "splits": ["train"]}} if self.spec.views else {}),
        }

    def _extract_shard(self, shard, forward, model_info, device, writer, advance) -> None:
        spec = self.spec
        positions = self.shard_positions(shard)
        store_dtype = torch.float16 if spec.dtype == "fp16" else torch.float32
        attrs = {"key": self.key, "schema": SCHEMA_VERSION, "shard": shard}
        shard_writer = ShardWriter(self.folder, shard, len(positions), attrs, spec.compression)
        loader = DataLoader(
            _Guarded(
                ViewsImageDataset(self.index, positions, self.transform, self.augment, spec.views, VIEWS_SEED)
                if spec.views
                else ImageDataset(self.index, positions, self.transform)
            ),
            batch_size=spec.batch_size,
            shuffle=False,
            num_workers=spec.workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        skipped: list[dict] = []
        start = time.perf_counter()
        try:
            for images, ids, bad, views in loader:
                for gidx, reason in bad:
                    if spec.on_bad_image == "error":
                        raise FmcacheError(f"{reason} (or pass --on-bad-image skip to leave it out)")
                    skipped.append({"id": gidx, "path": str(self.index.paths[gidx]), "reason": reason})
                if images is not None:
                    arrays = self._forward(forward, images, model_info, device, store_dtype)
                    ids_np = np.asarray(ids, dtype=np.int64)
                    host = {
                        "ids": ids_np,
                        "split": self.index.split[ids_np].astype(np.int8),
                        "labels": self.index.labels[ids_np],
                    }
                    if spec.views:
                        arrays.update(self._forward_views(forward, views, model_info, device, store_dtype))
                    writer.submit(lambda a=arrays, h=host: shard_writer.append({**h, **_to_numpy(a)}))
                advance(len(ids) + len(bad))
            writer.drain()
            # no timing in the shard's attributes: identical inputs must give byte-identical shard files
            entry = shard_writer.commit({"skipped": skipped})
            entry["seconds"] = time.perf_counter() - start
        except BaseException:
            with contextlib.suppress(BaseException):  # the original error is the one to report
                writer.drain()
            shard_writer.abort()
            raise
        self._written[entry["file"]] = entry

    def _forward_views(self, forward, views, model_info, device, store_dtype) -> dict:
        """Features of a batch's train views, forwarded in chunks of --batch-size (same chunks on every rerun).

        Returned under one ``__views__`` entry that the writer thread turns into the ``views/`` arrays.
        """
        k = self.spec.views
        ids, parts = [], []
        if views is not None:
            images, ids = views
            chunks = images.split(self.spec.batch_size)
            parts = [self._forward(forward, c, model_info, device, store_dtype) for c in chunks]
        # shapes of an empty batch's arrays, so a batch (or shard) without train images still writes every dataset
        feat = np.float16 if store_dtype == torch.float16 else np.float32
        empty = {}
        for name, shape in views_datasets(model_info, k).items():
            empty[name.removeprefix("views/")] = (shape[1:], feat)
        return {"__views__": (parts, ids, k, empty)}

    def _forward(self, forward, images, model_info, device, store_dtype) -> dict:
        images = images.to(device, non_blocking=True)
        layers_tok = model_info["token_layers"]
        with torch.no_grad():
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = forward(images)
            else:
                out = forward(images)
            packed = pack_outputs(out, layers_tok, store_dtype)
        if device.type != "cuda":
            return packed
        # copy to pinned host memory without blocking; the writer thread waits on the event before reading
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in packed.items()}
        for k, v in packed.items():
            host[k].copy_(v, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        host["__event__"] = event
        return host


def _to_numpy(arrays: dict) -> dict[str, np.ndarray]:
    event = arrays.get("__event__")
    if event is not None:
        event.synchronize()
    out = {k: v.numpy() for k, v in arrays.items() if k not in ("__event__", "__views__")}
    if "__views__" in arrays:
        out.update(_views_to_numpy(*arrays["__views__"]))
    return out


def _views_to_numpy(parts: list[dict], ids: list[int], k: int, empty: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The views/ arrays of one batch: each view forward's outputs concatenated, then reshaped to (m, K, ...)."""
    out = {VIEW_IDS: np.asarray(ids, dtype=np.int64)}
    if not parts:  # no train image in this batch: zero rows, so every shard still holds every views dataset
        out.update({f"views/{name}": np.zeros((0, k, *shape), dtype) for name, (shape, dtype) in empty.items()})
        return out
    numpy_parts = [_to_numpy(p) for p in parts]
    for name in numpy_parts[0]:
        joined = np.concatenate([p[name] for p in numpy_parts])
        out[f"views/{name}"] = joined.reshape(len(ids), k, *joined.shape[1:])
    return out


def run_extract(spec: ExtractSpec, progress: bool = True, log=print) -> Path:
    """Extract (or resume, or return at once when complete) and return the cache directory."""
    return Extractor(spec, progress=progress, log=log).run()
