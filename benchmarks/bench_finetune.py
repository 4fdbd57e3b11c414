"""Fine-tuning speed (issue 12), printed as ratios measured in one run.

(a) training-step throughput of fmcache's fine-tuning loop (``fmcache.finetune.loop.Trainer``: AMP policy, clipping,
    schedule, accumulation bookkeeping, per-epoch checkpoint) vs a bare timm training loop on the same model, head and
    preloaded batches (goal >= 0.9x). Both train every block (``--freeze none``) with a linear head.
(b) ``--from-cache --freeze K`` vs online ``--freeze K`` per epoch, K = 3/4 of the depth: the online side runs the
    frozen prefix (under no_grad) every step, the cached side starts at block K+1 from layer-K tokens.

Both sides read preloaded tensors (no image decoding), so the ratios measure the model work; the one-time cost of
extracting the layer-K tokens is printed beside (b). Usage: ``python benchmarks/bench_finetune.py [--depth 8]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fmcache.dist import Dist
from fmcache.finetune.loop import RunSettings, Trainer, _Labelled
from fmcache.finetune.model import FineTuneModel
from fmcache.finetune.run import FinetuneSpec, build_foundation


class _Rows(TensorDataset):
    """TensorDataset whose label lookup matches fmcache's (x, label) contract and exposes ``labels``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        super().__init__(x, y)
        self.labels = y.numpy()


def _data(x: torch.Tensor, y: torch.Tensor) -> dict:
    ds = _Labelled(_Rows(x, y), None)
    return {"train": ds, "val": _Labelled(_Rows(x[:16], y[:16]), None), "test": _Labelled(_Rows(x[:16], y[:16]), None)}


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
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    bare = _bare_epoch_s(spec, args.size, x, y, args.epochs, args.batch, classes, dev)
    ours = _fmcache_epoch_s(model("none"), _data(x, y), args.epochs, args.batch, False, dev)
    print(
        f"(a) train throughput fmcache / bare timm loop: {bare / ours:.2f}x  ({ours:.2f} s vs {bare:.2f} s per epoch)"
    )

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


def _layer_tokens(model: FineTuneModel, x: torch.Tensor, k: int) -> torch.Tensor:
    h = model.stages.embed(x)
    for i in range(k):
        h = model.stages.run_block(i, h)
    return model.stages.to_tokens(h)


if __name__ == "__main__":
    main()
