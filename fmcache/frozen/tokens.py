"""The paper's second frozen protocol: DeiT (or attentive) heads trained on cached token layers, LR × seed grid.

Each head is what this would train on its own:

- init: the head built right after ``torch.manual_seed(seed)`` (so heads that share a seed share the init of the
  new parameters), then the pretrained DeiT-B parts loaded over it (``--head-weights``), unless random init;
- data order: a ``torch.Generator`` seeded with ``seed`` draws ``randperm(N)`` each epoch; batches of ``batch_size``
  in that order, the last partial batch dropped as the seed's train loader drops it (``drop_last`` off keeps it). Heads that share a seed share the order, so one read of a token
  batch feeds every LR of that seed;
- ``torch.optim.AdamW`` over :func:`fmcache.training.adamw_param_groups` (no decay on biases and 1-D parameters),
  ``clip_grad_norm_`` at 1.0, LR = base × :func:`fmcache.training.lr_multiplier` per step; bf16 autocast on GPU;
- val after every epoch; the best epoch is the first maximum; test is scored at each new best.

The heads run one after another on each batch: a DeiT-B head is large enough that stacking several (torch.func)
saves little over the loop, and the loop keeps each head bit-identical to a lone run.

Resume: after every epoch an atomic checkpoint (``checkpoints/probe_<head>_layerNN.pt`` beside the results) holds
every head's parameters and optimizer state, the data-order generators, the epoch, the val curves and best-so-far,
and the RNG states. A rerun of the same command continues from it and gives the same numbers as an uninterrupted
run (on CPU); a rerun with other settings is refused.

Best heads: each head's parameters at its best val epoch so far are kept for ``heads.safetensors`` (what ``fmcache
transfer`` applies) by :class:`BestStates`: beside the checkpoint, one file per head, written when the head improves
and before the epoch's checkpoint, the superseded one removed after it, so a kill at any instant leaves the file the
checkpoint's records point at, and RAM holds no head beyond those training.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmcache import metrics
from fmcache.cache.reader import CacheReader
from fmcache.cache.shards import token_dataset
from fmcache.choices import BEST_EPOCH_RULES, PAPER_TOKENS
from fmcache.dist import synchronize
from fmcache.errors import FmcacheError
from fmcache.files import remove_stale_temporaries
from fmcache.frozen.headfiles import Entry, save_state, state_entries, tensor_entry
from fmcache.frozen.heads import build_head
from fmcache.frozen.specs import PRELOAD
from fmcache.frozen.token_layers import LayerSpec, TokenNorm
from fmcache.frozen.views import epoch_views
from fmcache.headgrid import ProbeResult, check_lists, head_losses, labels_tensor, summarise
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

_EVAL_BATCH = 256


class TokenSplit:
    """One split's tokens of one layer, in RAM (stored dtype) or streamed from the shards by a DataLoader.

    Both give the same batches for the same index lists, so preloading never changes the numbers. With ``views``
    (train only), items are the cached augmented views: item ``i * k + v`` is view v of sample i. ``rows`` (sorted
    positions in the split, a label-efficiency subset) makes sample i the split's row ``rows[i]``.
    """

    def __init__(
        self,
        reader: CacheReader,
        split: str,
        layer: int | str,
        preload: bool,
        workers: int,
        views: bool = False,
        rows: np.ndarray | None = None,
    ):
        self.dataset = reader.view_tokens(layer) if views else reader.tokens(split, layer)
        self.k = reader.views_k if views else 0
        self.rows = None if rows is None else torch.as_tensor(np.asarray(rows, dtype=np.int64))
        self.labels = reader.labels(split) if rows is None else reader.labels(split)[rows]
        self.n = len(self.labels)
        self.workers = workers
        self.x = None
        if preload and views:  # the views group in one read per shard, stored dtype; item i·k + v is view v of i
            x = torch.from_numpy(reader._gather_views(token_dataset(layer))).flatten(0, 1)
            self.x = x if self.rows is None else x[self._items(torch.arange(self.n * self.k))]
        elif preload:
            x = torch.from_numpy(reader._gather(token_dataset(layer), split))
            self.x = x if self.rows is None else x[self.rows]

    def _items(self, idx: torch.Tensor) -> torch.Tensor:
        """The dataset's items for the subset's index list ``idx`` (a view item keeps its view: i·k + v)."""
        if self.rows is None:
            return idx
        if not self.k:
            return self.rows[idx]
        return self.rows[idx // self.k] * self.k + idx % self.k

    def batches(self, index_lists: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """(B, T, D) token batches (stored dtype in RAM, float32 when streamed) for each index list in turn."""
        if self.x is not None:
            for idx in index_lists:
                yield self.x[idx]
            return
        # each index list is one item of the loader: the dataset reads the whole batch into one array (``batch``)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            sampler=[self._items(idx).tolist() for idx in index_lists],
            batch_size=None,
            num_workers=self.workers,
            persistent_workers=False,
        )
        for tokens, _labels, _ids in loader:
            yield tokens

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        return self.batches(list(torch.arange(self.n).split(batch_size)))


def tokens_nbytes(reader: CacheReader, layer: int | str) -> int:
    model = reader.manifest["model"]
    total, dim = model["paper_token_shape"] if layer == PAPER_TOKENS else model["token_shapes"][str(layer)]
    itemsize = 2 if reader.manifest.get("dtype", "fp16") == "fp16" else 4
    return len(reader._index[0]) * int(total) * int(dim) * itemsize


def should_preload(reader: CacheReader, layer: int | str, preload: str) -> bool:
    """``yes``/``no`` as given; ``auto`` preloads when the layer's tokens (all splits) fit in a quarter of free RAM."""
    if preload not in PRELOAD:
        raise FmcacheError(f"unknown --preload '{preload}'; use {', '.join(PRELOAD)}")
    if preload != "auto":
        return preload == "yes"
    import psutil

    return tokens_nbytes(reader, layer) < psutil.virtual_memory().available / 4


