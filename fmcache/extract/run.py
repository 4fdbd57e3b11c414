"""Stage one: run a frozen foundation once over a dataset and write the keyed, resumable HDF5 cache.

The cache lives in ``<cache_root>/<dataset>/<model>/<key12>/``. Shards cover fixed slices of the dataset's
canonical order and batches never span two shards, so an interrupted, resumed or multi-process run computes
every shard from exactly the same batches and gives the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import fmcache
from fmcache.cache.annotations import check_annotations, write_annotations
from fmcache.cache.key import SCHEMA_VERSION
from fmcache.cache.lock import CacheLock
from fmcache.cache.manifest import MANIFEST
from fmcache.cache.shards import (
    PAPER_TOKENS,
    BackgroundWriter,
    ShardWriter,
    finished_shards,
    remove_orphans,
    token_dataset,
)
from fmcache.cache.views import SEED as VIEWS_SEED
from fmcache.cache.views import views_batch_arrays
from fmcache.data import ImageDataset, default_metric
from fmcache.data.describe import empty_split_warning
from fmcache.data.fingerprint import content_hashes
from fmcache.dist import Dist, autocast_for, close_dist, init_dist, is_main_process
from fmcache.errors import FmcacheError
from fmcache.extract.pixels import views_dataset, views_pixels
from fmcache.extract.plan import DTYPES, ExtractPlan, plan
from fmcache.extract.spec import ExtractSpec, token_layers, wants_paper_tokens
from fmcache.files import atomic_write_json, ensure_writable_dir
from fmcache.models import Foundation, FoundationOutput, create_foundation
from fmcache.models.final_norm import final_norm_params
from fmcache.progress import progress_bar
from fmcache.results import npz_bytes

# -- model output → arrays ---------------------------------------------------------------------------------------


def _stack_padded(per_layer: list[torch.Tensor], width: int) -> torch.Tensor:
    """(B, L, D_max): hierarchical models have stage widths that differ; zero padding, true widths in the manifest."""
    return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in per_layer], dim=1)


def pack_outputs(
    out: FoundationOutput, layers_tok: list[int], dtype: torch.dtype, paper_tokens: bool = False
) -> dict[str, torch.Tensor]:
    width = max(t.shape[-1] for t in out.tokens)
    arrays = {"pooled/mean": _stack_padded(out.pooled_mean, width), "pooled/paper": out.pooled}
    if out.pooled_cls is not None:
        arrays["pooled/cls"] = _stack_padded(out.pooled_cls, width)
    for number in layers_tok:
        arrays[token_dataset(number)] = out.tokens[number - 1]
    if paper_tokens:
        arrays[token_dataset(PAPER_TOKENS)] = out.head_tokens
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
        # the tokens the paper's DeiT head reads: the rule, and their shape when cached (--tokens paper)
        "head_tokens": model.spec.head_tokens,
        **({"paper_token_shape": list(out.head_tokens.shape[1:])} if wants_paper_tokens(layers_req) else {}),
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
    """One extraction run of a :class:`~fmcache.extract.plan.ExtractPlan`; ``run()`` returns the cache directory."""

    def __init__(self, plan: ExtractPlan, progress: bool = True, log=print):
        self.plan, self.spec, self.progress, self.log = plan, plan.spec, progress, log
        self.index, self.positions, self.img_size = plan.index, plan.positions, plan.img_size
        self.key, self.folder, self.num_shards, self.inputs = plan.key, plan.folder, plan.num_shards, plan.inputs
        self.cache = plan.cache

    def run(self) -> Path:
        counts = self.plan.split_counts()
        if self.plan.evaluation_only:
            # an external set (all test by design) or a corrupted test cache: heads come from another cache, so
            # only the test split must hold samples
            counts = {split: counts.get(split, 0) or (1 if split != "test" else 0) for split in counts}
        empty = empty_split_warning(self.index.name, counts)
        if empty and not self.spec.allow_empty_split:  # refused before any model is built or file written
            raise FmcacheError(f"{empty}; or pass --allow-empty-split if you mean it")
        report = self.cache.check_complete(self.cache.previous_manifest())
        if report is not None:
            if not report.damaged:
                self.log(f"cache already complete: {self.folder}")
                self._log_skipped(report.manifest, already=True)
                self._refresh_annotations(report.manifest)
                return self.folder
            self.log(f"warning: {report.summary()}; recomputing them")
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
                self.cache.set_aside_damaged(report)
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
                self.cache.remove_if_empty(lock)
            raise
        finally:
            if dist.main:
                lock.release()
            close_dist(dist)
        return self.folder

    def _refresh_annotations(self, manifest: dict) -> None:
        """A complete cache whose annotations are missing (made before 0.4) or no longer the dataset's gets them,
        under the cache's lock; its shards and key are untouched."""
        arrays, facts = self.plan.annotations()
        current = manifest.get("annotations") or {}
        if current.get("sha256") == hashlib.sha256(npz_bytes(arrays)).hexdigest():
            with contextlib.suppress(FmcacheError):  # and the file is still that one (`fmcache verify` names it)
                check_annotations(self.folder, current)
                return
        with CacheLock(self.folder):
            manifest["annotations"] = write_annotations(self.folder, arrays, facts)
            atomic_write_json(self.folder / MANIFEST, manifest)
        self.log(f"wrote the per-sample annotations of {self.folder} (raw labels, metadata, units)")

    def _log_skipped(self, manifest: dict, already: bool = False) -> None:
        """One line: how many bad images were left out, and the first few paths (``fmcache info`` lists all)."""
        skipped = manifest.get("skipped", [])
        if not skipped:
            return
        if already and self.spec.on_bad_image == "error":
            self.log(f"note: this cache was built with {len(skipped)} bad image(s) skipped; see `fmcache info`")
            return
        first = ", ".join(str(s["path"]) for s in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        self.log(
            f"warning: skipped {len(skipped)} bad image(s) (--on-bad-image skip): {first}{more}; "
            f"`fmcache info {self.folder}` lists them all"
        )

    def _write_manifest(self) -> dict:
        return self.cache.write_manifest(self._base, getattr(self, "_written", {}), self.num_shards)

    def _build_model(self, device: torch.device) -> Foundation:
        spec = self.spec
        # seeded inside: a resumed or multi-rank run rebuilds exactly the same random weights, so shards written
        # by different processes come from one model
        model = create_foundation(
            spec.model,
            weights=spec.weights,
            random_init=spec.random_init,
            img_size=self.img_size,
            arch_overrides=spec.arch_overrides or None,
        ).to(device)
        differs = model.weights_source.get("differs_from_paper")
        if differs and is_main_process():
            self.log(f"note: {differs}")
        if spec.random_init and is_main_process():
            self.log(f"WARNING: {spec.model} runs with RANDOM weights (--random-init); features are not pretrained")
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
        if dist.main:
            self._base["annotations"] = write_annotations(self.folder, *self.plan.annotations())
        forward = torch.compile(model) if spec.compile else model
        self._written: dict[str, dict] = {}
        self._pixels = views_pixels(self.plan, self.log if dist.main else lambda m: None)  # --views: decode once
        if dist.main:
            self._write_manifest()
        done = set(finished_shards(self.folder))
        mine = [s for s in range(self.num_shards) if s % dist.world == dist.rank and s not in done]
        total = sum(len(self.plan.shard_positions(s)) for s in mine)
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
                "split_counts": self.plan.split_counts(),
                "problems": list(self.index.problems),
            },
            "shard_size": self.spec.shard_size,
            "dtype": self.spec.dtype,
            "versions": _versions(),
            **({"views": {**self.inputs["views"], "splits": ["train"]}} if self.spec.views else {}),
        }

    def _extract_shard(self, shard, forward, model_info, device, writer, advance) -> None:
        spec = self.spec
        positions = self.plan.shard_positions(shard)
        store_dtype = torch.float16 if spec.dtype == "fp16" else torch.float32
        attrs = {"key": self.key, "schema": SCHEMA_VERSION, "shard": shard}
        shard_writer = ShardWriter(self.folder, shard, len(positions), attrs, spec.compression)
        loader = DataLoader(
            _Guarded(
                views_dataset(self.plan, positions, self._pixels, VIEWS_SEED)  # images, or a pixel cache
                if spec.views
                else ImageDataset(self.index, positions, self.plan.transform)
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
                    # the inputs' fingerprints (transfer's leakage check), hashed on the writer thread: hashlib
                    # releases the GIL, so the loop does not wait on them
                    writer.submit(
                        lambda a=arrays, h=host, x=images: shard_writer.append(
                            {**h, **content_hashes(x), **_to_numpy(a)}
                        )
                    )
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
            with autocast_for(self.spec.precision, device):
                out = forward(images)
            packed = pack_outputs(out, layers_tok, store_dtype, "paper_token_shape" in model_info)
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
    return Extractor(plan(spec, log), progress=progress, log=log).run()
