"""One fine-tuning run (one LR, one seed): AMP, accumulation, clipping, per-epoch checkpoint, best epoch, export.

The recipe is ``fmcache.training``'s (AdamW groups, warmup + schedule, clip 1.0, first maximum of val), the same
code the frozen heads use. What is specific here:

- data order and augmentation are seeded per (seed, epoch): the sampler by ``set_epoch``, the augmentation RNG
  (main process and DataLoader workers) by a generator reseeded each epoch, so an epoch's batches do not depend on
  how the run got there, and a resumed run draws exactly what an uninterrupted one would;
- the ``last`` checkpoint is written atomically (``fmcache.training.save_checkpoint``, shared with the token heads)
  after an epoch when ``checkpoint_every`` seconds have passed since the last one (0: after every epoch), after the
  last epoch, and on SIGTERM (the epoch in flight ends, the checkpoint is written, the process exits 143); a run
  resumed from an older checkpoint replays the epochs since, which draw exactly what they drew, so it ends with the
  same numbers; on a val improvement the test split is scored and the foundation is exported as
  ``foundation.safetensors`` (its own key layout, which ``fmcache extract --weights`` loads), so the export is
  always the best epoch's, also after a kill;
- with ``batches`` (``--augment device``, :class:`fmcache.finetune.pixels.DeviceBatches`) the loader yields uint8
  crops and the augmentation runs on the device, seeded by (seed, epoch, step, rank) alone (:func:`augment_seed`);
- under torchrun each process takes its DistributedSampler share; val/test predictions are gathered so every rank
  sees the same best epoch; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from fmcache import metrics
from fmcache.choices import AMP_MODES, BEST_EPOCH_RULES
from fmcache.dist import Dist, autocast_for
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes, atomic_write_json
from fmcache.finetune.lora import adapter_state_dict
from fmcache.finetune.model import FineTuneModel
from fmcache.headgrid import head_losses
from fmcache.results import settings_hash
from fmcache.training import (
    ADAM_BETAS,
    ADAM_EPS,
    HeadRecords,
    adamw_param_groups,
    batch_starts,
    json_roundtrip,
    load_checkpoint,
    lr_multiplier,
    save_checkpoint,
    warmup_steps_for,
)

LAST = "last.pt"  # the per-epoch resumable checkpoint, beside the run's results

EXPORT = "foundation.safetensors"
HEAD_EXPORT = "head.safetensors"
ADAPTER_EXPORT = "adapter.safetensors"  # --method lora: the best epoch's adapters alone (peft's names in the model)
RESULT = "run.json"
# val and test probabilities at the best val epoch so far, rewritten with the export; gathered into the grid's
# predictions.npz (fmcache.results), and still there when a finished run is reused
BEST_PREDICTIONS = "best_predictions.npz"


@dataclass(frozen=True)
class RunSettings:
    lr: float
    seed: int
    epochs: int
    batch_size: int
    accum: int
    clip: float
    amp: str
    schedule: str
    warmup: dict
    weight_decay: float
    layer_decay: float
    metric: str
    multilabel: bool
    label_names: list[str] | None = None
    workers: int = 0
    checkpoint_every: float = 0.0  # seconds between last.pt writes (0: every epoch); changes no number
    drop_last: bool = True  # the seed's train loader drops its last partial batch
    from_cache: bool = False
    export: bool = True
    best_epoch: str = "seed"  # fmcache.choices.BEST_EPOCH_RULES
    eval_precision: str = "auto"  # fmcache.choices.PRECISIONS; auto: the training's --amp
    extra: dict = field(default_factory=dict)  # everything else that identifies the run (model, data, freezing)


def resolve_amp(amp: str, device: torch.device) -> str:
    """auto = bf16 on GPU, off on CPU; fp16 needs a GPU (its GradScaler is a CUDA feature)."""
    if amp not in AMP_MODES:
        raise FmcacheError(f"unknown --amp '{amp}'; use {', '.join(AMP_MODES)}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "off"
    if amp == "fp16" and device.type != "cuda":
        raise FmcacheError("--amp fp16 needs a GPU; use --amp off (or bf16) on CPU")
    return amp


def _autocast(amp: str, device: torch.device):
    return autocast_for("fp32" if amp == "off" else amp, device)


def param_groups(model: FineTuneModel, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups (decay on weights only, ``training.adamw_param_groups``), split by layer for layer-wise decay.

    Layer l of depth+1 gets the scale ``layer_decay ** (depth + 1 - l)`` (embedding 0, block i i+1, final norm and
    head depth+1); 1.0 (the seed's) gives one group pair at scale 1.
    """
    named = list(model.trainable_named_parameters())
    if not named:
        raise FmcacheError("nothing to train: every parameter is frozen")
    if layer_decay == 1.0:
        groups = adamw_param_groups(named, weight_decay)
        return [dict(g, lr_scale=1.0) for g in groups if g["params"]]
    ids = model.layer_ids()
    top = max(ids.values())
    groups = []
    for layer in sorted(set(ids.values())):
        subset = [(n, p) for n, p in named if ids[n] == layer]
        scale = layer_decay ** (top - layer)
        groups += [dict(g, lr_scale=scale) for g in adamw_param_groups(subset, weight_decay) if g["params"]]
    return groups