def _autocast(device: torch.device):
    # bf16 on GPU (the modern default over the seed's fp16 + GradScaler: no scaler, same range as fp32)
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )


class BestStates:
    """Each head's state at its best val epoch so far: files ``<stem>_best_h<head>_e<epoch>.safetensors`` in
    ``folder`` (the checkpoint's folder, so a resumed run finds them), or held in RAM when there is no checkpoint.

    :meth:`save` writes a head's new best (before the epoch's checkpoint); :meth:`keep_only` (after it) removes every
    other file of those heads, stale ones from a killed run included; :meth:`state` names what :func:`train_token_grid`
    hands on for the heads file.
    """

    def __init__(self, folder: Path | None, stem: str):
        self.folder, self.stem = folder, stem
        self.held: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}

    def path(self, head: int, epoch: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.stem}_best_h{head}_e{epoch}.safetensors"

    def save(self, head: int, epoch: int, module: torch.nn.Module) -> None:
        if self.folder is None:
            self.held[head] = (epoch, {k: v.detach().cpu().clone() for k, v in module.state_dict().items()})
            return
        save_state(self.path(head, epoch), module.state_dict(), epoch)

    def keep_only(self, wanted: Mapping[int, int | None]) -> None:
        """Keep, of each head in ``wanted``, only the file of its epoch (None: none); call it once the checkpoint
        recording those epochs is written, so what a kill leaves is always what the checkpoint points at."""
        if self.folder is None:
            return
        for head, epoch in wanted.items():
            keep = None if epoch is None else self.path(head, int(epoch))
            for path in self.folder.glob(f"{self.stem}_best_h{head}_e*.safetensors"):
                if path != keep:
                    path.unlink(missing_ok=True)
            for tmp in self.folder.glob(f".{self.stem}_best_h{head}_e*.safetensors.tmp-*"):  # a killed write's
                remove_stale_temporaries(tmp.parent / tmp.name[1:].split(".tmp-")[0])

    def state(self, head: int, epoch: int) -> HeadState:
        if self.folder is None:
            held_epoch, tensors = self.held.get(head, (None, None))
            return HeadState(epoch, tensors=tensors) if held_epoch == epoch else HeadState(epoch)
        path = self.path(head, epoch)
        return HeadState(epoch, path=path if path.is_file() else None)


