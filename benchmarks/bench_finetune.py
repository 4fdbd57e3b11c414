"""Fine-tuning speed (issue 12), printed as ratios measured in one run.

(a) training-step throughput of fmcache's fine-tuning loop (``fmcache.finetune.loop.Trainer``: AMP policy, clipping,
    schedule, accumulation bookkeeping, per-epoch checkpoint) vs a bare timm training loop on the same model, head and
    preloaded batches (goal >= 0.9x). Both train every block (``--freeze none``) with a linear head.
(b) ``--from-cache --freeze K`` vs online ``--freeze K`` per epoch, K = 3/4 of the depth: the online side runs the
    frozen prefix (under no_grad) every step, the cached side starts at block K+1 from layer-K tokens.

(c) ``--method lora`` vs ``--method full`` (issue 21): step time, peak memory, trainable parameters and checkpoint
    size, each method in its own process (so the peak is its own: ``max_memory_allocated`` on GPU, the process's peak
    RSS on CPU, printed with its rise over the built model), both with ``--freeze none`` and a linear head.
(p9) one epoch of fmcache's loop fed from a pixel cache with the augmentation on the device (``--pixels on
    --augment device``: uint8 crops read by the loader, ``DeviceAugment`` per step) vs the bare timm loop on the
    same preloaded tensors (no data path, no augmentation: the limit), and where the difference goes: the loop's
    own cost (fmcache on the preloaded tensors), reading the crops and the augmentation (timed alone over an epoch).

Both sides read preloaded tensors (no image decoding), so the ratios measure the model work; the one-time cost of
extracting the layer-K tokens is printed beside (b). Usage: ``python benchmarks/bench_finetune.py [--depth 8]
[--only a|b|lora|p9] [--rank 8]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fmcache.dist import Dist
from fmcache.finetune.build import build_foundation, build_model
from fmcache.finetune.loop import Labelled, RunSettings, Trainer
from fmcache.finetune.model import FineTuneModel
from fmcache.finetune.spec import FinetuneSpec


class _Rows(TensorDataset):
    """TensorDataset whose label lookup matches fmcache's (x, label) contract and exposes ``labels``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        super().__init__(x, y)
        self.labels = y.numpy()


def _data(x: torch.Tensor, y: torch.Tensor) -> dict:
    ds = Labelled(_Rows(x, y), None)
    return {"train": ds, "val": Labelled(_Rows(x[:16], y[:16]), None), "test": Labelled(_Rows(x[:16], y[:16]), None)}


def _settings(epochs: int, batch: int, from_cache: bool) -> RunSettings:
    return RunSettings(lr=1e-4, seed=0, epochs=epochs, batch_size=batch, accum=1, clip=1.0, amp="auto",
                       schedule="constant", warmup={"warmup_iters": 0}, weight_decay=1e-5, layer_decay=1.0,
                       metric="accuracy", multilabel=False, from_cache=from_cache, export=False)  # fmt: skip


def _fmcache_epoch_s(model: FineTuneModel, data: dict, epochs: int, batch: int, from_cache: bool, dev) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        result = Trainer(model, data, _settings(epochs, batch, from_cache), Path(tmp), Dist(0, 1, dev),
                         resume=False, log=lambda m: None).run()  # fmt: skip
    # the first epoch pays one-time costs (allocator, kernels) on both sides: best-of over epochs
    return result["timings"]["train_s_per_epoch_min"]


