"""Stage one: run a frozen foundation once over a dataset and write the keyed, resumable HDF5 cache.

The cache lives in ``<cache_root>/<dataset>/<model>/<key12>/``. Shards cover fixed slices of the dataset's
canonical order and batches never span two shards, so an interrupted, resumed or multi-process run computes
every shard from exactly the same batches and gives the same bytes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import time
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape
from torch.utils.data import DataLoader, Dataset

import fmcache
from fmcache.cache.key import SCHEMA_VERSION, cache_key
from fmcache.cache.lock import CacheLock
from fmcache.cache.manifest import MANIFEST, read_manifest, shard_entries, write_manifest
from fmcache.cache.shards import BackgroundWriter, ShardWriter, finished_shards, remove_orphans
from fmcache.cache.verify import DAMAGED_DIR, VerifyReport, drop_from_manifest, open_check, quarantine, verify_cache
from fmcache.cache.views import SEED as VIEWS_SEED
from fmcache.cache.views import views_batch_arrays
from fmcache.data import ImageDataset, build_transform, default_metric, load_dataset
from fmcache.data.describe import empty_split_warning
from fmcache.data.transforms import GRAYSCALE_DATASETS, train_augmentation
from fmcache.data.views import ViewsImageDataset
from fmcache.dist import Dist, close_dist, init_dist
from fmcache.errors import FmcacheError

# the plan (spec, selection, key inputs) lives in extract_plan.py; its names stay importable from here
from fmcache.extract_plan import (
    COMPRESSIONS,
    DTYPES,
    FINGERPRINTS,
    NORMS,
    ON_BAD_IMAGE,
    RANDOM_INIT_SEED,
    ExtractSpec,
    cache_dir,
    content_fingerprint,
    key_inputs,
    parse_tokens,
    resolve_norm,
    select_positions,
    token_layers,
    views_inputs,
    weights_identity,
)
from fmcache.files import ensure_writable_dir
from fmcache.models import Foundation, FoundationOutput, create_foundation, get_spec
from fmcache.models.final_norm import final_norm_params
from fmcache.progress import progress_bar

__all__ = [
    "COMPRESSIONS",
    "DTYPES",
    "FINGERPRINTS",
    "NORMS",
    "ON_BAD_IMAGE",
    "RANDOM_INIT_SEED",
    "ExtractSpec",
    "Extractor",
    "cache_dir",
    "content_fingerprint",
    "describe_model",
    "key_inputs",
    "pack_outputs",
    "parse_tokens",
    "resolve_norm",
    "run_extract",
    "select_positions",
    "token_layers",
    "weights_identity",
]


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
        self.inputs["views"] = views_inputs(spec, self.img_size, mean, std)
        # views: PROTOCOLS' train augmentation (the one finetune uses), K draws per train image, seeded per view
        self.augment = train_augmentation(self.img_size, mean, std, gray=spec.gray) if spec.views else None
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

    def _check_complete(self, manifest: dict | None) -> VerifyReport | None:
        """The shard checks of a manifest that says complete (None for any other): cheap by default (a stat and
        a metadata read per shard), and with --verify every sha256 too."""
        if not manifest or manifest.get("status") != "complete":
            return None
        return verify_cache(self.folder, full=self.spec.verify, manifest=manifest)

    def is_complete(self) -> bool:
        """The manifest says complete and every shard passes the cheap checks (or the full ones with --verify)."""
        report = self._check_complete(self.previous_manifest(quiet=True))
        return report is not None and not report.damaged

    def shard_positions(self, shard: int) -> np.ndarray:
        size = self.spec.shard_size
        return self.positions[shard * size : (shard + 1) * size]

    def run(self) -> Path:
        counts = self.split_counts()
        empty = empty_split_warning(self.index.name, counts)
        if empty and not self.spec.allow_empty_split:  # refused before any model is built or file written
            raise FmcacheError(f"{empty}; or pass --allow-empty-split if you mean it")
        report = self._check_complete(self.previous_manifest())
        if report is not None:
            if not report.damaged:
                self.log(f"cache already complete: {self.folder}")
                self._log_skipped(report.manifest, already=True)
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
                self._set_aside_damaged(report)
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

    def _set_aside_damaged(self, checked: VerifyReport | None) -> None:
        """Under the lock: finished shards that fail the checks move to damaged/, so this run recomputes them.

        ``checked`` is run()'s report from before the lock; it stands when the manifest has not changed since,
        so a damaged complete cache is not opened (or, with --verify, hashed) twice.
        """
        on_disk = finished_shards(self.folder)
        if not on_disk:
            return
        manifest = self.previous_manifest(quiet=True)
        if manifest is None:  # no usable manifest: all that can be checked is that each shard opens
            checks = [open_check(path, index) for index, path in sorted(on_disk.items())]
        elif checked is not None and checked.manifest == manifest:
            checks = checked.checks
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
                "split_counts": self.split_counts(),
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
        ids, parts = [], []
        if views is not None:
            images, ids = views
            chunks = images.split(self.spec.batch_size)
            parts = [self._forward(forward, c, model_info, device, store_dtype) for c in chunks]
        return {"__views__": (parts, ids, model_info, self.spec.views, DTYPES[self.spec.dtype])}

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
        parts, ids, model_info, k, dtype = arrays["__views__"]
        out.update(views_batch_arrays([_to_numpy(p) for p in parts], ids, model_info, k, dtype))
    return out


def run_extract(spec: ExtractSpec, progress: bool = True, log=print) -> Path:
    """Extract (or resume, or return at once when complete) and return the cache directory."""
    return Extractor(spec, progress=progress, log=log).run()