@dataclass(frozen=True)
class HeadState:
    """One head at its best epoch (0-based): a state file, or tensors in RAM; neither when it is not there (a
    checkpoint of an fmcache that kept no best states, resumed after its last epoch)."""

    epoch: int
    path: Path | None = None
    tensors: dict[str, torch.Tensor] | None = None

    @property
    def available(self) -> bool:
        return self.path is not None or self.tensors is not None

    def entries(self, prefix: str) -> list[Entry]:
        if self.path is not None:
            return state_entries(prefix, self.path)
        if self.tensors is not None:
            return [tensor_entry(f"{prefix}{k}", v) for k, v in self.tensors.items()]
        raise FmcacheError(f"the best state of a head at epoch {self.epoch + 1} was not kept")


@torch.no_grad()
def head_probs(
    heads: Mapping[int, torch.nn.Module], split: TokenSplit, norm: TokenNorm, device: torch.device, multilabel: bool
) -> dict[int, np.ndarray]:
    """(n, C) float64 probabilities (softmax, or sigmoid for multi-label) of each head on ``split``, in eval mode, in
    batches of 256 read once for every head: how the grid scores val and test, and how a transfer scores its target
    (the same batches, so a transfer to the source's own cache gives the same numbers)."""
    for head in heads.values():
        head.eval()
    parts: dict[int, list[torch.Tensor]] = {h: [] for h in heads}
    for xb in split.in_order(_EVAL_BATCH):
        xb = norm(xb.to(device))
        for h, head in heads.items():
            with _autocast(device):
                logits = head(xb).float()
            parts[h].append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, -1)).cpu())
    synchronize(device)
    return {h: torch.cat(p).double().numpy() for h, p in parts.items()}


@dataclass
class TokenGridSettings:
    kind: str
    lrs: list[float]
    seeds: list[int]
    num_classes: int
    metric: str
    multilabel: bool
    epochs: int
    batch_size: int
    weight_decay: float
    warmup: dict
    schedule: str
    grad_clip: float | None
    depth: int
    heads_per_pass: int
    label_names: list[str] | None
    drop_last: bool = True
    best_epoch: str = "seed"  # fmcache.choices.BEST_EPOCH_RULES


def passes(n_lrs: int, seeds: Sequence[int], heads_per_pass: int) -> list[list[int]]:
    """Head indices (LR-major: lr_index × n_seeds + seed_index) per pass, seed-major so a pass keeps a seed's LRs
    together and reads each of its batches once."""
    order = [i * len(seeds) + j for j in range(len(seeds)) for i in range(n_lrs)]
    size = heads_per_pass if heads_per_pass > 0 else len(order)
    return [order[k : k + size] for k in range(0, len(order), size)]


