"""Cached augmented views (issue 13): do K cached views train a frozen head like the seed's online augmentation?

Three ways to train the same linear head (same LR, seeds, epochs, batch, AdamW recipe, warmup, clipping and z-scoring
with the center crops' train statistics), each evaluated on center crops of val and test:

- **(a) center**: `fmcache probe --views off`, the center crops only;
- **(b) views**: `fmcache probe` on K = 10 cached views (`extract --views 10`), one view per sample per epoch;
- **(c) online**: as the seed does, the frozen model runs on a fresh draw of the train augmentation at every step.

It prints the test metric (mean ± std over seeds) of each and the wall time of (c) over (b), with (b) counted as the
whole extraction with views plus the probe. (c) gets its images decoded once up front (the seed decodes them every
step), so the ratio is, if anything, in (c)'s favour. Only the linear head is measured: the DeiT token head is not
wired to views here. Data: scikit-learn digits as PNGs (``--per-class`` × 10); model: a registry model at random init
(default ``resnet50`` at 32 px, as the demo), because no hub is reachable offline.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmcache.cache.reader import CacheReader  # noqa: E402
from fmcache.data import load_dataset, load_image, train_augmentation  # noqa: E402
from fmcache.demo import write_digits  # noqa: E402
from fmcache.extract import ExtractSpec, run_extract  # noqa: E402
from fmcache.frozen.features import train_stats  # noqa: E402
from fmcache.frozen.linear import init_linear  # noqa: E402
from fmcache.frozen.run import run_probe  # noqa: E402
from fmcache.metrics import evaluate  # noqa: E402
from fmcache.models import create_foundation  # noqa: E402
from fmcache.training import (  # noqa: E402
    ADAM_BETAS,
    ADAM_EPS,
    GRAD_CLIP,
    adamw_param_groups,
    fit_warmup,
    lr_multiplier,
    paper_warmup,
    warmup_steps_for,
)


def online_run(model, images, labels, center, pool, stats, augment, args, seed: int) -> float:
    """One seed of (c): a fresh augmentation and a frozen forward at every step; test metric at the best val epoch."""
    mean, std = (torch.as_tensor(s, dtype=torch.float32) for s in stats)
    weight, bias = init_linear(seed, len(mean), int(labels.max()) + 1)  # the probe's init for this seed
    head = torch.nn.Linear(len(mean), len(weight))
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    opt = torch.optim.AdamW(
        adamw_param_groups(head.named_parameters(), 1e-5), lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS
    )
    order_gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    total = steps_per_epoch * args.epochs
    fitted = fit_warmup(paper_warmup("imagefolder"), args.epochs, len(images), args.batch_size)
    warmup = warmup_steps_for(fitted.get("warmup_epochs"), fitted.get("warmup_iters"), steps_per_epoch, total)
    y = torch.as_tensor(labels)
    best_val, best_test, step = -1.0, float("nan"), 0
    torch.manual_seed(10_000 + seed)  # the augmentation's global RNG, as the seed's DataLoader uses it
    for _ in range(args.epochs):
        order = torch.randperm(len(images), generator=order_gen)
        for begin in range(0, len(images), args.batch_size):
            idx = order[begin : begin + args.batch_size]
            with torch.no_grad():
                out = model(torch.stack([augment(images[i]) for i in idx.tolist()]))
                feats = (pool(out) - mean) / std
            loss = torch.nn.functional.cross_entropy(head(feats), y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), GRAD_CLIP)
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_multiplier(step, total, warmup, "constant")
            opt.step()
            step += 1
        with torch.no_grad():
            scores = {s: torch.softmax(head(x), -1).numpy() for s, (x, _) in center.items()}
        val = evaluate("accuracy", center["val"][1], scores["val"], False)["value"]
        if val > best_val:  # the first best epoch, as the probe picks it
            best_val = val
            best_test = evaluate("accuracy", center["test"][1], scores["test"], False)["value"]
    return best_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_digits(tmp / "digits", size=32, per_class=args.per_class)
        common = {
            "dataset": "imagefolder", "data_root": data, "model": args.model, "random_init": True,
            "img_size": args.img_size, "workers": 0, "batch_size": 64, "cache_root": tmp / "cache",
        }  # fmt: skip
        start = time.perf_counter()
        plain = run_extract(ExtractSpec(**common), progress=False, log=lambda _m: None)
        t_extract_plain = time.perf_counter() - start
        start = time.perf_counter()
        with_views = run_extract(ExtractSpec(**common, views=args.views), progress=False, log=lambda _m: None)
        t_extract_views = time.perf_counter() - start
        probe = {"lrs": [args.lr], "seeds": args.seeds, "epochs": args.epochs, "batch_size": args.batch_size}
        results, seconds = {}, {}
        for name, folder, views in (("a", plain, "off"), ("b", with_views, "on")):
            start = time.perf_counter()
            out = run_probe(CacheReader(folder), tmp / "results", plots=False, views=views, **probe)
            seconds[name] = time.perf_counter() - start
            results[name] = out["layers"][max(out["layers"])]["per_lr"][args.lr]["test_per_seed"]

        reader = CacheReader(plain)
        kind = {"cls": "cls", "mean": "mean"}.get(reader.manifest["model"]["pooled_kind"], "paper")
        last = reader.num_layers - 1
        pool = {
            "cls": lambda o: o.pooled_cls[last],
            "mean": lambda o: o.pooled_mean[last],
            "paper": lambda o: o.pooled,
        }[kind]
        train_x = reader.pooled("train", "last", kind)
        stats = train_stats(train_x)
        center = {
            s: (torch.as_tensor(((reader.pooled(s, "last", kind) - stats[0]) / stats[1]).astype(np.float32)),
                reader.labels(s))
            for s in ("val", "test")
        }  # fmt: skip
        index = load_dataset("imagefolder", data)
        images = [load_image(index.paths[i]) for i in reader.ids("train")]
        mean, std = reader.manifest["inputs"]["transform"]["mean"], reader.manifest["inputs"]["transform"]["std"]
        augment = train_augmentation(args.img_size, mean, std)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # extraction's --random-init seed: the same random model as the caches
            model = create_foundation(args.model, random_init=True, img_size=args.img_size).eval()
        start = time.perf_counter()
        results["c"] = [
            online_run(model, images, reader.labels("train"), center, pool, stats, augment, args, seed)
            for seed in range(args.seeds)
        ]
        seconds["c"] = time.perf_counter() - start

    n = reader.manifest["dataset"]["split_counts"]
    print(f"{args.model} (random init) at {args.img_size} px, digits {n}, linear head, lr {args.lr:g}, "
          f"{args.seeds} seeds × {args.epochs} epochs, batch {args.batch_size}; test accuracy mean ± std over seeds")  # fmt: skip
    labels = {"a": "(a) center crops", "b": f"(b) K={args.views} cached views", "c": "(c) online augmentation"}
    for name in "abc":
        values = np.asarray(results[name])
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        print(f"  {labels[name]:<28} {values.mean():.4f} ± {std:.4f}   per seed {np.round(values, 4).tolist()}")
    cost_b = t_extract_views + seconds["b"]
    print(f"  extraction: center only {t_extract_plain:.1f} s, with {args.views} views {t_extract_views:.1f} s "
          f"({t_extract_views / t_extract_plain:.1f}×)")  # fmt: skip
    print(f"  probe: (a) {seconds['a']:.1f} s, (b) {seconds['b']:.1f} s; online (c) {seconds['c']:.1f} s")
    print(f"  wall time (c) / (b) = {seconds['c'] / cost_b:.1f}× with (b) = extraction with views + probe "
          f"({seconds['c'] / seconds['b']:.0f}× the probe alone)")  # fmt: skip
    gap_a = abs(np.mean(results["a"]) - np.mean(results["c"]))
    gap_b = abs(np.mean(results["b"]) - np.mean(results["c"]))
    verdict = (
        "as close to" if math.isclose(gap_a, gap_b, abs_tol=1e-9) else "closer to" if gap_b < gap_a else "farther from"
    )
    print(f"  |a - c| = {gap_a:.4f}, |b - c| = {gap_b:.4f}: (b) is {verdict} (c) than (a) is")


if __name__ == "__main__":
    main()
