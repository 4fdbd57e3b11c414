"""The grid's cost before it runs: per job forward passes, FLOPs, bytes and wall time, and the seed's cost beside it.

Nothing here needs data or weights. A model's forward FLOPs per image are counted exactly by
:class:`torch.utils.flop_counter.FlopCounterMode` on the **meta device** (no memory, no compute; open_clip and SEEM's
FocalNet copy tensors while they build, so those are built on the CPU with random weights and then moved to meta),
together with the shapes the cache stores (layers, widths, token counts, the paper's pooled feature and tokens). The
DeiT and attentive heads are counted the same way. Counts are kept in ``flops.json`` beside the calibration (per
model, input size, architecture overrides and fmcache version), so a repeated dry run is fast.

Each job's cost (:func:`Estimator.job`) is built from those counts and a :class:`Rates`: achieved FLOP/s for
inference and for training (training counted as 3 × the forward of what trains), the per-step and per-parameter
costs of an optimizer step, the data path (decode per image and per megapixel, the train augmentation), disk
bytes/s and fixed per-job costs. Rates come from ``fmcache calibrate`` (a ≤ 60 s micro-benchmark on the current
device, :func:`calibrate`, kept per device in ``calibration.json``) or from a preset built from a GPU's published
dense peak and an assumed utilisation (:data:`PRESETS`: estimates, and labelled so).

Beside every job the seed's online cost for the same result (:meth:`Estimator.job`'s second value): a frozen run
recomputes the foundation on every step of every epoch over train (with the train augmentation), on val every epoch
and on test once; the k-NN bank is rebuilt for every evaluation (every k); CKA runs the models over the compared
split; fine-tuning is the same end-to-end path in both.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from fmcache.errors import FmcacheError

Log = Callable[[str], None]

# -- where counts and calibrations are kept --------------------------------------------------------------------------


def _cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fmcache"


def calibration_path() -> Path:
    """``$FMCACHE_CALIBRATION``, else ``~/.cache/fmcache/calibration.json`` (one entry per device name)."""
    env = os.environ.get("FMCACHE_CALIBRATION")
    return Path(env) if env else _cache_home() / "calibration.json"


def counts_path() -> Path:
    """``$FMCACHE_FLOPS_CACHE``, else ``flops.json`` beside the calibration."""
    env = os.environ.get("FMCACHE_FLOPS_CACHE")
    return Path(env) if env else calibration_path().with_name("flops.json")


def _version() -> str:
    from fmcache import __version__

    return str(__version__)


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_json(path: Path, doc: dict) -> None:
    from fmcache.files import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home only costs the next dry run a recount


# -- exact counts: models and heads ------------------------------------------------------------------------------------

CONV_ARCHS = ("resnet", "convnext", "efficientnet", "regnet", "mobilenet", "densenet", "vgg")


@dataclass(frozen=True)
class ModelShape:
    """What one foundation at one input size costs per image and stores per image."""

    flops: float  # one image's forward
    layers: int  # cached layers (blocks or stages)
    dims: tuple[int, ...]  # width per layer
    tokens: tuple[int, ...]  # tokens per layer, prefix tokens included
    prefix: int
    pooled_dim: int  # the paper's pooled feature
    head_tokens: tuple[int, int]  # (T, D) of what the paper's DeiT head reads (``--tokens paper``)
    params: int
    tensors: int  # parameter tensors (a per-tensor optimizer costs per tensor)
    conv: bool  # a convolutional network (its own achieved rate)

    @property
    def blocks(self) -> int:
        return self.layers


COUNTS_SCHEMA = 2  # what a counted entry holds; a change recounts


def _model_key(name: str, img_size: int | None, overrides: dict | None) -> str:
    return json.dumps([name, img_size, overrides or {}, _version(), COUNTS_SCHEMA], sort_keys=True)


def _count_foundation(name: str, img_size: int | None, overrides: dict | None) -> dict:
    import logging

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fmcache.models import create_foundation
    from fmcache.models.registry import get_spec

    spec = get_spec(name)
    size = int(img_size or spec.default_img_size)
    kwargs = {"random_init": True, "img_size": size, "arch_overrides": dict(overrides or {})}
    logging.disable(logging.WARNING)  # open_clip warns that a random build has no pretrained weights
    try:
        try:
            with torch.device("meta"):
                model = create_foundation(name, **kwargs)
        except Exception:  # open_clip and SEEM's FocalNet copy tensors while building: build on the CPU, then meta
            model = create_foundation(name, **kwargs).to("meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = model(torch.zeros(1, 3, size, size, device="meta"))
    finally:
        logging.disable(logging.NOTSET)
    head = out.head_tokens
    arch = f"{spec.family} {spec.arch}".lower()
    return {
        "flops": float(counter.get_total_flops()),
        "layers": len(out.tokens),
        "dims": [int(t.shape[-1]) for t in out.tokens],
        "tokens": [int(t.shape[1]) for t in out.tokens],
        "prefix": int(out.num_prefix_tokens),
        "pooled_dim": int(out.pooled.shape[-1]),
        "head_tokens": [int(head.shape[1]), int(head.shape[2])] if head is not None else [0, 0],
        "params": int(sum(p.numel() for p in model.parameters())),
        "tensors": len(list(model.parameters())),
        "conv": any(a in arch for a in CONV_ARCHS),
    }


def _count_head(kind: str, tokens: int, dim: int, classes: int, depth: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fmcache.frozen.heads import build_head

    side = math.isqrt(tokens)
    grid = (side, side) if side * side == tokens else (1, tokens)
    with torch.device("meta"):
        head = build_head(kind, dim, classes, depth, grid)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head(torch.zeros(1, tokens, dim, device="meta"))
    return {"flops": float(counter.get_total_flops()), "params": int(sum(p.numel() for p in head.parameters()))}


class Counts:
    """Counted FLOPs and shapes, read from and written back to ``flops.json``."""

    def __init__(self, path: Path | None = None):
        self.path = path or counts_path()
        self.doc = _read_json(self.path)
        self.dirty = False

    def _get(self, key: str, count: Callable[[], dict]) -> dict:
        if key not in self.doc:
            self.doc[key] = count()
            self.dirty = True
        return self.doc[key]

    def model(self, entry: dict) -> ModelShape:
        name, size, overrides = entry["name"], entry.get("img_size"), entry.get("arch_overrides")
        doc = self._get(_model_key(name, size, overrides), lambda: _count_foundation(name, size, overrides))
        return ModelShape(
            flops=doc["flops"], layers=doc["layers"], dims=tuple(doc["dims"]), tokens=tuple(doc["tokens"]),
            prefix=doc["prefix"], pooled_dim=doc["pooled_dim"], head_tokens=tuple(doc["head_tokens"]),
            params=doc["params"], tensors=doc["tensors"], conv=doc["conv"],
        )  # fmt: skip

    def head(self, kind: str, tokens: int, dim: int, classes: int, depth: int) -> tuple[float, int]:
        """(forward FLOPs per sample, parameters) of a token head."""
        key = json.dumps(["head", kind, tokens, dim, classes, depth if kind == "deit" else 0, _version()])
        doc = self._get(key, lambda: _count_head(kind, tokens, dim, classes, depth))
        return doc["flops"], doc["params"]

    def save(self) -> None:
        if self.dirty:
            _write_json(self.path, self.doc)
            self.dirty = False


# -- rates ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """What a device achieves; every estimate is FLOPs and bytes divided by these, plus fixed costs."""

    label: str
    fwd: float  # foundation inference, FLOP/s (bf16 autocast on GPU, fp32 on CPU)
    train: float  # training, FLOP/s (forward + backward counted as 3 × the forward of what trains)
    fwd_conv: float  # the same two for convolutional networks
    train_conv: float
    fp32: float  # k-NN search and the linear heads
    fp64: float  # CKA's float64 cross-products
    step_s: float  # fixed cost of one optimizer step of one model or head (launches, Python)
    opt_s_per_param: float  # gradient buffers, clipping and AdamW, per trained parameter per step
    opt_s_per_tensor: float  # fine-tuning's AdamW (torch's default: one tensor at a time on a CPU), per tensor per step
    linear_step_s: float  # one step of the batched linear grid (every head at once), beyond its FLOPs
    metric_s: float  # one val (or test) metric of one head
    decode_s: float  # one image's resize, crop and normalisation at 224 px on one worker (scales with the output)
    decode_s_per_mpx: float  # reading and decoding, per megapixel of the stored image
    augment_s: float  # the train augmentation of one image at 224 px (scales with the output's pixels)
    io_bytes_s: float  # disk
    build_s_per_param: float  # building a model (init or weights read), per parameter
    job_s: float  # fixed cost of one job (result files, plots)
    overlap: bool = True  # data loading overlaps compute (GPU); on a CPU the workers share its cores
    source: str = ""

    def describe(self) -> str:
        return f"{self.label} ({self.source})" if self.source else self.label


# Published dense (no sparsity) peak rates; the estimate assumes UTILISATION of the bf16 peak for transformer
# inference and training, CONV_UTILISATION for convolutional networks, and FP_UTILISATION of the fp32/fp64 peaks.
UTILISATION, CONV_UTILISATION, FP_UTILISATION, BW_UTILISATION = 0.40, 0.25, 0.5, 0.5
GPUS = {
    # name: (label, bf16 dense TFLOP/s, fp32 TFLOP/s, fp64 tensor TFLOP/s, HBM TB/s)
    "h200": ("H200 SXM", 989.0, 67.0, 67.0, 4.8),
    "h100": ("H100 SXM", 989.0, 67.0, 67.0, 3.35),
    "a100": ("A100 SXM 80GB", 312.0, 19.5, 19.5, 2.04),
}
# The host side of a GPU preset (data path, metrics, disk, job start-up), assumed for a server CPU: the decode and
# augmentation figures are per DataLoader worker (about 20 ms per megapixel to read, decode and resize a PNG or JPEG,
# 4 ms for the train augmentation at 224 px); a job's `workers` run in parallel with the GPU.
HOST = {
    "decode_s": 2.0e-3,
    "decode_s_per_mpx": 2.0e-2,
    "augment_s": 4.0e-3,
    "metric_s": 1.0e-3,
    "io_bytes_s": 2.0e9,  # a local NVMe disk
    "build_s_per_param": 2.0e-9,  # a weights file read at ~2 GB/s
    "job_s": 20.0,  # process start, imports, CUDA context, plots
    "step_s": 1.0e-3,  # kernel launches and Python of one AdamW step with clipping
    "opt_s_per_tensor": 1.0e-6,  # torch's default AdamW on CUDA works on all tensors at once
    "linear_step_s": 1.0e-3,
}


def preset(name: str) -> Rates:
    label, bf16, fp32, fp64, hbm = GPUS[name]
    return Rates(
        label=label,
        fwd=bf16 * 1e12 * UTILISATION,
        train=bf16 * 1e12 * UTILISATION,
        fwd_conv=bf16 * 1e12 * CONV_UTILISATION,
        train_conv=bf16 * 1e12 * CONV_UTILISATION,
        fp32=fp32 * 1e12 * FP_UTILISATION,
        fp64=fp64 * 1e12 * FP_UTILISATION,
        opt_s_per_param=32 / (hbm * 1e12 * BW_UTILISATION),  # AdamW + clipping move ~32 bytes per fp32 parameter
        overlap=True,
        source=f"preset, an estimate: published dense bf16 peak {bf16:g} TFLOP/s x {UTILISATION:.0%} utilisation "
        f"(convolutions {CONV_UTILISATION:.0%}), fp32/fp64 {fp32:g}/{fp64:g} TFLOP/s x {FP_UTILISATION:.0%}, "
        f"{hbm:g} TB/s",
        **HOST,
    )


PRESETS = tuple(GPUS)


def _rates_from(entry: dict, label: str) -> Rates:
    names = {f.name for f in fields(Rates)}
    values = {k: v for k, v in entry.items() if k in names}
    missing = sorted(names - set(values) - {"label", "overlap", "source"})
    if missing:
        raise FmcacheError(f"calibration for {label} lacks {', '.join(missing)}; run `fmcache calibrate` again")
    when = entry.get("measured_at", "?")
    return Rates(**{**values, "label": label, "source": f"fmcache calibrate, {when}"})


def device_name(device: str | None = None) -> str:
    """The name a calibration is kept under: the GPU's name, or the CPU's model and thread count."""
    import torch

    from fmcache.dist import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def resolve_rates(choice: str | None, log: Log) -> Rates:
    """``--device-rate``: a preset (h200, h100, a100), a FLOP/s number, a calibrated device name or a calibration
    file; None: this machine's calibration if there is one, else the H200 preset (said in one line)."""
    doc = _read_json(calibration_path())
    if choice is None:
        here = device_name()
        if here in doc:
            return _rates_from(doc[here], here)
        log(f"no calibration for this machine ({here}) in {calibration_path()}: `fmcache calibrate` measures it; "
            "estimating on the H200 preset instead (--device-rate chooses)")  # fmt: skip
        return preset("h200")
    text = str(choice).strip()
    if text.lower() in GPUS:
        return preset(text.lower())
    try:
        flops = float(text)
    except ValueError:
        flops = None
    if flops is not None:
        if not flops > 0:
            raise FmcacheError(f"--device-rate {text}: a rate must be a positive FLOP/s number, e.g. 4e14")
        base = preset("h200")
        return replace(base, label=f"{flops:.3g} FLOP/s", fwd=flops, train=flops, fwd_conv=flops, train_conv=flops,
                       source="every FLOP rate as given; the rest as the H200 preset's (an estimate)")  # fmt: skip
    if text in doc:
        return _rates_from(doc[text], text)
    path = Path(os.path.expanduser(text))
    if path.is_file():
        other = _read_json(path)
        if not other:
            raise FmcacheError(f"--device-rate {path}: not a calibration file (fmcache calibrate writes one)")
        name = next(iter(other))
        if len(other) > 1:
            log(f"--device-rate {path}: {len(other)} devices; using the first, {name}")
        return _rates_from(other[name], name)
    known = [*PRESETS, *doc]
    raise FmcacheError(f"--device-rate {text}: not a preset, a FLOP/s number, a calibrated device or a file; "
                       f"known: {', '.join(known)}")  # fmt: skip


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
    notes: list[str] = field(default_factory=list)
    data_bound: bool = False  # fmcache's time is set by image decoding with the job's workers, not by compute