def train_token_grid(
    spec: LayerSpec,
    train: TokenSplit,
    val: TokenSplit,
    test: TokenSplit,
    cfg: TokenGridSettings,
    device: torch.device,
    pretrained: dict[str, torch.Tensor] | None,
    checkpoint: Path | None = None,
    ckpt_settings: dict | None = None,
    resume: bool = True,
    on_epoch: Callable[[int], None] | None = None,
) -> ProbeResult:
    """Train the LR × seed grid of token heads on one layer; see the module doc."""
    lrs, seeds = check_lists(cfg.lrs, cfg.seeds)
    n_heads = len(lrs) * len(seeds)
    y_train = labels_tensor(train.labels, train.n, cfg.num_classes, cfg.multilabel, "train")
    for split in (val, test):
        labels_tensor(split.labels, split.n, cfg.num_classes, cfg.multilabel, "val/test")
    steps_per_epoch = len(batch_starts(train.n, cfg.batch_size, cfg.drop_last))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = warmup_steps_for(
        cfg.warmup.get("warmup_epochs"), cfg.warmup.get("warmup_iters"), steps_per_epoch, total_steps
    )
    norm = TokenNorm(spec, device)
    records = HeadRecords(n_heads, cfg.epochs, BEST_EPOCH_RULES[cfg.best_epoch])
    best = BestStates(
        None if checkpoint is None else checkpoint.parent, "best" if checkpoint is None else checkpoint.stem
    )
    plan = passes(len(lrs), seeds, cfg.heads_per_pass)
    state = None
    if checkpoint is not None and resume:
        state = load_checkpoint(checkpoint, ckpt_settings or {})
    first_pass, first_epoch, train_seconds = 0, 0, 0.0
    if state is not None:
        records.load(state["records"])
        first_pass, first_epoch, train_seconds = state["pass"], state["epoch"], state["train_seconds"]
    for p, heads_idx in enumerate(plan):
        if p < first_pass:
            continue
        resumed = state if (state is not None and p == first_pass) else None
        start_epoch = first_epoch if resumed is not None else 0
        if start_epoch >= cfg.epochs:
            continue
        run = _Pass(spec, heads_idx, lrs, seeds, cfg, device, pretrained, resumed)
        for epoch in range(start_epoch, cfg.epochs):
            synchronize(device)
            t0 = time.perf_counter()
            run.train_epoch(
                epoch, train, y_train, norm, lambda step: lr_multiplier(step, total_steps, warmup, cfg.schedule)
            )
            synchronize(device)
            train_seconds += time.perf_counter() - t0
            run.evaluate(epoch, val, test, norm, records, best)
            done_pass = epoch + 1 == cfg.epochs
            if checkpoint is not None:
                nxt = (p + 1, 0) if done_pass else (p, epoch + 1)
                save_checkpoint(
                    checkpoint,
                    {
                        "pass": nxt[0],
                        "epoch": nxt[1],
                        "train_seconds": train_seconds,
                        "records": records.state(),
                        **({} if done_pass else run.state()),
                    },
                    ckpt_settings or {},
                )
            best.keep_only({h: records.best_epoch[h] for h in heads_idx})  # the checkpoint points at these now
            if on_epoch is not None:
                on_epoch(epoch + 1)
        del run
    settings = {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "drop_last": cfg.drop_last,
        "weight_decay": cfg.weight_decay,
        "warmup_steps": warmup,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "schedule": cfg.schedule,
        "grad_clip": cfg.grad_clip,
        "optimizer": f"AdamW(betas={ADAM_BETAS}, eps={ADAM_EPS})",
        "autocast": "bf16" if device.type == "cuda" else "off (fp32)",
        "device": str(device),
        "n_train": train.n,
        "n_val": val.n,
        "n_test": test.n,
        "tokens": spec.num_tokens,
        "token_dim": spec.dim,
        "grid": list(spec.grid) if spec.grid else None,
        "heads_per_pass": cfg.heads_per_pass or n_heads,
        "passes": len(plan),
    }
    result = summarise(cfg.metric, lrs, seeds, records, settings, train_seconds)
    # the heads transfer applies: each seed of the best LR at its best epoch (heads are LR-major)
    first = lrs.index(result.best_lr) * len(seeds)
    heads = [first + j for j in range(len(seeds))]
    best.keep_only({h: records.best_epoch[h] if h in heads else None for h in range(n_heads)})  # only these are saved
    return dataclasses.replace(result, heads={"states": [best.state(h, int(records.best_epoch[h])) for h in heads]})


