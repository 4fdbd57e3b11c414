"""``fmcache calibrate``: measure this device's :class:`~fmcache.cost.rates.Rates` and keep them per device."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from fmcache import metrics
from fmcache.cache.shards import PIXELS, ShardWriter
from fmcache.cost.rates import Log, calibration_path, device_name, fmcache_version, read_json, write_json
from fmcache.data.device_augment import DeviceAugment
from fmcache.data.transforms import build_transform, train_augmentation
from fmcache.dist import pick_device, synchronize
from fmcache.errors import FmcacheError
from fmcache.frozen.heads import DeiTHead
from fmcache.frozen.linear import train_linear_grid
from fmcache.models import create_foundation
from fmcache.training import adamw_param_groups

JOB_PLOTS = 4  # a job's fixed cost is taken as four result plots' worth (plots, JSON, CSV, predictions, ledger)


# probes that take about a millisecond run several times a round: a wake-up of a busy core's thread can cost a
# small call tens of milliseconds, and the median of many calls sees through it
CHEAP, CHEAP_REPEATS = ("metric", "decode_64", "augment", "plot"), 8


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


@dataclass
class Sizes:
    """How large each probe is: the paper's models on a GPU, small ones on a CPU (tiny with ``quick``)."""

    vit: str
    vit_size: int
    vit_batch: int
    vit_over: dict
    cnn: str
    cnn_size: int
    cnn_batch: int
    tokens: int  # the DeiT head's input tokens
    depth: int  # the DeiT head's blocks
    batch: int  # the DeiT head's batch
    mm: int  # matrix side of the products
    big_px: int  # the larger decoded image's side
    blob_mib: int  # bytes written with fsync

    @classmethod
    def of(cls, gpu: bool, quick: bool) -> Sizes:
        if gpu:
            return cls("dinov2_vitb14", 224, 64, {}, "resnet50", 224, 64, 196, 12, 64, 4096, 1024, 32)
        if quick:
            return cls("dinov2_vits14", 56, 16, {"depth": 2}, "resnet50", 32, 32, 16, 1, 32, 512, 512, 4)
        return cls("dinov2_vits14", 112, 8, {"depth": 6}, "resnet50", 64, 16, 64, 2, 32, 1024, 1024, 32)


Rates = Callable[[dict[str, float]], dict]  # the median time of every probe → the rates one probe group measures


@dataclass
class Bench:
    """What every probe shares: the device, the sizes, the probes registered so far and a scratch folder."""

    dev: object
    sizes: Sizes
    folder: Path
    probes: dict[str, Callable[[], object]] = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.dev.type == "cuda"

    def sync(self) -> None:
        synchronize(self.dev)

    def autocast(self):
        # extraction's precision: bf16 autocast on a GPU, fp32 on a CPU
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.gpu else torch.autocast("cpu", enabled=False)

    def counted(self, model, x) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return float(counter.get_total_flops())


def probe_forward(bench: Bench) -> Rates:
    """Foundation inference (a ViT, and a ResNet for convolutional networks) and the build cost per parameter."""
    z = bench.sizes
    facts: dict[str, float] = {}

    def foundation(key: str, model_name: str, size: int, n: int, overrides: dict):
        t0 = time.perf_counter()
        model = create_foundation(model_name, random_init=True, img_size=size, arch_overrides=overrides)
        facts[f"{key}_build"] = (time.perf_counter() - t0) / sum(p.numel() for p in model.parameters())
        model = model.to(bench.dev)
        x = torch.randn(n, 3, size, size, device=bench.dev)
        if bench.gpu:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        facts[f"{key}_flops"] = bench.counted(model, x[:1]) * n

        def run():
            with torch.no_grad(), bench.autocast():
                model(x)

        bench.probes[key] = run

    foundation("fwd", z.vit, z.vit_size, z.vit_batch, z.vit_over)
    foundation("fwd_conv", z.cnn, z.cnn_size, z.cnn_batch, {})
    return lambda t: {
        "fwd": facts["fwd_flops"] / t["fwd"],
        "fwd_conv": facts["fwd_conv_flops"] / t["fwd_conv"],
        "build_s_per_param": facts["fwd_build"],
    }


class _Classifier(torch.nn.Module):
    """A ResNet with a linear head, every weight training (fine-tuning a convolutional network)."""

    def __init__(self, foundation):
        super().__init__()
        self.foundation = foundation.requires_grad_(True)
        self.fc = torch.nn.LazyLinear(10)

    def forward(self, images):
        return self.fc(self.foundation(images).pooled)