# The protocols' defaults (their spec classes hold the same; kept here so a dry run imports no runner)
DEFAULT_LRS, DEFAULT_SEEDS, DEFAULT_EPOCHS, DEFAULT_BATCH = 4, 5, 100, 64
TOKEN_PRELOAD_BYTES = 32 * 2**30  # the token heads stream a layer larger than a quarter of RAM (128 GiB assumed)


def _count(value, default: int) -> int:
    """A count of LRs or seeds from a list, a comma string or a number (seeds: a number N means 0..N-1)."""
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(1, int(value))
    if isinstance(value, str):
        return max(1, len([v for v in value.split(",") if v.strip()]))
    return max(1, len(list(value)))


def bests(epochs: int) -> float:
    """Assumed number of new best val epochs (each scores test): about 1 + 2 ln E, at most E."""
    return min(float(epochs), 1.0 + 2.0 * math.log(max(1, epochs)))


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

    def __init__(self, rates: Rates, sizes: dict[str, DataSize | None], counts: Counts | None = None):
        self.rates, self.sizes = rates, sizes
        self.counts = counts or Counts()

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
        from fmcache.models.registry import get_spec

        return int(job.model.get("img_size") or get_spec(job.model["name"]).default_img_size)

    # -- the cache
    def row_bytes(self, shape: ModelShape, extract: dict) -> float:
        """Bytes one cached image takes: pooled arrays of every layer, the paper feature, the cached token layers."""
        from fmcache.extract.plan import parse_tokens, token_layers, wants_paper_tokens

        item = 4 if extract.get("dtype") == "fp32" else 2
        pools = (2 if shape.prefix > 0 else 1) * shape.layers * max(shape.dims)
        request = parse_tokens(str(extract.get("tokens") or "none"))
        tokens = sum(shape.tokens[n - 1] * shape.dims[n - 1] for n in token_layers(request, shape.layers))
        if wants_paper_tokens(request):
            tokens += shape.head_tokens[0] * shape.head_tokens[1]
        return (pools + shape.pooled_dim + tokens) * item + 17  # + id, label, split

    def extract_cost(self, job, shape: ModelShape, ds: DataSize, extract: dict) -> Cost:
        views = int(extract.get("views") or 0)
        images = ds.total + views * ds.train
        flops = images * shape.flops
        written = images * self.row_bytes(shape, extract)
        size = self._img_size(job)
        data = images * self._decode_s(ds, size) + views * ds.train * self._augment_s(size)
        workers = int(extract.get("workers", 2))
        seconds = (self.rates.job_s + self._build_s(shape.params) + self._pipeline(self._fwd_s(shape, flops), data,
                   workers) + written / self.rates.io_bytes_s)  # fmt: skip
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
        shape = self.counts.model(job.model)
        kind = job.kind
        if kind == "extract":
            return JobCost(self.extract_cost(job, shape, ds, job.extract), Cost())
        if kind == "knn":
            return self._knn(job, shape, ds)
        if kind == "probe_linear":
            return self._linear(job, shape, ds)
        if kind in ("probe_deit", "probe_attentive"):
            return self._tokens(job, shape, ds)
        if kind == "cka":
            return self._cka(job, shape, ds)
        if kind.startswith("finetune"):
            ours = self._finetune(job, shape, ds)
            return JobCost(ours, ours, ["fine-tuning is the same end-to-end path in fmcache and the seed"])
        raise FmcacheError(f"no cost model for job kind {kind}")

    def _seed_frozen_run(self, job, shape: ModelShape, ds: DataSize, epochs: int, batch: int, fraction: float,
                         head_train_flops: float, head_eval_flops: float, head_params: float) -> Cost:  # fmt: skip
        """One of the seed's frozen runs: the foundation (up to ``fraction`` of its blocks) on every train step with
        the augmentation, on val every epoch and on test once, then the head."""
        used = (ds.train // batch) * batch
        images = epochs * (used + ds.val) + ds.test
        fwd = shape.flops * fraction
        flops = images * fwd + epochs * used * head_train_flops + (epochs * ds.val + ds.test) * head_eval_flops
        data = images * self._decode_s(ds, self._img_size(job)) + epochs * used * self._augment_s(self._img_size(job))
        compute = (self._fwd_s(shape, images * fwd) + self._train_s(None, epochs * used * head_train_flops)
                   + (epochs * ds.val + ds.test) * head_eval_flops / self.rates.fwd
                   + epochs * (ds.train // batch) * self._step_s(head_params))  # fmt: skip
        workers = int(job.extract.get("workers", 2)) if job.extract else 2
        seconds = (self.rates.job_s + self._build_s(shape.params) + self._pipeline(compute, data, workers, False)
                   + (epochs + 1) * self.rates.metric_s)  # fmt: skip
        return Cost(images, flops, 0.0, 0.0, seconds)

    def _knn(self, job, shape: ModelShape, ds: DataSize) -> JobCost:
        o = job.options
        layers = _layer_list(o.get("layer"), shape.layers)
        ks = _count(o.get("ks"), 4)
        splits = o.get("eval_splits") or ("val", "test")
        splits = splits.split(",") if isinstance(splits, str) else splits
        queries = sum(ds.split(s.strip()) for s in splits if s.strip() in ("val", "test"))
        dim = shape.pooled_dim if len(layers) == 1 else max(shape.dims)
        item = 4 if job.extract.get("dtype") == "fp32" else 2
        search = len(layers) * 2.0 * queries * ds.train * dim
        read = ds.total * len(layers) * dim * item
        ours = Cost(0, search, 0, read, self.rates.job_s + search / self.rates.fp32 + read / self.rates.io_bytes_s)
        # the seed: every evaluation (one per k) runs the foundation over the bank and the queries again
        images = ks * (ds.train + queries)
        data = images * self._decode_s(ds, self._img_size(job))
        compute = self._fwd_s(shape, images * shape.flops) + ks * search / len(layers) / self.rates.fp32
        seed = Cost(images, images * shape.flops + ks * search / len(layers), 0, 0,
                    self.rates.job_s + self._build_s(shape.params) + self._pipeline(compute, data, 2, False))  # fmt: skip
        return JobCost(ours, seed)

    def _linear(self, job, shape: ModelShape, ds: DataSize) -> JobCost:
        o = job.options
        layers = _layer_list(o.get("layer"), shape.layers)
        heads = _count(o.get("lrs"), DEFAULT_LRS) * _count(o.get("seeds"), DEFAULT_SEEDS)
        epochs, batch = int(o.get("epochs") or DEFAULT_EPOCHS), int(o.get("batch_size") or DEFAULT_BATCH)
        views = int(job.extract.get("views") or 0) if str(o.get("views")) != "off" else 0
        dim = shape.pooled_dim if len(layers) == 1 else max(shape.dims)
        item = 4 if job.extract.get("dtype") == "fp32" else 2
        steps = epochs * (ds.train // batch)
        per = 2.0 * dim * ds.classes  # one head's forward on one sample
        flops = len(layers) * heads * per * (3 * steps * batch + epochs * ds.val + bests(epochs) * ds.test)
        read = len(layers) * (ds.total + views * ds.train) * dim * item
        seconds = (self.rates.job_s + read / self.rates.io_bytes_s + flops / self.rates.fp32
                   + len(layers) * (steps * self.rates.linear_step_s + epochs * heads * self.rates.metric_s))  # fmt: skip
        ours = Cost(0, flops, 0, read, seconds)
        seed = Cost()
        for layer in layers:  # the seed: one run per (layer, LR, seed), the foundation cut after that layer
            run = self._seed_frozen_run(job, shape, ds, epochs, batch, layer / shape.layers, 3 * per, per, dim)
            seed = seed + run.scaled(heads)
        return JobCost(ours, seed)

    def _token_layers(self, job, shape: ModelShape) -> list[tuple[float, int, int]]:
        """(foundation fraction, tokens, width) of each layer a token-head job trains on."""
        from fmcache.extract.plan import parse_tokens, token_layers

        value = str(job.options.get("layer") or "last").strip()
        if value == "paper":
            return [(1.0, *shape.head_tokens)]
        if value == "all":
            request = parse_tokens(str(job.extract.get("tokens") or "none"))
            numbers = token_layers(request, shape.layers) or [shape.layers]
        else:
            numbers = _layer_list(value, shape.layers)
        prefix = shape.prefix
        return [(n / shape.layers, shape.tokens[n - 1] - prefix, shape.dims[n - 1]) for n in numbers]

    def _tokens(self, job, shape: ModelShape, ds: DataSize) -> JobCost:
        o = job.options
        kind = "deit" if job.kind == "probe_deit" else "attentive"
        heads = _count(o.get("lrs"), DEFAULT_LRS) * _count(o.get("seeds"), DEFAULT_SEEDS)
        epochs, batch = int(o.get("epochs") or DEFAULT_EPOCHS), int(o.get("batch_size") or DEFAULT_BATCH)
        depth = int(o.get("head_depth") or 12)
        views = int(job.extract.get("views") or 0) if str(o.get("views")) != "off" else 0
        item = 4 if job.extract.get("dtype") == "fp32" else 2
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
            seconds = (self._train_s(None, train_flops) + eval_flops / self.rates.fwd
                       + heads * epochs * steps * self._step_s(hp) + heads * (epochs + bests(epochs)) * self.rates.metric_s
                       + (read + checkpoints) / self.rates.io_bytes_s)  # fmt: skip
            ours = ours + Cost(0, train_flops + eval_flops, checkpoints, read, seconds)
            run = self._seed_frozen_run(job, shape, ds, epochs, batch, fraction, 3 * hf, hf, hp)
            seed = seed + run.scaled(heads)
        ours.seconds += self.rates.job_s
        return JobCost(ours, seed)

    def _cka(self, job, shape: ModelShape, ds: DataSize) -> JobCost:
        o = job.options
        split = str(o.get("split") or "test")
        n = ds.split(split) if split in ("train", "val", "test") else ds.total
        item = 4 if job.extract.get("dtype") == "fp32" else 2
        layers_a = _layer_list(o.get("layers") or "all", shape.layers)
        width_a = sum(shape.dims[i - 1] for i in layers_a)
        ours, notes = Cost(), []
        if job.model_b is not None:
            shape_b = self.counts.model(job.model_b)
            layers_b = _layer_list(o.get("layers_b") or o.get("layers") or "all", shape_b.layers)
            width_b = sum(shape_b.dims[i - 1] for i in layers_b)
            fwd_b = shape_b.flops
        elif o.get("after_finetune"):
            # Fig. 7: the grid extracts the fine-tuned export with the same settings first
            ours = ours + self.extract_cost(job, shape, ds, job.extract)
            width_b, fwd_b, shape_b = width_a, shape.flops, shape
            notes.append("includes extracting the fine-tuned export")
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
        seed = Cost(images, fwd_flops + flops, 0, 0, self.rates.job_s + self._build_s(shape.params)
                    + self._pipeline(compute, images * self._decode_s(ds, self._img_size(job)), 2, False))  # fmt: skip
        return JobCost(ours, seed, notes)

    def _finetune(self, job, shape: ModelShape, ds: DataSize) -> Cost:
        o = job.options
        runs = _count(o.get("lrs"), 1) * _count(o.get("seeds"), 1)
        epochs, batch = int(o.get("epochs") or DEFAULT_EPOCHS), int(o.get("batch_size") or DEFAULT_BATCH)
        blocks = shape.layers
        freeze = str(o.get("freeze") if o.get("freeze") is not None else "none").strip()
        drop = o.get("drop_after")
        used = min(blocks, int(drop)) if drop is not None else blocks
        fraction = used / blocks
        if freeze == "none":
            trainable = 1.0
        elif freeze == "all":
            trainable = 0.0
        else:
            trainable = max(0.0, (used - min(used, int(freeze))) / blocks)
        # the head on the last used layer's tokens (deit) or pooled feature (linear)
        if job.kind == "finetune_deit":
            if drop is None:
                tokens, dim = shape.head_tokens
            else:
                tokens, dim = shape.tokens[used - 1] - shape.prefix, shape.dims[used - 1]
            hf, hp = self.counts.head("deit", max(1, tokens), dim, ds.classes, int(o.get("head_depth") or 12))
        else:
            hf, hp = 2.0 * shape.pooled_dim * ds.classes, shape.pooled_dim * ds.classes
        fwd = shape.flops * fraction
        train_per = fwd * (1 + 2 * trainable) + 3 * hf  # frozen parts forward only; trained parts ×3
        eval_per = fwd + hf
        trained_params = shape.params * trainable * fraction + hp
        trained_tensors = shape.tensors * trainable * fraction + (hp and 2)
        steps = ds.train // batch
        used_n = steps * batch
        evals = epochs * ds.val + bests(epochs) * ds.test
        flops = epochs * used_n * train_per + evals * eval_per
        size = self._img_size(job)
        data = epochs * used_n * (self._decode_s(ds, size) + self._augment_s(size)) + evals * self._decode_s(ds, size)
        compute = (self._train_s(shape, epochs * used_n * train_per) + self._fwd_s(shape, evals * eval_per)
                   + epochs * steps * (self._step_s(trained_params) + trained_tensors * self.rates.opt_s_per_tensor))  # fmt: skip
        checkpoints = epochs * (shape.params * 4 + trained_params * 8) + bests(epochs) * shape.params * 4
        seconds = (self._build_s(shape.params) + self._pipeline(compute, data, int(o.get("workers", 2)))
                   + checkpoints / self.rates.io_bytes_s + (epochs + bests(epochs)) * self.rates.metric_s)  # fmt: skip
        one = Cost(epochs * used_n + evals, flops, checkpoints, 0, seconds)
        total = one.scaled(runs)
        total.seconds += self.rates.job_s
        return total


# -- calibration ------------------------------------------------------------------------------------------------------

JOB_PLOTS = 4  # a job's fixed cost is taken as four result plots' worth (plots, JSON, CSV, predictions, ledger)


# probes that take about a millisecond run several times a round: a wake-up of a busy core's thread can cost a
# small call tens of milliseconds, and the median of many calls sees through it
CHEAP, CHEAP_REPEATS = ("metric", "decode_64", "augment", "plot"), 8


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def calibrate(seconds: float = 60.0, quick: bool = False, device: str | None = None, log: Log = print) -> dict:
    """Measure this device's :class:`Rates` in about ``seconds`` (``quick``: tiny sizes, a few rounds) and keep them
    in :func:`calibration_path` under :func:`device_name`; returns the entry.

    The probes: a foundation forward under extraction's precision (bf16 autocast on GPU; a ViT, and a ResNet for
    convolutional networks), forward + backward of a DeiT-B head and of a ResNet, the optimizer step alone (clipping +
    AdamW: its per-parameter cost), fp32 and fp64 matrix products, one val metric, the batched linear grid, one
    image's decode + resize + crop at two sizes, the train augmentation, a disk write with fsync and a result plot.
    After one warm-up call each, the probes run round-robin until the budget is spent (at least 3 rounds), and each
    figure is the median of its rounds: on a shared machine a job runs at the typical speed, and round-robin spreads
    every probe over the whole measurement.
    """
    import tempfile

    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from fmcache import metrics
    from fmcache.data.transforms import build_transform, train_augmentation
    from fmcache.dist import pick_device, synchronize
    from fmcache.frozen.heads import DeiTHead
    from fmcache.frozen.linear import train_linear_grid
    from fmcache.models import create_foundation
    from fmcache.training import adamw_param_groups

    if not seconds > 0:
        raise FmcacheError(f"--seconds must be > 0, got {seconds}")
    dev = pick_device(device)
    gpu = dev.type == "cuda"
    name = device_name(str(dev))
    start = time.perf_counter()
    sync = lambda: synchronize(dev)  # noqa: E731
    rng = np.random.default_rng(0)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)

    def counted(model, x) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return float(counter.get_total_flops())

    # sizes follow the device: a GPU gets the paper's models, a CPU small ones
    if gpu:
        vit, vit_size, vit_batch, vit_over = "dinov2_vitb14", 224, 64, {}
        cnn, cnn_size, cnn_batch = "resnet50", 224, 64
        tokens, depth, batch, mm, big_px = 196, 12, 64, 4096, 1024
    elif quick:
        vit, vit_size, vit_batch, vit_over = "dinov2_vits14", 56, 16, {"depth": 2}
        cnn, cnn_size, cnn_batch = "resnet50", 32, 32
        tokens, depth, batch, mm, big_px = 16, 1, 32, 512, 512
    else:
        vit, vit_size, vit_batch, vit_over = "dinov2_vits14", 112, 8, {"depth": 6}
        cnn, cnn_size, cnn_batch = "resnet50", 64, 16
        tokens, depth, batch, mm, big_px = 64, 2, 32, 1024, 1024
    probes: dict[str, Callable[[], object]] = {}
    facts: dict[str, float] = {}

    # foundation inference, and the cost of building a model per parameter
    def foundation(key: str, model_name: str, size: int, n: int, overrides: dict):
        t0 = time.perf_counter()
        model = create_foundation(model_name, random_init=True, img_size=size, arch_overrides=overrides)
        facts[f"{key}_build"] = (time.perf_counter() - t0) / sum(p.numel() for p in model.parameters())
        model = model.to(dev)
        x = torch.randn(n, 3, size, size, device=dev)
        if gpu:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        facts[f"{key}_flops"] = counted(model, x[:1]) * n

        def run():
            with torch.no_grad(), autocast():
                model(x)

        probes[key] = run
        return model

    foundation("fwd", vit, vit_size, vit_batch, vit_over)
    cnn_model = foundation("fwd_conv", cnn, cnn_size, cnn_batch, {})

    # training: forward + backward, apart from the optimizer (clipping + AdamW: its per-parameter cost)
    def trainer(key: str, model, x, y):
        model = model.to(dev)
        facts[f"{key}_flops"] = 3 * counted(model.eval(), x[:1])
        facts[f"{key}_params"] = sum(p.numel() for p in model.parameters())
        model.train()
        opt = torch.optim.AdamW(adamw_param_groups(model.named_parameters(), 1e-5), lr=1e-4, foreach=True)

        def forward_backward(n: int):
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x[:n]).float(), y[:n])
            opt.zero_grad(set_to_none=True)
            loss.backward()

        def optimizer(opt=opt):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        forward_backward(len(x))  # gradients exist before the optimizer probe runs
        probes[f"{key}_full"] = lambda: forward_backward(len(x))
        probes[f"{key}_small"] = lambda: forward_backward(2)  # 2: BatchNorm trains on no fewer
        probes[f"{key}_opt"] = optimizer
        if key == "train":  # torch's default AdamW (fine-tuning's): one tensor at a time on a CPU
            facts["train_tensors"] = len(list(model.parameters()))
            single = torch.optim.AdamW(adamw_param_groups(model.named_parameters(), 1e-5), lr=1e-4)
            probes["train_opt_default"] = lambda: optimizer(single)

    side = math.isqrt(tokens)
    x, y = torch.randn(batch, tokens, 384, device=dev), torch.randint(0, 10, (batch,), device=dev)
    trainer("train", DeiTHead(384, 10, depth, (side, side)), x, y)

    class _Classifier(torch.nn.Module):  # the ResNet with a linear head, every weight training
        def __init__(self, foundation):
            super().__init__()
            self.foundation = foundation.requires_grad_(True)
            self.fc = torch.nn.LazyLinear(10)

        def forward(self, images):
            return self.fc(self.foundation(images).pooled)

    images = torch.randn(cnn_batch, 3, cnn_size, cnn_size, device=dev)
    classifier = _Classifier(cnn_model).to(dev)
    with torch.no_grad():
        classifier(images[:1])  # materialise the lazy head
    trainer("train_conv", classifier, images, torch.randint(0, 10, (cnn_batch,), device=dev))

    # matrix products: fp32 (k-NN search, linear heads) and fp64 (CKA)
    for key, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        a = torch.randn(mm, mm, device=dev, dtype=dtype)
        probes[key] = lambda a=a: a @ a

    # the batched linear grid (4 LRs × 5 seeds) and one head's val metric
    dim, classes, epochs, n_train = 64, 5, 2, 512 if quick else 1024
    x_all = rng.standard_normal((n_train + 128, dim)).astype(np.float32)
    y_all = rng.integers(0, classes, n_train + 128)
    probs = rng.dirichlet(np.ones(classes), 64)
    probes["metric"] = lambda: metrics.evaluate("accuracy", y_all[:64], probs, False)
    parts = (x_all[:n_train], y_all[:n_train], x_all[n_train:-64], y_all[n_train:-64], x_all[-64:], y_all[-64:])
    probes["linear"] = lambda: train_linear_grid(*parts, lrs=[1e-4, 3e-4, 1e-3, 3e-3], seeds=5, num_classes=classes,
                                                 metric="accuracy", epochs=epochs, batch_size=64, device=dev)  # fmt: skip

    # the data path: decode + resize + crop of a PNG at two sizes, the train augmentation at 224 px
    transform, _ = build_transform(224)
    augment = train_augmentation(224)
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)
    for px in (64, big_px):
        yy, xx = np.mgrid[0:px, 0:px]  # smooth, with mild noise: compresses as photographs do
        pixels = ((xx + yy) % 256)[..., None] + rng.integers(0, 16, (px, px, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{px}.png")

        def load(path=folder / f"{px}.png"):
            with Image.open(path) as image:
                transform(image.convert("RGB"))

        probes[f"decode_{px}"] = load
    image = Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
    probes["augment"] = lambda: augment(image)

    # the disk, and a job's fixed cost (its plots and result files)
    blob = os.urandom((4 if quick else 32) * 2**20)

    def write():
        with open(folder / "blob", "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

    probes["io"] = write
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def plot():
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(100), range(100))
        ax.set_title("calibration")
        fig.savefig(folder / "plot.png", dpi=120)
        plt.close(fig)

    probes["plot"] = plot

    # warm-up, then round-robin rounds until the budget is spent
    times: dict[str, list[float]] = {key: [] for key in probes}
    try:
        for fn in probes.values():
            _timed(fn, sync)
        budget_end = start + (min(seconds, 15.0) if quick else seconds)
        rounds = 0
        while rounds < 3 or (time.perf_counter() < budget_end and rounds < 50):
            for key, fn in probes.items():
                for _ in range(CHEAP_REPEATS if key in CHEAP else 1):
                    times[key].append(_timed(fn, sync))
            rounds += 1
    finally:
        tmp.cleanup()
    t = {key: sorted(values)[len(values) // 2] for key, values in times.items()}

    entry: dict = {"fwd": facts["fwd_flops"] / t["fwd"], "fwd_conv": facts["fwd_conv_flops"] / t["fwd_conv"],
                   "build_s_per_param": facts["fwd_build"]}  # fmt: skip
    for key in ("train", "train_conv"):
        entry[key] = facts[f"{key}_flops"] * (batch if key == "train" else cnn_batch) / t[f"{key}_full"]
    # what a step costs beyond its FLOPs grows with the parameters (fresh gradient buffers, then clipping and AdamW
    # read and write them): the small batch's time beyond its FLOPs, per parameter, joins the optimizer's
    beyond = max(0.0, t["train_small"] - 2 * facts["train_flops"] / entry["train"])
    entry["step_s"] = 0.0
    entry["opt_s_per_param"] = (t["train_opt"] + beyond) / facts["train_params"]
    entry["opt_s_per_tensor"] = max(0.0, t["train_opt_default"] - t["train_opt"]) / facts["train_tensors"]
    entry["fp32"], entry["fp64"] = 2 * mm**3 / t["fp32"], 2 * mm**3 / t["fp64"]
    entry["metric_s"] = t["metric"]
    steps = epochs * (n_train // 64)
    entry["linear_step_s"] = max(t["linear"] - 2 * epochs * 20 * t["metric"], 0.1 * t["linear"]) / steps
    per_mpx = max((t[f"decode_{big_px}"] - t["decode_64"]) / ((big_px**2 - 64**2) / 1e6), 0.0)
    entry["decode_s_per_mpx"], entry["decode_s"] = per_mpx, max(t["decode_64"] - per_mpx * 64**2 / 1e6, 1e-5)
    entry["augment_s"] = t["augment"]
    entry["io_bytes_s"] = len(blob) / t["io"]
    entry["job_s"] = JOB_PLOTS * t["plot"]
    entry["overlap"] = gpu
    log(f"foundation forward: {entry['fwd'] / 1e9:.1f} GFLOP/s ({vit} at {vit_size} px), convolutional "
        f"{entry['fwd_conv'] / 1e9:.1f} GFLOP/s ({cnn} at {cnn_size} px)")  # fmt: skip
    log(f"training: {entry['train'] / 1e9:.1f} GFLOP/s (DeiT-B head, {depth} block(s), {tokens} tokens), "
        f"convolutional {entry['train_conv'] / 1e9:.1f} GFLOP/s; a step costs {entry['opt_s_per_param'] * 1e9:.2f} ns per "
        f"parameter beyond its FLOPs (gradients, clipping, AdamW), {entry['opt_s_per_tensor'] * 1e3:.2f} ms per tensor "
        "with torch's default AdamW")  # fmt: skip
    log(f"matrix products: fp32 {entry['fp32'] / 1e9:.1f} GFLOP/s, fp64 {entry['fp64'] / 1e9:.1f} GFLOP/s; linear "
        f"grid {entry['linear_step_s'] * 1e3:.2f} ms per step of 20 heads, {entry['metric_s'] * 1e3:.2f} ms per metric")  # fmt: skip
    log(f"data path: {entry['decode_s'] * 1e3:.2f} ms per image at 224 px + {entry['decode_s_per_mpx'] * 1e3:.1f} ms "
        f"per stored megapixel, {entry['augment_s'] * 1e3:.2f} ms for the train augmentation; disk "
        f"{entry['io_bytes_s'] / 1e6:.0f} MB/s; a job's fixed cost {entry['job_s']:.2f} s")  # fmt: skip
    entry.update(measured_at=time.strftime("%Y-%m-%d %H:%M"), fmcache=_version(), device=str(dev), rounds=rounds,
                 threads=torch.get_num_threads(), quick=quick, seconds=round(time.perf_counter() - start, 1))  # fmt: skip
    path = calibration_path()
    doc = _read_json(path)
    doc[name] = entry
    _write_json(path, doc)
    return {**entry, "name": name, "path": str(path)}


# -- totals and the printed table ----------------------------------------------------------------------------------------


def si(value: float, unit: str) -> str:
    """``1.23 PFLOP``, ``45 GB``: decimal prefixes."""
    for factor, prefix in ((1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def count_text(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.0f}"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.3g} s"
    if seconds < 5400:
        return f"{seconds / 60:.3g} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.3g} h"
    days = seconds / 86400
    return f"{days:.3g} d" if days < 1000 else f"{days:,.0f} d"


def as_dict(cost: Cost) -> dict:
    return asdict(cost)
