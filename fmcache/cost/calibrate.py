"""``fmcache calibrate``: measure this device's :class:`~fmcache.cost.rates.Rates` and keep them per device."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from fmcache.cost.rates import Log, calibration_path, device_name, fmcache_version, read_json, write_json
from fmcache.errors import FmcacheError

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
    entry.update(measured_at=time.strftime("%Y-%m-%d %H:%M"), fmcache=fmcache_version(), device=str(dev), rounds=rounds,
                 threads=torch.get_num_threads(), quick=quick, seconds=round(time.perf_counter() - start, 1))  # fmt: skip
    path = calibration_path()
    doc = read_json(path)
    doc[name] = entry
    write_json(path, doc)
    return {**entry, "name": name, "path": str(path)}