def _trainer(bench: Bench, key: str, model, x, y, facts: dict[str, float]) -> None:
    """Forward + backward at the full and at a tiny batch, and the optimizer step alone (clipping + AdamW)."""
    model = model.to(bench.dev)
    facts[f"{key}_flops"] = 3 * bench.counted(model.eval(), x[:1])
    facts[f"{key}_params"] = sum(p.numel() for p in model.parameters())
    model.train()
    opt = torch.optim.AdamW(adamw_param_groups(model.named_parameters(), 1e-5), lr=1e-4, foreach=True)

    def forward_backward(n: int):
        with bench.autocast():
            loss = torch.nn.functional.cross_entropy(model(x[:n]).float(), y[:n])
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def optimizer(opt=opt):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    forward_backward(len(x))  # gradients exist before the optimizer probe runs
    bench.probes[f"{key}_full"] = lambda: forward_backward(len(x))
    bench.probes[f"{key}_small"] = lambda: forward_backward(2)  # 2: BatchNorm trains on no fewer
    bench.probes[f"{key}_opt"] = optimizer
    if key == "train":  # torch's default AdamW (fine-tuning's): one tensor at a time on a CPU
        facts["train_tensors"] = len(list(model.parameters()))
        single = torch.optim.AdamW(adamw_param_groups(model.named_parameters(), 1e-5), lr=1e-4)
        bench.probes["train_opt_default"] = lambda: optimizer(single)


def probe_training(bench: Bench) -> Rates:
    """Training FLOP/s of a DeiT-B head and of a whole ResNet, and what a step costs beyond its FLOPs."""
    z, dev, facts = bench.sizes, bench.dev, {}
    side = math.isqrt(z.tokens)
    x, y = torch.randn(z.batch, z.tokens, 384, device=dev), torch.randint(0, 10, (z.batch,), device=dev)
    _trainer(bench, "train", DeiTHead(384, 10, z.depth, (side, side)), x, y, facts)
    cnn = create_foundation(z.cnn, random_init=True, img_size=z.cnn_size)
    images = torch.randn(z.cnn_batch, 3, z.cnn_size, z.cnn_size, device=dev)
    classifier = _Classifier(cnn).to(dev)
    with torch.no_grad():
        classifier(images[:1])  # materialise the lazy head
    _trainer(bench, "train_conv", classifier, images, torch.randint(0, 10, (z.cnn_batch,), device=dev), facts)

    def rates(t: dict[str, float]) -> dict:
        train = facts["train_flops"] * z.batch / t["train_full"]
        # what a step costs beyond its FLOPs grows with the parameters (fresh gradient buffers, then clipping and
        # AdamW read and write them): the small batch's time beyond its FLOPs, per parameter, joins the optimizer's
        beyond = max(0.0, t["train_small"] - 2 * facts["train_flops"] / train)
        return {
            "train": train,
            "train_conv": facts["train_conv_flops"] * z.cnn_batch / t["train_conv_full"],
            "step_s": 0.0,
            "opt_s_per_param": (t["train_opt"] + beyond) / facts["train_params"],
            "opt_s_per_tensor": max(0.0, t["train_opt_default"] - t["train_opt"]) / facts["train_tensors"],
        }

    return rates


def probe_matmul(bench: Bench) -> Rates:
    """Matrix products: fp32 (k-NN search, linear heads) and fp64 (CKA)."""
    mm = bench.sizes.mm
    for key, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        a = torch.randn(mm, mm, device=bench.dev, dtype=dtype)
        bench.probes[key] = lambda a=a: a @ a
    return lambda t: {"fp32": 2 * mm**3 / t["fp32"], "fp64": 2 * mm**3 / t["fp64"]}


