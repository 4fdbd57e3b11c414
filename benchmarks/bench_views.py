"""Cached augmented views (issue 13): do K cached views train a frozen head like the seed's online augmentation?

Three ways to train the same head (same LR, seeds, epochs, batch, AdamW recipe, warmup and clipping), each evaluated
on center crops of val and test, for the linear head and the stacked DeiT token head (``--heads linear,deit``):

- **(a) center**: the library's probe with ``--views off``, the center crops only;
- **(b) views**: the library's probe on K = 10 cached views (``extract --views 10``), one view per sample per epoch;
- **(c) online**: as the seed does, the frozen model runs (no_grad) on a fresh draw of the train augmentation at
  every step and the head trains on its output.

Linear head: (a) and (b) are ``fmcache probe`` (z-scored with the center crops' train statistics, as (c)). DeiT head:
(a) and (b) are ``fmcache probe --head deit --head-depth D --head-random-init`` on last-layer tokens (``extract
--tokens last``); (c) feeds the model's last-layer patch tokens (the probe's ``--token-norm seed``) into the same
``DeiTHead``, built after ``torch.manual_seed(seed)`` as the probe builds it. A 12-block DeiT head does not fit the
CPU budget: the DeiT part runs a 1-block head (``--deit-depth``) with fewer seeds and epochs, and says so.

It prints the test metric (mean ± std over seeds) of each and the wall time of (c) over (b), with (b) counted as the
whole extraction with views plus the probe. (c) gets its images decoded once up front (the seed decodes them every
step), so the ratio is, if anything, in (c)'s favour. Data: scikit-learn digits as PNGs (``--per-class`` × 10);
model: a registry model at random init (default ``resnet50`` at 32 px, as the demo), because no hub is reachable
offline. Both heads share the two caches (center only, and with views) and the model.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmcache.cache.reader import CacheReader  # noqa: E402
from fmcache.data import load_dataset, load_image, train_augmentation  # noqa: E402
from fmcache.data.digits import write_digits  # noqa: E402
from fmcache.extract.run import run_extract  # noqa: E402
from fmcache.extract.spec import ExtractSpec  # noqa: E402
from fmcache.frozen.features import train_stats  # noqa: E402
from fmcache.frozen.heads import DeiTHead  # noqa: E402
from fmcache.frozen.linear import init_linear  # noqa: E402
from fmcache.frozen.run import run_probe  # noqa: E402
from fmcache.frozen.run_tokens import run_token_probe  # noqa: E402
from fmcache.frozen.specs import ProbeSpec, TokenProbeSpec  # noqa: E402
from fmcache.frozen.token_layers import TokenNorm, layer_spec, token_norm_for  # noqa: E402
from fmcache.frozen.tokens import TokenSplit  # noqa: E402
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

HEADS = ("linear", "deit")
WEIGHT_DECAY = 1e-5  # the probes' default


def online_run(
    model, images, labels, center, features: Callable, head: torch.nn.Module, augment, metric: str,
    lr: float, epochs: int, batch_size: int, seed: int,
) -> float:  # fmt: skip
    """One seed of (c): a fresh augmentation and a frozen forward at every step; test metric at the best val epoch.

    ``features`` maps the foundation's output to the head's input; ``center`` holds the val and test inputs (center
    crops, from the cache) and labels; ``head`` arrives with the probe's init for ``seed``.
    """
    opt = torch.optim.AdamW(
        adamw_param_groups(head.named_parameters(), WEIGHT_DECAY), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS
    )
    order_gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = steps_per_epoch * epochs
    fitted = fit_warmup(paper_warmup("imagefolder"), epochs, len(images), batch_size)
    warmup = warmup_steps_for(fitted.get("warmup_epochs"), fitted.get("warmup_iters"), steps_per_epoch, total)
    y = torch.as_tensor(labels)
    best_val, best_test, step = -math.inf, float("nan"), 0
    torch.manual_seed(10_000 + seed)  # the augmentation's global RNG, as the seed's DataLoader uses it
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(images), generator=order_gen)
        for begin in range(0, len(images), batch_size):
            idx = order[begin : begin + batch_size]
            with torch.no_grad():
                feats = features(model(torch.stack([augment(images[i]) for i in idx.tolist()])))
            loss = torch.nn.functional.cross_entropy(head(feats), y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), GRAD_CLIP)
            for group in opt.param_groups:
                group["lr"] = lr * lr_multiplier(step, total, warmup, "constant")
            opt.step()
            step += 1
        head.eval()
        with torch.no_grad():
            scores = {
                s: torch.cat([torch.softmax(head(xb), -1) for xb in x.split(256)]).numpy()
                for s, (x, _) in center.items()
            }
        val = evaluate(metric, center["val"][1], scores["val"], False)["value"]
        if val > best_val:  # the first best epoch, as the probes pick it
            best_val = val
            best_test = evaluate(metric, center["test"][1], scores["test"], False)["value"]
    return best_test


def linear_part(args, caches, reader, online: Callable) -> dict:
    """(a), (b) through ``run_probe``; (c) a linear head on z-scored pooled features of the online forward."""
    probe = {"lrs": [args.lr], "seeds": args.seeds, "epochs": args.epochs, "batch_size": args.batch_size}
    results, seconds = {}, {}
    for name, views in (("a", "off"), ("b", "on")):
        start = time.perf_counter()
        out = run_probe(ProbeSpec(caches[name], caches["results"], plots=False, views=views, **probe))
        seconds[name] = time.perf_counter() - start
        results[name] = out["layers"][max(out["layers"])]["per_lr"][args.lr]["test_per_seed"]
    kind = {"cls": "cls", "mean": "mean"}.get(reader.manifest["model"]["pooled_kind"], "paper")
    last = reader.num_layers - 1
    pool = {"cls": lambda o: o.pooled_cls[last], "mean": lambda o: o.pooled_mean[last], "paper": lambda o: o.pooled}
    stats = train_stats(reader.pooled("train", "last", kind))
    mean, std = (torch.as_tensor(s, dtype=torch.float32) for s in stats)
    center = {
        s: (torch.as_tensor(((reader.pooled(s, "last", kind) - stats[0]) / stats[1]).astype(np.float32)),
            reader.labels(s))
        for s in ("val", "test")
    }  # fmt: skip
    n_classes = len(reader.class_names)

    def head_for(seed: int) -> torch.nn.Module:
        weight, bias = init_linear(seed, len(mean), n_classes)  # the probe's init for this seed
        head = torch.nn.Linear(len(mean), n_classes)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        return head

    start = time.perf_counter()
    results["c"] = [
        online(center, lambda o: (pool[kind](o) - mean) / std, head_for(seed), out["metric"], args.lr, args.epochs,
               seed)
        for seed in range(args.seeds)
    ]  # fmt: skip
    seconds["c"] = time.perf_counter() - start
    title = (f"linear head, lr {args.lr:g}, {args.seeds} seeds × {args.epochs} epochs, batch {args.batch_size}; "
             f"test {out['metric']} mean ± std over seeds")  # fmt: skip
    return {"title": title, "results": results, "seconds": seconds, "forwards": args.seeds * args.epochs}


def deit_part(args, caches, reader, online: Callable) -> dict:
    """(a), (b) through ``run_token_probe`` (random-init DeiT head); (c) the same head on online patch tokens."""
    layer = reader.num_layers
    probe = {"head": "deit", "lrs": [args.deit_lr], "seeds": args.deit_seeds, "epochs": args.deit_epochs,
             "batch_size": args.batch_size, "layer": "last", "head_random_init": True, "head_depth": args.deit_depth,
             "preload": "yes", "workers": 0, "device": "cpu", "plots": False}  # fmt: skip
    results, seconds = {}, {}
    for name, views in (("a", "off"), ("b", "on")):
        start = time.perf_counter()
        out = run_token_probe(TokenProbeSpec(caches[name], caches["results"], views=views, **probe))
        seconds[name] = time.perf_counter() - start
        results[name] = out["layers"][layer]["per_lr"][args.deit_lr]["test_per_seed"]
    spec = layer_spec(reader, layer, token_norm_for(reader, "seed"), "deit")
    norm = TokenNorm(spec, torch.device("cpu"))  # drops prefix tokens (and applies the model's norm if the seed did)
    center = {s: (norm(TokenSplit(reader, s, layer, True, 0).x), reader.labels(s)) for s in ("val", "test")}
    n_classes = len(reader.class_names)

    def head_for(seed: int) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the probe's init for this seed
            return DeiTHead(spec.dim, n_classes, args.deit_depth, spec.grid)

    start = time.perf_counter()
    results["c"] = [
        online(center, lambda o: norm(o.tokens[layer - 1]), head_for(seed), out["metric"], args.deit_lr,
               args.deit_epochs, seed)
        for seed in range(args.deit_seeds)
    ]  # fmt: skip
    seconds["c"] = time.perf_counter() - start
    grid = "×".join(map(str, spec.grid))
    shrunk = (f"; shrunk to fit the CPU budget: {args.deit_seeds} seeds × {args.deit_epochs} epochs "
              f"(linear: {args.seeds} × {args.epochs})"
              if (args.deit_seeds, args.deit_epochs) != (args.seeds, args.epochs) else "")  # fmt: skip
    title = (f"DeiT head, depth {args.deit_depth} of 12, random init (--head-random-init, seeded per seed), "
             f"lr {args.deit_lr:g}, {args.deit_seeds} seeds × {args.deit_epochs} epochs, batch {args.batch_size}, "
             f"on layer-{layer} patch tokens ({grid} grid × {spec.dim}){shrunk}; "
             f"test {out['metric']} mean ± std over seeds")  # fmt: skip
    return {"title": title, "results": results, "seconds": seconds, "forwards": args.deit_seeds * args.deit_epochs}


def report(part: dict, views: int, t_extract_views: float) -> None:
    results, seconds = part["results"], part["seconds"]
    print(part["title"])
    labels = {"a": "(a) center crops", "b": f"(b) K={views} cached views", "c": "(c) online augmentation"}
    for name in "abc":
        values = np.asarray(results[name])
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        print(f"  {labels[name]:<28} {values.mean():.4f} ± {std:.4f}   per seed {np.round(values, 4).tolist()}")
    cost_b = t_extract_views + seconds["b"]
    print(f"  probe: (a) {seconds['a']:.1f} s, (b) {seconds['b']:.1f} s; online (c) {seconds['c']:.1f} s")
    print(f"  wall time (c) / (b) = {seconds['c'] / cost_b:.1f}× with (b) = extraction with views + probe "
          f"({seconds['c'] / seconds['b']:.0f}× the probe alone); foundation forwards per train image: "
          f"(c) {part['forwards']} (seeds × epochs), (b) {views + 1} (K + 1, once for every head)")  # fmt: skip
    gap_a = abs(np.mean(results["a"]) - np.mean(results["c"]))
    gap_b = abs(np.mean(results["b"]) - np.mean(results["c"]))
    verdict = (
        "as close to (c) as"
        if math.isclose(gap_a, gap_b, abs_tol=1e-9)
        else "closer to (c) than"
        if gap_b < gap_a
        else "farther from (c) than"
    )
    print(f"  |a - c| = {gap_a:.4f}, |b - c| = {gap_b:.4f}: (b) is {verdict} (a) is")


def parse_heads(text: str) -> list[str]:
    heads = [h.strip() for h in text.split(",") if h.strip()]
    bad = [h for h in heads if h not in HEADS]
    if not heads or bad:
        raise argparse.ArgumentTypeError(f"use linear, deit or linear,deit (got '{text}')")
    return [h for h in HEADS if h in heads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=parse_heads, default=list(HEADS), help="linear, deit or both (default)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15, help="linear head")
    parser.add_argument("--seeds", type=int, default=3, help="linear head")
    parser.add_argument("--lr", type=float, default=1e-3, help="linear head")
    parser.add_argument("--deit-depth", type=int, default=1, help="DeiT head blocks (DeiT-B has 12)")
    parser.add_argument("--deit-epochs", type=int, default=8)
    parser.add_argument("--deit-seeds", type=int, default=2)
    parser.add_argument("--deit-lr", type=float, default=1e-4)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_digits(tmp / "digits", size=32, per_class=args.per_class)
        common = {
            "dataset": "imagefolder", "data_root": data, "model": args.model, "random_init": True,
            "img_size": args.img_size, "workers": 0, "batch_size": 64, "cache_root": tmp / "cache",
            "tokens": "last" if "deit" in args.heads else "none",
        }  # fmt: skip
        start = time.perf_counter()
        plain = run_extract(ExtractSpec(**common), progress=False, log=lambda _m: None)
        t_extract_plain = time.perf_counter() - start
        start = time.perf_counter()
        with_views = run_extract(ExtractSpec(**common, views=args.views), progress=False, log=lambda _m: None)
        t_extract_views = time.perf_counter() - start
        caches = {"a": plain, "b": with_views, "results": tmp / "results"}

        # (c)'s shared pieces: the train images decoded once, the train augmentation and the caches' random model
        reader = CacheReader(plain)
        index = load_dataset("imagefolder", data)
        images = [load_image(index.paths[i]) for i in reader.ids("train")]
        mean, std = reader.manifest["inputs"]["transform"]["mean"], reader.manifest["inputs"]["transform"]["std"]
        augment = train_augmentation(args.img_size, mean, std)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # extraction's --random-init seed: the same random model as the caches
            model = create_foundation(args.model, random_init=True, img_size=args.img_size).eval()
        train_labels = reader.labels("train")

        def online(center, features, head, metric, lr, epochs, seed):
            return online_run(model, images, train_labels, center, features, head, augment, metric, lr, epochs,
                              args.batch_size, seed)  # fmt: skip

        n = reader.manifest["dataset"]["split_counts"]
        print(f"{args.model} (random init) at {args.img_size} px, digits {n}; extraction ({common['tokens']} tokens): "
              f"center only {t_extract_plain:.1f} s, with {args.views} views {t_extract_views:.1f} s "
              f"({t_extract_views / t_extract_plain:.1f}×); load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs (timings are noisy when the machine is shared)", flush=True)  # fmt: skip
        parts = {"linear": linear_part, "deit": deit_part}
        for head in args.heads:
            report(parts[head](args, caches, reader, online), args.views, t_extract_views)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
