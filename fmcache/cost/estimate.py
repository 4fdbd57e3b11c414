"""A grid job's cost before it runs: per job forward passes, FLOPs, bytes and wall time, and the seed's cost beside it.

Nothing here needs data or weights. A model's forward FLOPs per image and the shapes the cache stores come from
:mod:`fmcache.cost.counting` (exact counts on the meta device, kept in ``flops.json``).

Each job's cost (:func:`Estimator.job`) is built from those counts and a :class:`Rates`: achieved FLOP/s for
inference and for training (training counted as 3 × the forward of what trains), the per-step and per-parameter
costs of an optimizer step, the data path (decode per image and per megapixel, the train augmentation), disk
bytes/s and fixed per-job costs (:mod:`fmcache.cost.rates`: ``fmcache calibrate``'s measurement or a GPU preset).

Beside every job the seed's online cost for the same result (:meth:`Estimator.job`'s second value): a frozen run
recomputes the foundation on every step of every epoch over train (with the train augmentation), on val every epoch
and on test once; the k-NN bank is rebuilt for every evaluation (every k); CKA runs the models over the compared
split; fine-tuning is the same end-to-end path in both, except where the images come from: the seed decodes every
image every epoch, augments it in the loader and checkpoints every epoch, while a fine-tune job may read a pixel
cache (``pixels: on``; a pixel job writes it first), draw the augmentation on the device (``augment: device``) and
checkpoint every ``checkpoint_every`` seconds. ``Estimator(..., data_path="images")`` prices every job on the old
path (no pixel job, the seed's fine-tuning data path), so a dry run shows both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import cache
from typing import Protocol

from fmcache.choices import DEIT_DEPTH
from fmcache.config import as_floats, as_ints
from fmcache.cost.counting import Counts, ModelShape
from fmcache.cost.rates import Rates
from fmcache.errors import FmcacheError
from fmcache.extract.spec import ExtractSpec, parse_tokens, token_layers, wants_paper_tokens
from fmcache.protocols import get_protocol
from fmcache.runners import spec_class

# -- per job ------------------------------------------------------------------------------------------------------------


@dataclass
class Cost:
    """One job's (or a sum's) cost. ``forwards``: images through the foundation."""

    forwards: float = 0.0
    flops: float = 0.0
    written: float = 0.0
    read: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Cost)))

    def scaled(self, factor: float) -> Cost:
        return Cost(*(getattr(self, f.name) * factor for f in fields(Cost)))


@dataclass(frozen=True)
class DataSize:
    """A dataset's split sizes, classes and stored image size (megapixels) for the estimate."""

    train: int
    val: int
    test: int
    classes: int
    mpx: float
    note: str = ""

    @property
    def total(self) -> int:
        return self.train + self.val + self.test

    def split(self, name: str) -> int:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


@dataclass
class JobCost:
    ours: Cost
    seed: Cost
    data_bound: bool = False  # fmcache's time is set by image decoding with the job's workers, not by compute


TOKEN_PRELOAD_BYTES = 32 * 2**30  # the token heads stream a layer larger than a quarter of RAM (128 GiB assumed)
DATA_PATHS = ("config", "images")  # what each job asks for, or every image decoded every epoch (the old path)


def _defaults(spec_class: type) -> dict:
    return {f.name: f.default for f in fields(spec_class) if f.default is not MISSING}


@cache
def _protocol_defaults(kind: str) -> dict:
    return _defaults(spec_class(kind))


@cache
def _extract_defaults() -> dict:
    return _defaults(ExtractSpec)


def _options(job) -> dict:
    """A protocol job's options over its spec's defaults (the grid checked them against the same spec; an option
    left None takes the default), so the estimate assumes what the runner will run."""
    return {**_protocol_defaults(job.kind), **{k: v for k, v in job.options.items() if v is not None}}


def _extract_options(extract: dict) -> dict:
    """Extraction settings over :class:`~fmcache.extract.plan.ExtractSpec`'s defaults."""
    return {**_extract_defaults(), **{k: v for k, v in extract.items() if v is not None}}


def _itemsize(extract: dict) -> int:
    """Bytes of one cached number: fp32, else fp16 (the default)."""
    return 4 if extract.get("dtype") == "fp32" else 2


