"""Token-head benchmark: the DeiT head trained from cached tokens vs the limit and vs the seed's loop (P4, P8).

For each foundation (``--foundations vitb,vitl``: DINOv2 ViT-B/14 and ViT-L/14):

(a) one epoch of the stacked DeiT head from cached tokens (fmcache's own ``train_token_grid``, tokens in RAM);
(c) the limit: a bare torch training loop of the same head (same init, AdamW groups, clipping, data order, drop_last)
    on the same in-RAM token tensor: what remains once the foundation's cost is gone (P8: (c)/(a) ≥ 0.9);
(b) the seed's loop on the same images, model and head: every step decodes the images, runs the frozen foundation
    (no_grad, eval) and then trains the head on its last-layer patch tokens (P4: (b)/(a)).

Printed: seconds per epoch of each and the ratios; the ratio for the paper's grid (4 LRs × 5 seeds × E epochs), where
the seed pays (b) in every run while fmcache pays the extraction once and (a) per head; and token-read throughput
(samples/s) from HDF5 (streamed, one contiguous read per sample) vs from RAM.

The ratios are what carry to a GPU, not the absolute times (a shared CPU is noisy; the three are interleaved, the
times are the best of ``--repeats`` tries and the ratios the median of the tries' own ratios). Defaults keep a 2-core
CPU to about ten minutes: the foundations and the DeiT-B head are cut in proportion (``--depth`` blocks for ViT-B and
the head, twice that for ViT-L, so the cost ratios are the 12/12/24-block ones), 56 px. Random init throughout.

Usage: python benchmarks/bench_token_heads.py [--n 80] [--size 56] [--depth 4] [--foundations vitb,vitl]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_extract import write_images  # noqa: E402

FOUNDATIONS = {"vitb": ("ViT-B", "dinov2_vitb14", 1), "vitl": ("ViT-L", "dinov2_vitl14", 2)}  # depth × --depth


def cached_epoch(reader, depth: int, batch: int, epochs: int = 1) -> float:
    """Seconds per epoch of one DeiT head (1 LR × 1 seed) from cached tokens in RAM, over ``epochs`` (training only)."""
    import torch

    from fmcache.frozen.token_layers import layer_spec
    from fmcache.frozen.tokens import TokenGridSettings, TokenSplit, train_token_grid

    layer = reader.num_layers
    spec = layer_spec(reader, layer, "none", "deit")
    splits = [TokenSplit(reader, s, layer, preload=True, workers=0) for s in ("train", "val", "test")]
    cfg = TokenGridSettings("deit", [1e-4], [0], len(reader.class_names), "accuracy", False, epochs, batch, 1e-5,
                     {"warmup_iters": 0}, "constant", 1.0, depth, 0, None)  # fmt: skip
    return train_token_grid(spec, *splits, cfg, torch.device("cpu"), None).train_seconds / epochs


def bare_epoch(reader, depth: int, batch: int, epochs: int = 1) -> float:
    """Seconds per epoch of the limit: a bare torch loop of the same head on the same in-RAM token tensor.

    What (a) does per step, written out with nothing else: the seed-0 init, AdamW over the same groups, the seeded
    ``randperm`` order with the last partial batch dropped, prefix tokens dropped, fp16 → fp32, cross-entropy, clipping at 1.0, the step.
    """
    import torch
    import torch.nn.functional as F

    from fmcache.frozen.heads import DeiTHead
    from fmcache.frozen.tokens import TokenSplit, layer_spec
    from fmcache.training import ADAM_BETAS, ADAM_EPS, adamw_param_groups

    layer = reader.num_layers
    spec = layer_spec(reader, layer, "none", "deit")
    train = TokenSplit(reader, "train", layer, preload=True, workers=0)
    x, y = train.x, torch.as_tensor(train.labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = DeiTHead(spec.dim, len(reader.class_names), depth, spec.grid)
    opt = torch.optim.AdamW(adamw_param_groups(head.named_parameters(), 1e-5), lr=1e-4, betas=ADAM_BETAS,
                            eps=ADAM_EPS, foreach=True)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    keep = len(x) // batch
    head.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch)[:keep]:
            loss = F.cross_entropy(head(x[idx][:, spec.prefix :].float()), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
    return (time.perf_counter() - t0) / epochs


def seed_epoch(root: Path, model, size: int, depth: int, batch: int, train_rows: np.ndarray, repeats: int) -> float:
    """Best-of seconds for one epoch of the seed's loop: decode → frozen foundation → head forward/backward/step."""
    import torch

    from fmcache.data import ImageDataset, build_transform, load_dataset
    from fmcache.frozen.heads import DeiTHead, token_grid
    from fmcache.training import adamw_param_groups

    index = load_dataset("imagefolder", root)
    transform, _ = build_transform(size, mean=(0.5,) * 3, std=(0.5,) * 3)
    dataset = ImageDataset(index, train_rows, transform)
    labels = torch.as_tensor(np.asarray(index.labels)[train_rows])
    best = float("inf")
    for _ in range(repeats):
        torch.manual_seed(0)
        with torch.no_grad():
            probe = model(dataset[0][0][None])
        prefix = probe.num_prefix_tokens
        grid = token_grid(probe.tokens[-1].shape[1] - prefix)
        head = DeiTHead(probe.tokens[-1].shape[-1], int(labels.max()) + 1, depth, grid)
        opt = torch.optim.AdamW(adamw_param_groups(head.named_parameters(), 1e-5), lr=1e-4, foreach=True)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        for idx in order.split(batch):
            images = torch.stack([dataset[int(i)][0] for i in idx])  # the seed decodes every image every step
            with torch.no_grad():
                tokens = model(images).tokens[-1][:, prefix:]
            loss = torch.nn.functional.cross_entropy(head(tokens), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
        best = min(best, time.perf_counter() - t0)
    return best


def read_throughput(reader, preload: bool, workers: int, batch: int, repeats: int, samples: int = 4096) -> float:
    """Samples/s of reading train token maps in shuffled batches, ``samples`` reads in one stream (best of repeats).

    One stream of several shuffled passes, so DataLoader worker start-up is paid once, as in an epoch of a real
    dataset, not once per pass over this benchmark's few images.
    """
    import torch

    from fmcache.frozen.tokens import TokenSplit

    layer = reader.num_layers
    split = TokenSplit(reader, "train", layer, preload=preload, workers=workers)
    passes = -(-samples // split.n)
    best = 0.0
    for r in range(repeats):
        gen = torch.Generator().manual_seed(r)
        order = torch.cat([torch.randperm(split.n, generator=gen) for _ in range(passes)])
        t0 = time.perf_counter()
        for xb in split.batches(list(order.split(batch))):
            xb.float()
        best = max(best, len(order) / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=80, help="images (80 %% train)")
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument(
        "--depth", type=int, default=4, help="blocks of the ViT-B foundation and the DeiT head (ViT-L: 2x)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timing of (a) and (c)")
    parser.add_argument("--epochs-grid", type=int, default=100, help="E of the paper's 4 LR × 5 seed × E grid")
    parser.add_argument("--foundations", default="vitb,vitl", help=f"comma-separated: {', '.join(FOUNDATIONS)}")
    args = parser.parse_args()
    chosen = [f.strip() for f in args.foundations.split(",") if f.strip()]
    if not chosen or set(chosen) - set(FOUNDATIONS):
        parser.error(f"--foundations: choose from {', '.join(FOUNDATIONS)}")

    import torch

    from fmcache.cache.reader import CacheReader
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from fmcache.models import create_foundation

    torch.manual_seed(0)
    print(f"setup: DeiT-B head depth {args.depth}, {args.size} px, batch {args.batch}, CPU threads "
          f"{torch.get_num_threads()}, (a)/(c)/(b) interleaved, {args.repeats} tries")  # fmt: skip
    heads, e = 4 * 5, args.epochs_grid
    with tempfile.TemporaryDirectory() as tmp:
        root = write_images(Path(tmp) / "imgs", args.n)
        for key in chosen:
            title, model_name, scale = FOUNDATIONS[key]
            overrides = {"depth": args.depth * scale}
            spec = ExtractSpec(
                dataset="imagefolder", data_root=root, model=model_name, random_init=True, img_size=args.size,
                norm="model", batch_size=args.batch, workers=0, shard_size=1024, cache_root=Path(tmp) / "cache",
                tokens="last", arch_overrides=overrides,
            )  # fmt: skip
            t0 = time.perf_counter()
            folder = run_extract(spec, progress=False, log=lambda m: None)
            extract_s = time.perf_counter() - t0
            reader = CacheReader(folder)
            train_rows = reader.ids("train")
            model = create_foundation(model_name, random_init=True, img_size=args.size, arch_overrides=overrides)
            model.eval()

            # interleaved, so a burst of load on a shared machine hits every side alike: the times are the best of
            # all tries, the ratios the median of the tries' own ratios (a burst during one try moves neither)
            tries = []
            for _ in range(args.repeats):
                tries.append((cached_epoch(reader, args.depth, args.batch, args.epochs),
                              bare_epoch(reader, args.depth, args.batch, args.epochs),
                              seed_epoch(root, model, args.size, args.depth, args.batch, train_rows, 1)))  # fmt: skip
            a, c, b = (min(t[i] for t in tries) for i in range(3))
            p8 = float(np.median([t[1] / t[0] for t in tries]))
            p4 = float(np.median([t[2] / t[0] for t in tries]))
            n_train = len(train_rows)
            seed_grid, ours_grid = heads * e * b, extract_s + heads * e * a
            print(f"{title} ({model_name}, {overrides['depth']} blocks), {n_train} train images:")
            print(f"  (a) one epoch, DeiT head from cached tokens: {a:.2f} s ({n_train / a:.1f} samples/s)")
            print(f"  (c) one epoch, bare torch loop of the same head on the same in-RAM tokens: {c:.2f} s")
            print(f"  (b) one epoch, seed's loop (decode + foundation + head): {b:.2f} s")
            print(f"  P8 throughput (a) vs the limit (c): {p8:.2f}x (goal >= 0.9; median of {len(tries)} paired tries)")
            print(f"  P4 per epoch vs the seed: (b)/(a) = {p4:.2f}x (median of the paired tries)")
            print(f"  paper grid 4 LR x 5 seeds x {e} epochs: seed {seed_grid:.0f} s vs fmcache {ours_grid:.0f} s "
                  f"(extraction {extract_s:.1f} s once) = {seed_grid / ours_grid:.2f}x")  # fmt: skip
            if key == chosen[0]:
                ram = read_throughput(reader, True, 0, args.batch, args.repeats)
                h5 = read_throughput(reader, False, 0, args.batch, args.repeats)
                h5w = read_throughput(reader, False, 2, args.batch, args.repeats)
                print(f"  token reads: RAM {ram:.0f} samples/s, HDF5 streamed {h5:.0f} samples/s (0 workers), "
                      f"{h5w:.0f} samples/s (2 workers); head training consumes {n_train / a:.0f} samples/s")  # fmt: skip


if __name__ == "__main__":
    main()
