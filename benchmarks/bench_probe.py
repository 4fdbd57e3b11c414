"""P1: the paper's frozen linear protocol, cached vs recomputed every epoch, as a ratio measured in one run.

The protocol is 4 learning rates × 5 seeds × E epochs (E=20), with validation every epoch and a test evaluation.
- **fmcache**: `extract` once, then `probe` trains all 20 heads at once from the cache.
- **seed-style**: each run (LR, seed) has its own loop that decodes the images and runs the frozen foundation on every
  train batch of every epoch, plus every val pass, plus the test pass, as the original code does.

By default all 20 seed-style runs are timed in full. Every run costs the same (same images, same forwards), so
``--seed-runs N`` times only N of them and scales by 20/N for a quicker estimate (the output says which).
Model: a registry model at random init (default ``resnet50`` at 32 px). Data: scikit-learn digits written as PNGs (``--per-class`` × 10 images).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmcache.data import ImageDataset, build_transform, load_dataset  # noqa: E402
from fmcache.data.digits import write_digits  # noqa: E402
from fmcache.extract.run import run_extract  # noqa: E402
from fmcache.extract.spec import ExtractSpec  # noqa: E402
from fmcache.frozen.run import run_probe  # noqa: E402
from fmcache.frozen.specs import ProbeSpec  # noqa: E402
from fmcache.metrics import evaluate  # noqa: E402
from fmcache.models import create_foundation  # noqa: E402

LRS, SEEDS = (1e-5, 3e-5, 1e-4, 1e-3), 5


def seed_style_run(model, index, transform, lr: float, seed: int, epochs: int, batch: int) -> float:
    """One (lr, seed) run of the original loop: the frozen model runs on every batch of every epoch."""
    loaders = {
        s: torch.utils.data.DataLoader(
            ImageDataset(index, index.indices(s), transform),
            batch_size=batch,
            shuffle=s == "train",
            generator=torch.Generator().manual_seed(seed),
            num_workers=0,
        )
        for s in ("train", "val", "test")
    }
    torch.manual_seed(seed)
    head = torch.nn.Linear(model(torch.zeros(1, 3, 32, 32)).pooled.shape[-1], len(index.class_names))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-5)
    best, best_state = -1.0, None

    def predict(split: str) -> float:
        scores, labels = [], []
        for images, ids in loaders[split]:
            with torch.no_grad():
                scores.append(torch.softmax(head(model(images).pooled), -1).numpy())
            labels.append(index.labels[ids.numpy()])
        return evaluate("accuracy", np.concatenate(labels), np.concatenate(scores), False)["value"]

    for _ in range(epochs):
        for images, ids in loaders["train"]:
            with torch.no_grad():
                feats = model(images).pooled
            loss = torch.nn.functional.cross_entropy(head(feats), torch.as_tensor(index.labels[ids.numpy()]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
        val = predict("val")
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    return predict("test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--seed-runs", type=int, default=20, help="seed-style runs timed in full (of 20; fewer = estimate)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits(Path(tmp) / "digits", per_class=args.per_class)
        t0 = time.perf_counter()
        spec = ExtractSpec(
            dataset="imagefolder", data_root=root, model=args.model, random_init=True, img_size=args.img_size,
            workers=0, batch_size=64, cache_root=Path(tmp) / "cache",
        )  # fmt: skip
        folder = run_extract(spec, progress=False, log=lambda m: None)
        t_extract = time.perf_counter() - t0
        t1 = time.perf_counter()
        # plots are presentation, not protocol: the seed-style loop draws none either
        spec = ProbeSpec(
            folder, Path(tmp) / "results", lrs=LRS, seeds=SEEDS, epochs=args.epochs, pool="paper", plots=False
        )
        run_probe(spec)
        t_probe = time.perf_counter() - t1
        cached = t_extract + t_probe

        index = load_dataset("imagefolder", root)
        transform, _ = build_transform(args.img_size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        model = create_foundation(args.model, random_init=True, img_size=args.img_size)
        runs = [(lr, s) for lr in LRS for s in range(SEEDS)][: args.seed_runs]
        t2 = time.perf_counter()
        for lr, seed in runs:
            seed_style_run(model, index, transform, lr, seed, args.epochs, 64)
        measured = time.perf_counter() - t2
    recompute = measured * len(LRS) * SEEDS / len(runs)
    n = len(index)
    print(f"P1 setup: {args.model} random-init @{args.img_size}px, {n} images, {len(LRS)} LRs × {SEEDS} seeds × "
          f"{args.epochs} epochs")  # fmt: skip
    print(
        f"  fmcache: extract {t_extract:.1f} s + probe (all 20 heads, results written, plots off) {t_probe:.1f} s = {cached:.1f} s"
    )
    scaled = "" if len(runs) == 20 else f" (estimate: {len(runs)} measured, scaled ×{20 / len(runs):g})"
    print(f"  seed-style: {len(runs)} run(s) measured {measured:.1f} s → 20 runs {recompute:.1f} s{scaled}")
    print(f"P1 cached protocol vs recompute-every-epoch: {recompute / cached:.0f}×")


if __name__ == "__main__":
    main()