def _count(value) -> int:
    """A count of LRs, seeds or ks from a list, a comma string or a number (seeds: a number N means 0..N-1)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(1, int(value))
    if isinstance(value, str):
        return max(1, len([v for v in value.split(",") if v.strip()]))
    return max(1, len(list(value)))


def bests(epochs: int) -> float:
    """Assumed number of new best val epochs (each scores test): about 1 + 2 ln E, at most E."""
    return min(float(epochs), 1.0 + 2.0 * math.log(max(1, epochs)))


def _cut(size: int, fraction: float | None, per_class: int | None, classes: int) -> int:
    """A subset's size: round(f · N) half up (the runner rounds each class so; summed, this is within a sample per
    class), or n per class."""
    if fraction is not None:
        return min(size, math.floor(fraction * size + 0.5 + 1e-9))
    return min(size, int(per_class) * classes)


def subset_runs(o: dict, ds: DataSize) -> list[DataSize]:
    """The data each run of a job sees: the whole split for a plain run; with ``train_fraction`` or
    ``train_per_class`` (label efficiency), one run per amount and repeat on its own train size (val cut the same way
    when it follows), and an amount that is the whole split once, not per repeat, as the runner plans them
    (:func:`fmcache.frozen.subsets.plan`)."""
    fractions, counts = o.get("train_fraction"), o.get("train_per_class")
    if fractions is None and counts is None:
        return [ds]
    amounts = [(f, None) for f in (as_floats("train_fraction", fractions, example="0.01,0.1,1.0") if fractions else ())]
    amounts += [(None, n) for n in (as_ints("train_per_class", counts, example="1,5,10") if counts else ())]
    follows = bool(o.get("val_fraction_follows"))
    runs = []
    for fraction, per_class in amounts:
        train = _cut(ds.train, fraction, per_class, ds.classes)
        val = _cut(ds.val, fraction, per_class, ds.classes) if follows else ds.val
        full = train == ds.train and val == ds.val
        runs += [replace(ds, train=train, val=val)] * (1 if full else int(o.get("subset_repeats") or 1))
    return runs


def _names(value) -> list[str] | None:
    """``lora_targets`` from text (``attn.qkv,attn.proj``) or a list; None: the family's default."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [v.strip() for v in items if v.strip()] or None


def _layer_list(value, layers: int) -> list[int]:
    """1-based layers from ``last``, ``all``, a number or a list (``paper`` is handled by the callers)."""
    if value is None or str(value).strip() in ("", "last"):
        return [layers]
    text = str(value).strip()
    if text == "all":
        return list(range(1, layers + 1))
    out = []
    for part in text.replace("[", "").replace("]", "").split(","):
        part = part.strip()
        if part == "last":
            out.append(layers)
        elif part.isdigit():
            out.append(min(layers, max(1, int(part))))
    return out or [layers]