class _Pass:
    """The heads of one pass, their optimizers and the data-order generators of their seeds."""

    def __init__(self, spec, heads_idx, lrs, seeds, cfg: TokenGridSettings, device, pretrained, resumed: dict | None):
        self.cfg, self.device, self.heads_idx = cfg, device, heads_idx
        n_seeds = len(seeds)
        self.seed_of = {h: h % n_seeds for h in heads_idx}
        self.lr_of = {h: lrs[h // n_seeds] for h in heads_idx}
        self.seed_idx = sorted({self.seed_of[h] for h in heads_idx})
        inits = {}
        for j in self.seed_idx:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seeds[j])
                head = build_head(cfg.kind, spec.dim, cfg.num_classes, cfg.depth, spec.grid)
            if pretrained is not None:
                head.load_pretrained(pretrained)
            inits[j] = head
        self.heads, self.optimizers = {}, {}
        for h in heads_idx:
            head = copy.deepcopy(inits[self.seed_of[h]]).to(device)
            self.heads[h] = head
            groups = adamw_param_groups(head.named_parameters(), cfg.weight_decay)
            # foreach: one fused pass over a head's tensors (torch's CPU default is a loop per tensor)
            self.optimizers[h] = torch.optim.AdamW(
                groups, lr=self.lr_of[h], betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True
            )
        self.seeds = seeds
        self.generators = {j: torch.Generator().manual_seed(seeds[j]) for j in self.seed_idx}
        self.step = 0
        if resumed is not None:
            for h in heads_idx:
                self.heads[h].load_state_dict(resumed["heads"][str(h)])
                self.optimizers[h].load_state_dict(resumed["optimizers"][str(h)])
            for j in self.seed_idx:
                self.generators[j].set_state(resumed["generators"][str(j)])
            self.step = resumed["step"]

    def state(self) -> dict:
        return {
            "heads": {str(h): m.state_dict() for h, m in self.heads.items()},
            "optimizers": {str(h): o.state_dict() for h, o in self.optimizers.items()},
            "generators": {str(j): g.get_state() for j, g in self.generators.items()},
            "step": self.step,
        }

    def train_epoch(self, epoch: int, train: TokenSplit, y: torch.Tensor, norm: TokenNorm, multiplier) -> None:
        orders = {j: torch.randperm(train.n, generator=g) for j, g in self.generators.items()}
        keep = len(batch_starts(train.n, self.cfg.batch_size, self.cfg.drop_last))  # the seed drops a partial batch
        index_lists = {j: list(order.split(self.cfg.batch_size))[:keep] for j, order in orders.items()}
        items = index_lists
        if train.k:  # one cached view per sample, drawn per (seed, epoch) as the linear heads draw theirs
            items = {}
            for j, order in orders.items():
                view = epoch_views(self.seeds[j], epoch, train.n, train.k)
                items[j] = list((order * train.k + view[order]).split(self.cfg.batch_size))[:keep]
        streams = {j: train.batches(items[j]) for j in self.seed_idx}
        for head in self.heads.values():
            head.train()
        for b in range(len(index_lists[self.seed_idx[0]])):
            mult = multiplier(self.step)
            for j in self.seed_idx:
                xb = norm(next(streams[j]).to(self.device, non_blocking=True))
                yb = y[index_lists[j][b]].to(self.device)
                for h in self.heads_idx:
                    if self.seed_of[h] == j:
                        self._step(h, xb, yb, mult)
            self.step += 1

    def _step(self, h: int, xb: torch.Tensor, yb: torch.Tensor, mult: float) -> None:
        head, opt = self.heads[h], self.optimizers[h]
        for group in opt.param_groups:
            group["lr"] = self.lr_of[h] * mult
        with _autocast(self.device):
            logits = head(xb)
        loss = head_losses(logits.float()[None], yb[None], self.cfg.multilabel).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(head.parameters(), self.cfg.grad_clip)
        opt.step()

    def _probs(
        self, split: TokenSplit, heads: list[int], norm: TokenNorm, records: HeadRecords
    ) -> dict[int, np.ndarray]:
        start = time.perf_counter()
        probs = head_probs({h: self.heads[h] for h in heads}, split, norm, self.device, self.cfg.multilabel)
        records.forward_seconds += time.perf_counter() - start
        records.forward_samples += split.n * len(heads)
        return probs

    def evaluate(
        self, epoch: int, val: TokenSplit, test: TokenSplit, norm: TokenNorm, records: HeadRecords, best: BestStates
    ) -> None:
        evaluate = lambda y, p: metrics.evaluate(self.cfg.metric, y, p, self.cfg.multilabel, self.cfg.label_names)  # noqa: E731
        val_probs = self._probs(val, self.heads_idx, norm, records)
        values = {h: float(evaluate(val.labels, val_probs[h])["value"]) for h in self.heads_idx}
        improved = records.observe(epoch, values)
        if improved:  # test is only scored at a new best val: that is the only test number reported
            test_probs = self._probs(test, improved, norm, records)
            for h in improved:
                records.best_val_probs[h] = val_probs[h].astype(np.float32)
                records.best_test_probs[h] = test_probs[h].astype(np.float32)
                # through JSON now, so a resumed run (which reads them back from JSON) reports identical values
                records.test_metrics[h] = json_roundtrip(evaluate(test.labels, test_probs[h]))
                best.save(h, epoch, self.heads[h])


__all__ = ["TokenGridSettings", "TokenSplit", "head_probs", "should_preload", "train_token_grid"]