def probe_linear_grid(bench: Bench, quick: bool) -> Rates:
    """The batched linear grid (4 LRs × 5 seeds) per step beyond its val metrics, and one head's val metric."""
    rng = np.random.default_rng(0)
    dim, classes, epochs, n_train = 64, 5, 2, 512 if quick else 1024
    x_all = rng.standard_normal((n_train + 128, dim)).astype(np.float32)
    y_all = rng.integers(0, classes, n_train + 128)
    probs = rng.dirichlet(np.ones(classes), 64)
    bench.probes["metric"] = lambda: metrics.evaluate("accuracy", y_all[:64], probs, False)
    parts = (x_all[:n_train], y_all[:n_train], x_all[n_train:-64], y_all[n_train:-64], x_all[-64:], y_all[-64:])
    bench.probes["linear"] = lambda: train_linear_grid(
        *parts,
        lrs=[1e-4, 3e-4, 1e-3, 3e-3],
        seeds=5,
        num_classes=classes,
        metric="accuracy",
        epochs=epochs,
        batch_size=64,
        device=bench.dev,
    )
    steps = epochs * (n_train // 64)
    return lambda t: {
        "metric_s": t["metric"],
        "linear_step_s": max(t["linear"] - 2 * epochs * 20 * t["metric"], 0.1 * t["linear"]) / steps,
    }


def probe_data_path(bench: Bench) -> Rates:
    """Decode + resize + crop of a PNG at two sizes (per image and per stored megapixel), the train augmentation, a
    pixel cache's read of one crop (one-sample HDF5 chunks, shuffled) and the augmentation on the device."""
    rng = np.random.default_rng(0)
    big_px = bench.sizes.big_px
    transform, _ = build_transform(224)
    augment = train_augmentation(224)
    for px in (64, big_px):
        yy, xx = np.mgrid[0:px, 0:px]  # smooth, with mild noise: compresses as photographs do
        pixels = ((xx + yy) % 256)[..., None] + rng.integers(0, 16, (px, px, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(bench.folder / f"{px}.png")

        def load(path=bench.folder / f"{px}.png"):
            with Image.open(path) as image:
                transform(image.convert("RGB"))

        bench.probes[f"decode_{px}"] = load
    image = Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
    bench.probes["augment"] = lambda: augment(image)
    reads, batch = _pixel_probe(bench, rng)
    crops = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=bench.dev)
    device_augment = DeviceAugment(224)
    bench.probes["device_augment"] = lambda: device_augment(crops, 0)

    def rates(t: dict[str, float]) -> dict:
        per_mpx = max((t[f"decode_{big_px}"] - t["decode_64"]) / ((big_px**2 - 64**2) / 1e6), 0.0)
        return {
            "decode_s_per_mpx": per_mpx,
            "decode_s": max(t["decode_64"] - per_mpx * 64**2 / 1e6, 1e-5),
            "augment_s": t["augment"],
            "pixel_read_s": t["pixel_read"] / reads,
            "device_augment_s": t["device_augment"] / batch,
        }

    return rates


def _pixel_probe(bench: Bench, rng: np.random.Generator) -> tuple[int, int]:
    """A pixel cache shard of 256 crops (224 x 224 x 3, one per chunk, checksummed, as ``fmcache pixels`` writes
    them) and a probe reading 32 of them in a shuffled order; returns (reads per probe, the device batch)."""
    writer = ShardWriter(bench.folder, 0, 256, {"key": "calibrate", "shard": 0}, None)
    for start in range(0, 256, 64):
        part = np.arange(start, start + 64)
        writer.append({"ids": part, PIXELS: rng.integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)})
    path = bench.folder / writer.commit({})["file"]
    pixels = h5py.File(path, "r", rdcc_nbytes=0)[PIXELS]
    order = rng.permutation(256)[:32].tolist()
    bench.probes["pixel_read"] = lambda: [pixels[i] for i in order]
    return len(order), 64 if bench.gpu else 16


def probe_disk_and_jobs(bench: Bench) -> Rates:
    """A disk write with fsync, and a job's fixed cost (its plots and result files)."""
    import matplotlib  # deferred: matplotlib, only for this probe

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blob = os.urandom(bench.sizes.blob_mib * 2**20)

    def write():
        with open(bench.folder / "blob", "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

    def plot():
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(100), range(100))
        ax.set_title("calibration")
        fig.savefig(bench.folder / "plot.png", dpi=120)
        plt.close(fig)

    bench.probes["io"], bench.probes["plot"] = write, plot
    return lambda t: {"io_bytes_s": len(blob) / t["io"], "job_s": JOB_PLOTS * t["plot"]}


def measure(bench: Bench, budget_s: float) -> tuple[dict[str, float], int]:
    """Every probe once to warm up, then round-robin rounds until the budget is spent (at least 3, at most 50); the
    median of each probe's rounds, and the number of rounds."""
    times: dict[str, list[float]] = {key: [] for key in bench.probes}
    for fn in bench.probes.values():
        _timed(fn, bench.sync)
    end = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 3 or (time.perf_counter() < end and rounds < 50):
        for key, fn in bench.probes.items():
            for _ in range(CHEAP_REPEATS if key in CHEAP else 1):
                times[key].append(_timed(fn, bench.sync))
        rounds += 1
    return {key: sorted(values)[len(values) // 2] for key, values in times.items()}, rounds


def _report(entry: dict, z: Sizes, log: Log) -> None:
    log(
        f"foundation forward: {entry['fwd'] / 1e9:.1f} GFLOP/s ({z.vit} at {z.vit_size} px), convolutional "
        f"{entry['fwd_conv'] / 1e9:.1f} GFLOP/s ({z.cnn} at {z.cnn_size} px)"
    )
    log(
        f"training: {entry['train'] / 1e9:.1f} GFLOP/s (DeiT-B head, {z.depth} block(s), {z.tokens} tokens), "
        f"convolutional {entry['train_conv'] / 1e9:.1f} GFLOP/s; a step costs {entry['opt_s_per_param'] * 1e9:.2f} ns per "
        f"parameter beyond its FLOPs (gradients, clipping, AdamW), {entry['opt_s_per_tensor'] * 1e3:.2f} ms per tensor "
        "with torch's default AdamW"
    )
    log(
        f"matrix products: fp32 {entry['fp32'] / 1e9:.1f} GFLOP/s, fp64 {entry['fp64'] / 1e9:.1f} GFLOP/s; linear "
        f"grid {entry['linear_step_s'] * 1e3:.2f} ms per step of 20 heads, {entry['metric_s'] * 1e3:.2f} ms per metric"
    )
    log(
        f"data path: {entry['decode_s'] * 1e3:.2f} ms per image at 224 px + {entry['decode_s_per_mpx'] * 1e3:.1f} ms "
        f"per stored megapixel, {entry['augment_s'] * 1e3:.2f} ms for the train augmentation, "
        f"{entry['pixel_read_s'] * 1e3:.3f} ms per pixel-cache crop read, {entry['device_augment_s'] * 1e3:.3f} ms "
        f"per image augmented on the device; disk "
        f"{entry['io_bytes_s'] / 1e6:.0f} MB/s; a job's fixed cost {entry['job_s']:.2f} s"
    )


def calibrate(seconds: float = 60.0, quick: bool = False, device: str | None = None, log: Log = print) -> dict:
    """Measure this device's :class:`Rates` in about ``seconds`` (``quick``: tiny sizes, a few rounds) and keep them
    in :func:`calibration_path` under :func:`device_name`; returns the entry.

    Each probe group (:func:`probe_forward`, :func:`probe_training`, :func:`probe_matmul`,
    :func:`probe_linear_grid`, :func:`probe_data_path`, :func:`probe_disk_and_jobs`) registers its timed calls and
    says how its rates follow from their median times. After one warm-up call each, the probes run round-robin until
    the budget is spent (:func:`measure`): on a shared machine a job runs at the typical speed, and round-robin spreads
    every probe over the whole measurement.
    """
    if not (math.isfinite(seconds) and seconds > 0):  # inf would measure for ever
        raise FmcacheError(f"--seconds must be a finite number > 0, got {seconds}")
    start = time.perf_counter()
    dev = pick_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(dev, Sizes.of(dev.type == "cuda", quick), Path(tmp))
        groups = [
            probe_forward(bench),
            probe_training(bench),
            probe_matmul(bench),
            probe_linear_grid(bench, quick),
            probe_data_path(bench),
            probe_disk_and_jobs(bench),
        ]
        budget = (min(seconds, 15.0) if quick else seconds) - (time.perf_counter() - start)
        t, rounds = measure(bench, max(budget, 0.0))
    entry: dict = {}
    for rates in groups:
        entry.update(rates(t))
    entry["overlap"] = bench.gpu
    _report(entry, bench.sizes, log)
    entry.update(
        measured_at=time.strftime("%Y-%m-%d %H:%M"),
        fmcache=fmcache_version(),
        device=str(dev),
        rounds=rounds,
        threads=torch.get_num_threads(),
        quick=quick,
        seconds=round(time.perf_counter() - start, 1),
    )
    name = device_name(str(dev))
    path = calibration_path()
    doc = read_json(path)
    doc[name] = entry
    write_json(path, doc)
    return {**entry, "name": name, "path": str(path)}