class Estimator:
    """Cost of each grid job, on ``rates``, for datasets of ``sizes``."""

    def __init__(
        self, rates: Rates, sizes: dict[str, DataSize | None], counts: Counts | None = None, data_path: str = "config"
    ):
        if data_path not in DATA_PATHS:
            raise FmcacheError(f"unknown data path {data_path!r}; use {', '.join(DATA_PATHS)}")
        self.rates, self.sizes = rates, sizes
        self.counts = counts or Counts()
        self.legacy = data_path == "images"
        self.data_ratio = 0.0  # the largest data path / compute of a fine-tune job priced so far (1.0: data-bound)

    # -- building blocks
    def _fwd_s(self, shape: ModelShape, flops: float) -> float:
        return flops / (self.rates.fwd_conv if shape.conv else self.rates.fwd)

    def _train_s(self, shape: ModelShape | None, flops: float) -> float:
        return flops / (self.rates.train_conv if shape is not None and shape.conv else self.rates.train)

    def _decode_s(self, ds: DataSize, img_size: int) -> float:
        """Reading, decoding and resizing one stored image (per megapixel), then the crop and normalisation at the
        model's input size (the fixed part, measured at 224 px)."""
        return self.rates.decode_s * (img_size / 224) ** 2 + self.rates.decode_s_per_mpx * ds.mpx

    def _augment_s(self, img_size: int) -> float:
        return self.rates.augment_s * (img_size / 224) ** 2

    def _pixel_read_s(self, img_size: int, channels: int) -> float:
        """One cached crop read by a loader worker (its bytes: img_size² × channels)."""
        return self.rates.pixel_read_s * (img_size / 224) ** 2 * channels / 3

    def _device_augment_s(self, img_size: int) -> float:
        return self.rates.device_augment_s * (img_size / 224) ** 2

    def _pipeline(self, compute_s: float, data_s: float, workers: int, ours: bool = True) -> float:
        """Compute and the data path: overlapped across ``workers`` on a GPU, sharing the cores on a CPU."""
        if self.rates.overlap and workers > 0:
            if ours and data_s / workers > compute_s:
                self._data_bound = True
            return max(compute_s, data_s / workers)
        return compute_s + data_s

    def _build_s(self, params: float) -> float:
        return params * self.rates.build_s_per_param

    def _step_s(self, params: float) -> float:
        return self.rates.step_s + params * self.rates.opt_s_per_param

    @staticmethod
    def _img_size(job) -> int:
        from fmcache.models.registry import get_spec  # deferred: torch (the registry package builds models)

        return int(job.model.get("img_size") or get_spec(job.model["name"]).default_img_size)

    # -- the cache
    def row_bytes(self, shape: ModelShape, extract: dict) -> float:
        """Bytes one cached image takes: pooled arrays of every layer, the paper feature, the cached token layers."""

        item = _itemsize(extract)
        pools = (2 if shape.prefix > 0 else 1) * shape.layers * max(shape.dims)
        request = parse_tokens(str(_extract_options(extract)["tokens"]))
        tokens = sum(shape.tokens[n - 1] * shape.dims[n - 1] for n in token_layers(request, shape.layers))
        if wants_paper_tokens(request):
            tokens += shape.head_tokens[0] * shape.head_tokens[1]
        return (pools + shape.pooled_dim + tokens) * item + 17  # + id, label, split

    def extract_cost(self, job, shape: ModelShape, ds: DataSize, extract: dict) -> Cost:
        e = _extract_options(extract)
        corrupt = e.get("corrupt") is not None
        if corrupt:  # a corrupted cache holds the test split only; the corruption costs about an augmentation
            ds = replace(ds, train=0, val=0)
        views = int(e["views"])
        images = ds.total + views * ds.train
        flops = images * shape.flops
        written = images * self.row_bytes(shape, extract)
        size = self._img_size(job)
        # the grid makes an extract with views depend on the pixel cache of its size: nothing is decoded then
        pixels = not self.legacy and any(str(d).startswith("pixels/") for d in getattr(job, "deps", []))
        read = self._pixel_read_s(size, _channels(job.dataset["name"])) if pixels else self._decode_s(ds, size)
        data = ds.total * (read + (self._augment_s(size) if corrupt else 0.0)) + views * ds.train * self._augment_s(
            size
        )
        workers = int(e["workers"])
        seconds = (
            self.rates.job_s
            + self._build_s(shape.params)
            + self._pipeline(self._fwd_s(shape, flops), data, workers)
            + written / self.rates.io_bytes_s
        )
        return Cost(images, flops, written, 0.0, seconds)

    # -- one job
    def job(self, job) -> JobCost:
        self._data_bound = False
        cost = self._job(job)
        cost.data_bound = self._data_bound
        return cost

    def _job(self, job) -> JobCost:
        ds = self.sizes.get(job.dataset["name"])
        if ds is None:
            raise FmcacheError(f"dataset {job.dataset['name']}: no size known")
        if getattr(job, "is_pixels", False):  # a pixel cache: no model; the old data path has none
            return JobCost(Cost() if self.legacy else self.pixels_cost(job, ds), Cost())
        shape = self.counts.model(job.model)
        if job.is_extract:
            return JobCost(self.extract_cost(job, shape, ds, job.extract), Cost())
        model = get_protocol(job.kind).cost  # the protocol's trait names its cost model
        if model == "end_to_end":
            ours = self._finetune(job, shape, ds, self.legacy)
            # the same end-to-end path in fmcache and the seed, but the seed's data path
            seed = ours if self.legacy else self._finetune(job, shape, ds, legacy=True)
            return JobCost(ours, seed)
        models = {
            "neighbours": self._knn,
            "pooled_heads": self._linear,
            "token_heads": self._tokens,
            "similarity": self._cka,
            "applying": self._apply,
        }
        if model not in models:
            raise FmcacheError(f"no cost model {model!r} for job kind {job.kind}")
        total = JobCost(Cost(), Cost())
        for data in subset_runs(_options(job), ds):  # every run the job does: one, or one per train subset
            run = models[model](job, shape, data)
            total = JobCost(total.ours + run.ours, total.seed + run.seed)
        return total

    def _seed_frozen_run(
        self,
        job,
        shape: ModelShape,
        ds: DataSize,
        epochs: int,
        batch: int,
        fraction: float,
        head_train_flops: float,
        head_eval_flops: float,
        head_params: float,
    ) -> Cost:
        """One of the seed's frozen runs: the foundation (up to ``fraction`` of its blocks) on every train step with
        the augmentation, on val every epoch and on test once, then the head."""
        used = (ds.train // batch) * batch
        images = epochs * (used + ds.val) + ds.test
        fwd = shape.flops * fraction
        flops = images * fwd + epochs * used * head_train_flops + (epochs * ds.val + ds.test) * head_eval_flops
        data = images * self._decode_s(ds, self._img_size(job)) + epochs * used * self._augment_s(self._img_size(job))
        compute = (
            self._fwd_s(shape, images * fwd)
            + self._train_s(None, epochs * used * head_train_flops)
            + (epochs * ds.val + ds.test) * head_eval_flops / self.rates.fwd
            + epochs * (ds.train // batch) * self._step_s(head_params)
        )
        workers = int(_extract_options(job.extract)["workers"])
        seconds = (
            self.rates.job_s
            + self._build_s(shape.params)
            + self._pipeline(compute, data, workers, False)
            + (epochs + 1) * self.rates.metric_s
        )
        return Cost(images, flops, 0.0, 0.0, seconds)

    def _knn(self, job, shape: ModelShape, ds: DataSize) -> JobCost:
        o = _options(job)
        layers = _layer_list(o["layer"], shape.layers)
        ks = _count(o["ks"])
        splits = o["eval_splits"]
        splits = splits.split(",") if isinstance(splits, str) else splits
        queries = sum(ds.split(s.strip()) for s in splits if s.strip() in ("val", "test"))
        dim = shape.pooled_dim if len(layers) == 1 else max(shape.dims)
        item = _itemsize(job.extract)
        search = len(layers) * 2.0 * queries * ds.train * dim
        read = ds.total * len(layers) * dim * item
        ours = Cost(0, search, 0, read, self.rates.job_s + search / self.rates.fp32 + read / self.rates.io_bytes_s)
        # the seed: every evaluation (one per k) runs the foundation over the bank and the queries again
        images = ks * (ds.train + queries)
        data = images * self._decode_s(ds, self._img_size(job))
        compute = self._fwd_s(shape, images * shape.flops) + ks * search / len(layers) / self.rates.fp32
        seed = Cost(
            images,
            images * shape.flops + ks * search / len(layers),
            0,
            0,
            self.rates.job_s + self._build_s(shape.params) + self._pipeline(compute, data, 2, False),
        )
        return JobCost(ours, seed)

    def _linear(self, job, shape: ModelShape, ds: DataSize) -> JobCost:
        o = _options(job)
        layers = _layer_list(o["layer"], shape.layers)
        heads = _count(o["lrs"]) * _count(o["seeds"])
        epochs, batch = int(o["epochs"]), int(o["batch_size"])
        views = int(_extract_options(job.extract)["views"]) if str(o["views"]) != "off" else 0
        dim = shape.pooled_dim if len(layers) == 1 else max(shape.dims)
        item = _itemsize(job.extract)
        steps = epochs * (ds.train // batch)
        per = 2.0 * dim * ds.classes  # one head's forward on one sample
        flops = len(layers) * heads * per * (3 * steps * batch + epochs * ds.val + bests(epochs) * ds.test)
        read = len(layers) * (ds.total + views * ds.train) * dim * item
        seconds = (
            self.rates.job_s
            + read / self.rates.io_bytes_s
            + flops / self.rates.fp32
            + len(layers) * (steps * self.rates.linear_step_s + epochs * heads * self.rates.metric_s)
        )
        ours = Cost(0, flops, 0, read, seconds)
        seed = Cost()
        for layer in layers:  # the seed: one run per (layer, LR, seed), the foundation cut after that layer
            run = self._seed_frozen_run(job, shape, ds, epochs, batch, layer / shape.layers, 3 * per, per, dim)
            seed = seed + run.scaled(heads)
        return JobCost(ours, seed)

    def _token_layers(self, job, shape: ModelShape) -> list[tuple[float, int, int]]:
        """(foundation fraction, tokens, width) of each layer a token-head job trains on."""

        value = str(_options(job)["layer"]).strip()
        if value == "paper":
            return [(1.0, *shape.head_tokens)]
        if value == "all":
            request = parse_tokens(str(_extract_options(job.extract)["tokens"]))
            numbers = token_layers(request, shape.layers) or [shape.layers]
        else:
            numbers = _layer_list(value, shape.layers)
        prefix = shape.prefix
        return [(n / shape.layers, shape.tokens[n - 1] - prefix, shape.dims[n - 1]) for n in numbers]

    def _tokens(self, job, shape: ModelShape, ds: DataSize) -> JobCost:
        o = _options(job)
        kind = get_protocol(job.kind).head
        heads = _count(o["lrs"]) * _count(o["seeds"])
        epochs, batch = int(o["epochs"]), int(o["batch_size"])
        depth = int(o["head_depth"])
        views = int(_extract_options(job.extract)["views"]) if str(o["views"]) != "off" else 0
        item = _itemsize(job.extract)
        steps = ds.train // batch
        ours, seed = Cost(), Cost()
        for fraction, tokens, dim in self._token_layers(job, shape):
            hf, hp = self.counts.head(kind, max(1, tokens), dim, ds.classes, depth)
            train_flops = heads * epochs * steps * batch * 3 * hf
            eval_flops = heads * (epochs * ds.val + bests(epochs) * ds.test) * hf
            layer_bytes = (ds.total + views * ds.train) * (tokens + shape.prefix) * dim * item
            preload = layer_bytes <= TOKEN_PRELOAD_BYTES
            read = layer_bytes if preload else epochs * ds.total * (tokens + shape.prefix) * dim * item
            checkpoints = epochs * heads * hp * 12  # parameters and AdamW state, every epoch
            seconds = (
                self._train_s(None, train_flops)
                + eval_flops / self.rates.fwd
                + heads * epochs * steps * self._step_s(hp)
                + heads * (epochs + bests(epochs)) * self.rates.metric_s
                + (read + checkpoints) / self.rates.io_bytes_s
            )
            ours = ours + Cost(0, train_flops + eval_flops, checkpoints, read, seconds)
            run = self._seed_frozen_run(job, shape, ds, epochs, batch, fraction, 3 * hf, hf, hp)
            seed = seed + run.scaled(heads)
        ours.seconds += self.rates.job_s
        return JobCost(ours, seed)

    def _apply(self, job, shape: ModelShape, ds: DataSize) -> JobCost:
        """Another job's heads on this job's cache (transfer): inference only. k-NN searches the source's train
        bank; linear heads are a matrix product; token heads run forward once per seed. The seed has no such run:
        it would run the foundation over the target's images once."""
        o = _options(job)
        heads_kind = str(o.get("from") or "").partition("#")[0]
        model = get_protocol(heads_kind).cost if heads_kind else "pooled_heads"
        n = ds.test if _extract_options(job.extract).get("corrupt") is not None else ds.total
        source = self.sizes.get(str(o.get("source") or job.dataset["name"])) or ds
        seeds = _count(_protocol_defaults(heads_kind).get("seeds", 1)) if heads_kind else 1
        item = _itemsize(job.extract)
        dim = shape.pooled_dim
        if model == "neighbours":
            flops, read = 2.0 * n * source.train * dim, (n + source.train) * dim * item
        elif model == "token_heads":
            # the heads' layer is the source result's; priced at the last block's tokens
            tokens, width = shape.tokens[-1] - shape.prefix, shape.dims[-1]
            hf, _ = self.counts.head(get_protocol(heads_kind).head, max(1, tokens), width, ds.classes, DEIT_DEPTH)
            flops, read = seeds * n * hf, n * tokens * width * item
        else:
            flops, read = seeds * n * 2.0 * dim * ds.classes, n * dim * item
        ours = Cost(0, flops, 0, read, self.rates.job_s + flops / self.rates.fwd + read / self.rates.io_bytes_s)
        data = n * self._decode_s(ds, self._img_size(job))
        compute = self._fwd_s(shape, n * shape.flops)
        seed = Cost(
            n,
            n * shape.flops,
            0,
            0,
            self.rates.job_s + self._build_s(shape.params) + self._pipeline(compute, data, 2, False),
        )
        return JobCost(ours, seed)

    def _cka(self, job, shape: ModelShape, ds: DataSize) -> JobCost:
        o = _options(job)
        split = str(o["split"])
        n = ds.split(split) if split in ("train", "val", "test") else ds.total
        item = _itemsize(job.extract)
        layers_a = _layer_list(o["layers"], shape.layers)
        width_a = sum(shape.dims[i - 1] for i in layers_a)
        ours = Cost()
        if job.model_b is not None:
            shape_b = self.counts.model(job.model_b)
            layers_b = _layer_list(o["layers_b"] or o["layers"], shape_b.layers)
            width_b = sum(shape_b.dims[i - 1] for i in layers_b)
            fwd_b = shape_b.flops
        elif o.get("after_finetune"):
            # Fig. 7: the grid extracts the fine-tuned export with the same settings first
            ours = ours + self.extract_cost(job, shape, ds, job.extract)
            width_b, fwd_b, shape_b = width_a, shape.flops, shape
        else:
            width_b, fwd_b, shape_b = 0, 0.0, None
        width = width_a + width_b
        flops = 2.0 * n * width * width
        read = n * width * item
        ours = ours + Cost(0, flops, 0, read, self.rates.job_s + flops / self.rates.fp64 + read / self.rates.io_bytes_s)
        # the seed: each model over the compared split
        images = n * (1 + (1 if shape_b is not None else 0))
        fwd_flops = n * (shape.flops + fwd_b)
        compute = self._fwd_s(shape, fwd_flops) + flops / self.rates.fp64
        seed = Cost(
            images,
            fwd_flops + flops,
            0,
            0,
            self.rates.job_s
            + self._build_s(shape.params)
            + self._pipeline(compute, images * self._decode_s(ds, self._img_size(job)), 2, False),
        )
        return JobCost(ours, seed)

    def pixels_cost(self, job, ds: DataSize) -> Cost:
        """A pixel job (``fmcache pixels``): every image decoded once by the loader's workers, its crop written."""
        size, channels = int(job.model["img_size"]), _channels(job.dataset["name"])
        images = ds.total
        written = images * size * size * channels
        workers = max(1, int(job.options.get("workers") or 4))
        seconds = self.rates.job_s + images * self._decode_s(ds, size) / workers + written / self.rates.io_bytes_s
        return Cost(0, 0.0, written, 0.0, seconds)

    def _finetune_data(
        self, o: dict, ds: DataSize, size: int, dataset: str, legacy: bool
    ) -> tuple[float, float, float]:
        """Per train image: the loader's seconds and the device's (augmentation); per evaluated image: the loader's."""
        # auto: a pixel cache only if one exists, priced as images; YAML 1.1 reads a bare on as true
        pixels = not legacy and o.get("pixels") in ("on", True)
        device = not legacy and str(o.get("augment")) == "device"
        read = self._pixel_read_s(size, _channels(dataset)) if pixels else self._decode_s(ds, size)
        train = read + (0.0 if device else self._augment_s(size))
        return train, (self._device_augment_s(size) if device else 0.0), read

    def _finetune(self, job, shape: ModelShape, ds: DataSize, legacy: bool = False) -> Cost:
        o = _options(job)
        runs = _count(o["lrs"]) * _count(o["seeds"])
        epochs, batch = int(o["epochs"]), int(o["batch_size"])
        blocks = shape.layers
        freeze = str(o["freeze"]).strip()
        drop = o["drop_after"]
        used = min(blocks, int(drop)) if drop is not None else blocks
        fraction = used / blocks
        if freeze == "none":
            trainable = 1.0
        elif freeze == "all":
            trainable = 0.0
        else:
            trainable = max(0.0, (used - min(used, int(freeze))) / blocks)
        # the head on the last used layer's tokens (deit) or pooled feature (linear)
        if get_protocol(job.kind).head == "deit":
            if drop is None:
                tokens, dim = shape.head_tokens
            else:
                tokens, dim = shape.tokens[used - 1] - shape.prefix, shape.dims[used - 1]
            hf, hp = self.counts.head("deit", max(1, tokens), dim, ds.classes, int(o["head_depth"]))
        else:
            hf, hp = 2.0 * shape.pooled_dim * ds.classes, shape.pooled_dim * ds.classes
        fwd = shape.flops * fraction
        train_per = fwd * (1 + 2 * trainable) + 3 * hf  # frozen parts forward only; trained parts ×3
        eval_per = fwd + hf
        trained_params = shape.params * trainable * fraction + hp
        trained_tensors = shape.tensors * trainable * fraction + (hp and 2)
        lora = str(o["method"]) == "lora"
        if lora:  # adapters train, the foundation's weights do not: no weight gradients, ~2x the trained blocks
            first = 0 if freeze == "none" else min(used, int(freeze))
            targets, per_block = self.counts.lora(job.model, _names(o["lora_targets"]))
            train_per = fwd * (1 + trainable) + 3 * hf
            trained_params = int(o["lora_rank"]) * sum(per_block[first:used]) + hp
            trained_tensors = 2 * len(targets) * (used - first) + (hp and 2)
        steps = ds.train // batch
        used_n = steps * batch
        evals = epochs * ds.val + bests(epochs) * ds.test
        flops = epochs * used_n * train_per + evals * eval_per
        size = self._img_size(job)
        train_data, train_device, eval_data = self._finetune_data(o, ds, size, job.dataset["name"], legacy)
        data = epochs * used_n * train_data + evals * eval_data
        compute = (
            self._train_s(shape, epochs * used_n * train_per)
            + self._fwd_s(shape, evals * eval_per)
            + epochs * steps * (self._step_s(trained_params) + trained_tensors * self.rates.opt_s_per_tensor)
            + epochs * used_n * train_device
        )
        workers = int(o["workers"])
        run_s = self._pipeline(compute, data, workers, ours=not legacy or self.legacy)
        if not legacy and self.rates.overlap and workers > 0 and compute > 0:
            self.data_ratio = max(self.data_ratio, data / workers / compute)
        # last.pt: after every epoch on the old path (and with checkpoint_every 0), else at most every
        # checkpoint_every seconds and after the last epoch
        every = 0 if legacy else int(o.get("checkpoint_every") or 0)
        writes = epochs if every <= 0 else min(epochs, math.floor(run_s / every) + 1)
        per_write = trained_params * 12 if lora else shape.params * 4 + trained_params * 8
        checkpoints = writes * per_write + bests(epochs) * shape.params * 4
        if lora:  # the checkpoint holds adapters and head with AdamW's two moments; each best exports the whole
            # foundation (merged) beside the adapters and the head
            checkpoints = writes * per_write + bests(epochs) * (shape.params + trained_params) * 4
        seconds = (
            self._build_s(shape.params)
            + run_s
            + checkpoints / self.rates.io_bytes_s
            + (epochs + bests(epochs)) * self.rates.metric_s
        )
        one = Cost(epochs * used_n + evals, flops, checkpoints, 0, seconds)
        total = one.scaled(runs)
        total.seconds += self.rates.job_s
        return total


def _channels(dataset: str) -> int:
    """Channels a pixel cache stores for ``dataset``: one for a grayscale one (fmcache pixels --channels auto)."""
    from fmcache.data.registry import DATASETS  # deferred: torch, torchvision

    spec = DATASETS.get(dataset)
    return 1 if spec is not None and spec.grayscale else 3


# -- the API every estimator shares ------------------------------------------------------------------------------------


class JobEstimator(Protocol):
    """Anything that prices one grid job (:class:`Estimator`, :class:`fmcache.cost.recorded.RecordedEstimator`);
    it raises when it cannot (a model that cannot be counted, a kind never run)."""

    def job(self, job) -> JobCost: ...


@dataclass
class Estimates:
    costs: dict[str, JobCost] = field(default_factory=dict)  # job id → its cost
    failed: dict[str, str] = field(default_factory=dict)  # job id → why it has no estimate (one line)


def estimate_jobs(estimator: JobEstimator, jobs: Iterable) -> Estimates:
    """Every job priced by ``estimator``; a job it cannot price is named with why, never guessed."""
    out = Estimates()
    for job in jobs:
        try:
            out.costs[job.id] = estimator.job(job)
        except Exception as exc:  # a model that cannot be built or counted, a dataset without a size, ...: said once
            out.failed[job.id] = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return out