class Labelled(Dataset):
    """(input, label) pairs from an ImageDataset (label looked up by global index) or a TokenDataset."""

    def __init__(self, inner: Dataset, labels: np.ndarray | None):
        self.inner, self.labels = inner, labels

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        item = self.inner[i]
        if self.labels is None:  # TokenDataset: (tokens, label, id)
            return item[0], item[1]
        return item[0], torch.as_tensor(self.labels[item[1]])


def split_labels(ds: Dataset) -> np.ndarray:
    """The labels of a split's samples in dataset order (what the metric scores)."""
    if isinstance(ds, Labelled) and ds.labels is not None:
        return ds.labels[np.asarray(ds.inner.indices)]
    return np.asarray(ds.inner.labels)


def split_ids(ds: Dataset) -> np.ndarray:
    """The sample ids of a split in dataset order: index positions of images, or the cache's ids (as extract wrote)."""
    inner = ds.inner if isinstance(ds, Labelled) else ds
    if isinstance(inner, Subset):  # --limit on a cache: the first rows of a TokenDataset
        return np.asarray(inner.dataset.ids)[np.asarray(inner.indices)]
    if hasattr(inner, "ids"):
        return np.asarray(inner.ids)
    return np.asarray(inner.indices)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63)


def augment_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The device augmentation's seed of one batch: a hash of (run seed, epoch, batch, rank) and nothing else, so a
    resumed or replayed epoch draws exactly what it drew (no generator state to checkpoint)."""
    digest = hashlib.sha256(f"fmcache-augment:{int(seed)}:{int(epoch)}:{int(step)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# the exit status of a run stopped by SIGTERM after writing its checkpoint (128 + 15, as a shell reports it)
PREEMPTED_EXIT = 128 + int(signal.SIGTERM)


def _ignore_sigterm(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the main process, which ends the epoch and writes the checkpoint (a
    scheduler signals every process of the job)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Preemption:
    """While entered, SIGTERM sets a flag instead of killing the process (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.flag, self.previous = False, None

    def __enter__(self) -> _Preemption:
        with contextlib.suppress(ValueError):  # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, _signum, _frame) -> None:
        self.flag = True

    def requested(self, dist: Dist) -> bool:
        """Whether any rank got SIGTERM (every rank stops after the same epoch)."""
        if dist.world == 1:
            return self.flag
        return any(dist.all_gather_object(self.flag))


class Trainer:
    """Trains one (lr, seed) run to completion, resuming from ``folder/last.pt`` when allowed."""

    def __init__(
        self,
        model: FineTuneModel,
        data: dict[str, Dataset],
        settings: RunSettings,
        folder: Path,
        dist: Dist,
        resume: bool = True,
        on_images: Callable[[int], None] = lambda n: None,
        log: Callable[[str], None] = print,
        tensorboard: object | None = None,
        batches: object | None = None,
    ):
        self.model, self.data, self.s, self.folder, self.dist = model, data, settings, Path(folder), dist
        self.resume, self.on_images, self.log, self.tb = resume, on_images, log, tensorboard
        self.batches = batches  # --augment device: train(x, seed) and eval(x) on the device (finetune.pixels)
        self.device = dist.device
        self.amp = resolve_amp(settings.amp, self.device)
        # evaluation's precision: the training's (auto) or its own (the seed trains under fp16 AMP and tests in fp32)
        self.eval_amp = (
            self.amp
            if settings.eval_precision == "auto"
            else resolve_amp("off" if settings.eval_precision == "fp32" else settings.eval_precision, self.device)
        )
        # neither the loader's workers nor the checkpoint cadence changes a number
        settings_doc = {k: v for k, v in settings.__dict__.items() if k not in ("workers", "checkpoint_every")}
        settings_doc["world_size"] = dist.world  # the effective batch depends on it
        self.settings_doc = json.loads(json.dumps(settings_doc, default=str))
        self.settings_hash = settings_hash(self.settings_doc)

    # -- data -----------------------------------------------------------------------------------------------------
    def _train_loader(self, generator: torch.Generator) -> tuple[DataLoader, DistributedSampler]:
        sampler = DistributedSampler(
            self.data["train"], num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True, seed=self.s.seed
        )
        loader = DataLoader(
            self.data["train"],
            batch_size=self.s.batch_size,
            sampler=sampler,
            num_workers=self.s.workers,
            generator=generator,
            pin_memory=self.device.type == "cuda",
            drop_last=self.s.drop_last,
            worker_init_fn=_ignore_sigterm,
        )
        return loader, sampler

    def _predict(self, split: str) -> np.ndarray:
        """(N, C) probabilities for a split in dataset order; each rank scores a share, all ranks get all rows."""
        dataset = self.data[split]
        positions = np.arange(self.dist.rank, len(dataset), self.dist.world)
        loader = DataLoader(
            Subset(dataset, positions.tolist()),
            batch_size=self.s.batch_size,
            shuffle=False,
            num_workers=self.s.workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_sigterm,
        )
        self.model.eval()
        outs = []
        start = time.perf_counter()
        with torch.no_grad():
            for x, _ in loader:
                x = x.to(self.device, non_blocking=True)
                if self.batches is not None:
                    x = self.batches.eval(x)
                with _autocast(self.eval_amp, self.device):
                    logits = self._forward(self.model, x)
                logits = logits.float()
                probs = torch.sigmoid(logits) if self.s.multilabel else torch.softmax(logits, dim=-1)
                outs.append(probs.cpu().numpy())
        self.eval_seconds += time.perf_counter() - start
        self.eval_images += len(positions)
        mine = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
        parts = self.dist.all_gather_object((positions, mine))
        rows = max(p[1].shape[1] for p in parts if len(p[0])) if parts else 0
        probs = np.zeros((len(dataset), rows), np.float32)
        for pos, p in parts:
            if len(pos):
                probs[pos] = p
        return probs

    def _labels(self, split: str) -> np.ndarray:
        return split_labels(self.data[split])

    def _evaluate(self, split: str) -> dict:
        probs = self._predict(split)
        self.last_probs[split] = probs
        return metrics.evaluate(self.s.metric, self._labels(split), probs, self.s.multilabel, self.s.label_names)

    def _save_best_predictions(self) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **{f"{s}_scores": self.last_probs[s].astype(np.float32) for s in ("val", "test")})
        atomic_write_bytes(self.folder / BEST_PREDICTIONS, buffer.getvalue())

    def _forward(self, module, x: torch.Tensor) -> torch.Tensor:
        if self.s.from_cache:
            return module(x, tokens=True) if module is not self.model else self.model.forward_tokens(x)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return module(x)

    # -- training -------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.dist.main:
            self.folder.mkdir(parents=True, exist_ok=True)
        done = self.folder / RESULT
        if self.resume and done.is_file():
            result = json.loads(done.read_text())
            if result.get("settings_hash") == self.settings_hash:
                self.log(f"run {self.folder.name} already finished; reusing its result")
                return result
        self.eval_seconds, self.eval_images = 0.0, 0
        self.last_probs: dict[str, np.ndarray] = {}
        model = self.model.to(self.device)
        if self.device.type == "cuda" and not self.s.from_cache:
            model.to(memory_format=torch.channels_last)
        groups = param_groups(model, self.s.weight_decay, self.s.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.s.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        trainable = [p for g in groups for p in g["params"]]
        wrapped = _ddp(model, self.dist, self.s.from_cache)
        generator = torch.Generator()
        loader, sampler = self._train_loader(generator)
        batches = len(loader)
        if batches == 0:  # drop_last with fewer train samples than one batch: nothing would ever train
            batch_starts(len(sampler), self.s.batch_size, self.s.drop_last)
        steps_per_epoch = math.ceil(batches / self.s.accum)
        total = steps_per_epoch * self.s.epochs
        warmup = warmup_steps_for(
            self.s.warmup.get("warmup_epochs"), self.s.warmup.get("warmup_iters"), steps_per_epoch, total
        )
        state = {"epoch": 0, "step": 0, "epoch_seconds": [], "eval_seconds": 0.0, "eval_images": 0}
        # the best epoch is kept as every head grid keeps it (first maximum of val; test read only there)
        records = HeadRecords(1, self.s.epochs, BEST_EPOCH_RULES[self.s.best_epoch])
        # restores every RNG state too; refuses a checkpoint made with other settings
        ckpt = load_checkpoint(self.folder / LAST, self.settings_doc) if self.resume else None
        if ckpt is not None:
            missing = set(n for n, _ in model.trainable_named_parameters()) - set(ckpt["trainable"])
            if missing:
                raise FmcacheError(f"checkpoint in {self.folder} lacks {sorted(missing)[0]}; pass --no-resume")
            model.load_state_dict(ckpt["trainable"], strict=False)
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            state.update(ckpt["loop"])
            _load_records(records, state)
            self.eval_seconds, self.eval_images = state["eval_seconds"], state["eval_images"]
            self.log(f"resumed {self.folder.name} after epoch {state['epoch']} of {self.s.epochs}")
        written_at = time.monotonic()  # the run's start, or its resume, counts as a checkpoint
        with _Preemption() as preemption:  # SIGTERM: end the epoch, write the checkpoint, exit
            for epoch in range(state["epoch"], self.s.epochs):
                start = time.perf_counter()
                sampler.set_epoch(epoch)
                generator.manual_seed(_epoch_seed(self.s.seed, epoch))
                torch.manual_seed(_epoch_seed(self.s.seed, epoch))  # augmentation in the main process (workers=0)
                model.train()
                losses = []
                for i, (x, y) in enumerate(loader):
                    group_start = (i // self.s.accum) * self.s.accum
                    group_size = min(self.s.accum, batches - group_start)
                    boundary = i == group_start + group_size - 1
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    if self.batches is not None:
                        x = self.batches.train(x, augment_seed(self.s.seed, epoch, i, self.dist.rank))
                    sync = contextlib.nullcontext() if boundary or wrapped is model else wrapped.no_sync()
                    with sync:
                        with _autocast(self.amp, self.device):
                            logits = self._forward(wrapped, x)
                        loss = head_losses(logits.float()[None], y[None], self.s.multilabel)[0] / group_size
                        scaler.scale(loss).backward()
                    # kept on the device: reading the loss each step would make the host wait for the device
                    losses.append(loss.detach() * group_size)
                    if boundary:
                        mult = lr_multiplier(state["step"], total, warmup, self.s.schedule)
                        for g in optimizer.param_groups:
                            g["lr"] = self.s.lr * mult * g["lr_scale"]
                        if self.s.clip > 0:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(trainable, self.s.clip)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        state["step"] += 1
                    self.on_images(len(x) * self.dist.world)
                losses = torch.stack(losses).float().cpu().numpy() if losses else np.zeros(0, np.float32)
                if not np.isfinite(losses).all():
                    raise FmcacheError(f"the training loss became non-finite in epoch {epoch + 1}; lower the LR")
                state["epoch_seconds"].append(time.perf_counter() - start)
                val = self._evaluate("val")
                if records.observe(epoch, [float(val["value"])]):
                    # through JSON now, so a resumed run (which reads it back from JSON) reports identical values
                    records.test_metrics[0] = json_roundtrip(self._evaluate("test"))
                    if self.dist.main:
                        self._export(model)
                        self._save_best_predictions()
                state["records"] = records.state()
                state["epoch"] = epoch + 1
                state["eval_seconds"], state["eval_images"] = self.eval_seconds, self.eval_images
                if self.tb is not None and self.dist.main:
                    self.tb.add_scalar(f"{self.folder.name}/train_loss", float(np.mean(losses)), epoch + 1)
                    self.tb.add_scalar(f"{self.folder.name}/val_{self.s.metric}", val["value"], epoch + 1)
                stop = preemption.requested(self.dist)
                due = self.s.checkpoint_every <= 0 or time.monotonic() - written_at >= self.s.checkpoint_every
                if self.dist.main and (due or stop or epoch + 1 == self.s.epochs):
                    written_at = time.monotonic()
                    save_checkpoint(
                        self.folder / LAST,
                        {
                            "trainable": {n: p.detach().cpu() for n, p in model.trainable_named_parameters()},
                            "optimizer": optimizer.state_dict(),
                            "scheduler": {"step": state["step"], "total": total, "warmup": warmup},
                            "scaler": scaler.state_dict(),
                            "sampler": {"seed": self.s.seed, "epoch": epoch + 1, "position": 0},
                            "loop": state,
                        },
                        self.settings_doc,
                    )
                self.dist.barrier()
                if stop:
                    self.log(
                        f"SIGTERM: {self.folder.name} stopped after epoch {epoch + 1} of {self.s.epochs} with its "
                        "checkpoint written; rerun the same command to resume"
                    )
                    raise SystemExit(PREEMPTED_EXIT)
        return self._finish(state, records, steps_per_epoch)

    def _export(self, model: FineTuneModel) -> None:
        from safetensors.torch import save

        head = {k: v.detach().cpu().contiguous().clone() for k, v in model.head.state_dict().items()}
        atomic_write_bytes(self.folder / HEAD_EXPORT, save(head))
        if model.method == "lora":
            adapters = {
                k: v.detach().cpu().contiguous().clone() for k, v in adapter_state_dict(model.foundation.root).items()
            }
            atomic_write_bytes(self.folder / ADAPTER_EXPORT, save(adapters))
        if self.s.export:  # the foundation's own key layout; LoRA adapters merged into their weights
            state = model.foundation_state_dict()
            tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}
            atomic_write_bytes(self.folder / EXPORT, save(tensors))

    def _finish(self, state: dict, records: HeadRecords, steps_per_epoch: int) -> dict:
        seconds = state["epoch_seconds"]
        result = {
            "settings_hash": self.settings_hash,
            "lr": self.s.lr,
            "seed": self.s.seed,
            "curve": [float(v) for v in records.curves[0]],
            "best_epoch": int(records.best_epoch[0]) + 1,
            "val": float(records.best_val[0]),
            "test": records.test_metrics[0],
            "steps_per_epoch": steps_per_epoch,
            "effective_batch_size": self.s.batch_size * self.s.accum * self.dist.world,
            "export": str(self.folder / EXPORT) if self.s.export else None,
            "trainable_parameters": sum(p.numel() for _, p in self.model.trainable_named_parameters()),
            "checkpoint_bytes": (self.folder / LAST).stat().st_size if (self.folder / LAST).is_file() else None,
            "timings": {
                "train_seconds": float(sum(seconds)),
                "train_s_per_epoch": float(np.mean(seconds)) if seconds else None,
                "train_s_per_epoch_min": float(np.min(seconds)) if seconds else None,
                "inference_s_per_img": self.eval_seconds / max(1, self.eval_images),
                "peak_memory_bytes": peak_memory_bytes(self.device),
            },
        }
        if self.dist.main:
            atomic_write_json(self.folder / RESULT, result)
        return result


def _load_records(records: HeadRecords, state: dict) -> None:
    """A checkpoint's best-epoch records; one written before they were kept as ``HeadRecords`` has them loose."""
    if "records" in state:
        records.load(state["records"])
        return
    for epoch, value in enumerate(state.get("curve", [])):
        records.observe(epoch, [value])
    records.test_metrics[0] = state.get("test")


class _TokenForward(torch.nn.Module):
    """Lets DDP wrap the from-cache path: ``forward(x, tokens=True)`` runs ``FineTuneModel.forward_tokens``."""

    def __init__(self, model: FineTuneModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, tokens: bool = False) -> torch.Tensor:
        return self.model.forward_tokens(x) if tokens else self.model(x)


def _ddp(model: FineTuneModel, dist: Dist, from_cache: bool):
    """The module the train step calls: the model itself, or its DDP wrapper under torchrun."""
    if dist.world == 1:
        return _TokenForward(model) if from_cache else model
    from torch.nn.parallel import DistributedDataParallel

    module = _TokenForward(model) if from_cache else model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