def _bare_epoch_s(spec: FinetuneSpec, size: int, x, y, epochs: int, batch: int, classes: int, dev) -> float:
    foundation = build_foundation(spec, size)
    timm_model = foundation.adapter.model.to(dev).requires_grad_(True)
    head = nn.Linear(timm_model.embed_dim, classes).to(dev)
    params = [*timm_model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    timm_model.eval()  # as fmcache: the backbone in eval mode
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for xb, yb in loader:
            xb, yb = xb.to(dev), yb.to(dev)
            with amp:
                logits = head(timm_model.forward_features(xb)[:, 0].float())
            loss = nn.functional.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", choices=("a", "b", "lora", "p9"), default=None, help="One section (default: all).")
    parser.add_argument("--rank", type=int, default=8, help="(c): LoRA rank.")
    parser.add_argument("--worker", choices=("full", "lora"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_method_worker(args)))
        return
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.only == "lora":
        _lora_row(args, dev)
        return
    classes = 5
    torch.manual_seed(0)
    x = torch.randn(args.n, 3, args.size, args.size)
    y = torch.randint(0, classes, (args.n,))
    spec = FinetuneSpec(model="dinov2_vits14", random_init=True, img_size=args.size, data_root=Path("."),
                        dataset="imagefolder", arch_overrides={"depth": args.depth})  # fmt: skip

    def model(freeze: str) -> FineTuneModel:
        torch.manual_seed(0)
        foundation = build_foundation(spec, args.size)
        return FineTuneModel(foundation, nn.Linear(384, classes), "pooled", freeze, None)

    print(f"device {dev}; ViT-S/14 depth {args.depth} at {args.size} px, {args.n} images, batch {args.batch}")
    if args.only == "b":
        _section_b(args, spec, model, x, y, dev)
        return
    if args.only == "p9":
        _section_p9(args, spec, model, x, y, dev)
        return
    bare = _bare_epoch_s(spec, args.size, x, y, args.epochs, args.batch, classes, dev)
    ours = _fmcache_epoch_s(model("none"), _data(x, y), args.epochs, args.batch, False, dev)
    print(
        f"(a) train throughput fmcache / bare timm loop: {bare / ours:.2f}x  ({ours:.2f} s vs {bare:.2f} s per epoch)"
    )
    if args.only == "a":
        return
    _section_b(args, spec, model, x, y, dev)
    _lora_row(args, dev)


def _section_b(args, spec: FinetuneSpec, model, x: torch.Tensor, y: torch.Tensor, dev: torch.device) -> None:
    k = args.depth * 3 // 4
    online = _fmcache_epoch_s(model(str(k)), _data(x, y), args.epochs, args.batch, False, dev)
    m = model(str(k)).to(dev)
    start = time.perf_counter()
    with torch.no_grad():
        tokens = torch.cat([_layer_tokens(m, xb.to(dev), k).cpu() for xb in x.split(args.batch)])
    extract_s = time.perf_counter() - start
    cached = _fmcache_epoch_s(m, _data(tokens, y), args.epochs, args.batch, True, dev)
    print(f"(b) --freeze {k} per epoch, online / from cache: {online / cached:.2f}x faster from cache "
          f"({online:.2f} s vs {cached:.2f} s; extracting layer-{k} tokens once: {extract_s:.2f} s)")  # fmt: skip


def _section_p9(args, spec: FinetuneSpec, model, x: torch.Tensor, y: torch.Tensor, dev: torch.device) -> None:
    """(p9): an epoch from a pixel cache with device augmentation vs the bare loop on preloaded tensors."""
    import numpy as np
    from PIL import Image

    from fmcache.cache.pixels import PixelReader
    from fmcache.data import load_dataset
    from fmcache.data.pixels import CropDataset
    from fmcache.extract.pixel_spec import PixelSpec
    from fmcache.extract.pixels import write_pixels
    from fmcache.finetune.loop import augment_seed
    from fmcache.finetune.pixels import DeviceBatches

    classes = int(y.max()) + 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        rng = np.random.default_rng(0)
        for i in range(args.n):  # the images' content does not matter: the crops are read, not decoded
            folder = root / f"c{int(y[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (args.size + 16, args.size + 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
        folder = write_pixels(PixelSpec(dataset="imagefolder", data_root=root, img_size=args.size,
                                        cache_root=Path(tmp) / "cache", workers=0), progress=False, log=lambda m: None)  # fmt: skip
        index = load_dataset("imagefolder", root)
        reader = PixelReader(folder)
        crops = CropDataset(index, np.arange(len(index)), reader)
        labelled = Labelled(crops, index.labels)
        data = {"train": labelled, "val": Labelled(CropDataset(index, np.arange(16), reader), index.labels),
                "test": Labelled(CropDataset(index, np.arange(16), reader), index.labels)}  # fmt: skip
        batches = DeviceBatches(args.size, (0.5,) * 3, (0.25,) * 3, "repeat")
        with tempfile.TemporaryDirectory() as out:
            result = Trainer(model("none"), data, _settings(args.epochs, args.batch, False), Path(out),
                             Dist(0, 1, dev), resume=False, log=lambda m: None, batches=batches).run()  # fmt: skip
        pixels_s = result["timings"]["train_s_per_epoch_min"]
        # the data path alone over one epoch: read + collate, then the augmentation on the device
        loader = torch.utils.data.DataLoader(labelled, batch_size=args.batch, shuffle=True, drop_last=True)
        start = time.perf_counter()
        held = [xb.to(dev) for xb, _ in loader]
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        for i, xb in enumerate(held):
            batches.train(xb, augment_seed(0, 0, i, 0))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        augment_s = time.perf_counter() - start
    bare = _bare_epoch_s(spec, args.size, x, y, args.epochs, args.batch, classes, dev)
    ours = _fmcache_epoch_s(model("none"), _data(x, y), args.epochs, args.batch, False, dev)
    print(f"(p9) one epoch, fmcache from the pixel cache + device augmentation / bare timm loop on preloaded tensors: "
          f"{bare / pixels_s:.2f}x ({pixels_s:.2f} s vs {bare:.2f} s); fmcache on the same preloaded tensors "
          f"{bare / ours:.2f}x ({ours:.2f} s); the data path alone: reading the crops {read_s:.2f} s, the "
          f"augmentation on {dev.type} {augment_s:.2f} s per epoch ({100 * (read_s + augment_s) / pixels_s:.0f}% "
          f"of the pixel epoch)")  # fmt: skip


def _method_worker(args) -> dict:
    """(c), one method in this process: the real ``build_model`` (peft adapters for lora) through the Trainer."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = 5
    torch.manual_seed(0)
    x = torch.randn(args.n, 3, args.size, args.size)
    y = torch.randint(0, classes, (args.n,))
    lora = {"lora_rank": args.rank} if args.worker == "lora" else {}
    spec = FinetuneSpec(model="dinov2_vits14", random_init=True, img_size=args.size, data_root=Path("."),
                        dataset="imagefolder", arch_overrides={"depth": args.depth}, method=args.worker, **lora)  # fmt: skip
    model, _ = build_model(spec, args.size, classes, 0)
    rss_built = _rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory() as tmp:
        result = Trainer(model, _data(x, y), _settings(args.epochs, args.batch, False), Path(tmp), Dist(0, 1, dev),
                         resume=False, log=lambda m: None).run()  # fmt: skip
    peak = result["timings"]["peak_memory_bytes"]
    return {"step_s": result["timings"]["train_s_per_epoch_min"] / result["steps_per_epoch"], "peak_bytes": peak,
            "rise_bytes": peak - rss_built if dev.type == "cpu" else None, "device": str(dev),
            "trainable": result["trainable_parameters"], "checkpoint_bytes": result["checkpoint_bytes"]}  # fmt: skip


def _rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _lora_row(args, dev: torch.device) -> None:
    """(c) LoRA vs full fine-tuning, one process each."""
    rows = {}
    for method in ("full", "lora"):
        cmd = [sys.executable, __file__, "--worker", method, "--depth", str(args.depth), "--size", str(args.size),
               "--n", str(args.n), "--batch", str(args.batch), "--epochs", str(args.epochs), "--rank", str(args.rank)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
    full, lora = rows["full"], rows["lora"]
    mb = 1e6
    memory = (
        f"peak memory (GPU allocated) {full['peak_bytes'] / mb:.0f} MB vs {lora['peak_bytes'] / mb:.0f} MB"
        if dev.type == "cuda"
        else f"peak RSS {full['peak_bytes'] / mb:.0f} MB vs {lora['peak_bytes'] / mb:.0f} MB (rise over the built "
        f"model {full['rise_bytes'] / mb:.0f} MB vs {lora['rise_bytes'] / mb:.0f} MB)"
    )
    print(f"(c) {dev}, ViT-S/14 depth {args.depth} at {args.size} px, batch {args.batch}, --freeze none, linear head; "
          f"full vs LoRA r={args.rank} (attn.qkv, attn.proj): step {full['step_s']:.3f} s vs {lora['step_s']:.3f} s "
          f"({full['step_s'] / lora['step_s']:.2f}x); {memory}; trainable {full['trainable']:,} vs "
          f"{lora['trainable']:,}; checkpoint {full['checkpoint_bytes'] / mb:.1f} MB vs "
          f"{lora['checkpoint_bytes'] / mb:.2f} MB")  # fmt: skip


def _layer_tokens(model: FineTuneModel, x: torch.Tensor, k: int) -> torch.Tensor:
    h = model.stages.embed(x)
    for i in range(k):
        h = model.stages.run_block(i, h)
    return model.stages.to_tokens(h)


if __name__ == "__main__":
    main()
