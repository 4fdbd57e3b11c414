"""`fmcache cka` speed and memory: 12 × 12 layer pairs, d = 768, from a cache.

- Speed: the exact one-pass feature-space estimator (debiased) over n = 10,000 against a pair-by-pair loop that
  computes each pair from scratch the way torch_cka and the seed's feature-reuse code do: both n × n grams, then
  unbiased HSIC of (K, L), (K, K) and (L, L). The loop costs the same for every pair (same n and d), so on a small CPU
  it is timed on ``--pairs`` of the 144 pairs and scaled to all of them (``--pairs 144`` runs them all). Prints the
  ratio and the largest absolute difference over the pairs the loop computed. Goal: ≥ 10× and ≤ 1e-6.
- Memory: peak RSS of the exact estimator at n = 10k vs 40k, each in a fresh process. Goal: within 10 %.

The caches are synthetic (random features with layer-to-layer structure, fp16, 1024 samples per shard) and are written
with the cache's own shard writer, so no model runs. Absolute times on a shared CPU are noise; the ratio is the result.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmcache.cache.reader import CacheReader  # noqa: E402
from fmcache.cache.shards import ShardWriter  # noqa: E402
from fmcache.files import atomic_write_json  # noqa: E402
from fmcache.frozen.cka import compute_cka  # noqa: E402
from fmcache.frozen.cka_read import select  # noqa: E402

LAYERS, DIM, SHARD = 12, 768, 1024


def write_cache(folder: Path, n: int, seed: int = 0) -> Path:
    """A complete synthetic cache: n test samples, ``pooled/cls`` (n, 12, 768) fp16, each layer a noisy copy of the last."""
    folder.mkdir(parents=True, exist_ok=True)
    key = f"{n:064d}"
    rng = np.random.default_rng(seed)
    mixing = [rng.normal(size=(DIM, DIM)).astype(np.float32) / np.sqrt(DIM) for _ in range(LAYERS)]
    entries = []
    for index, lo in enumerate(range(0, n, SHARD)):
        rows = min(SHARD, n - lo)
        x = rng.normal(size=(rows, DIM)).astype(np.float32)
        layers = []
        for m in mixing:  # deeper layers drift away from the first, so CKA falls off the diagonal
            x = 0.8 * x + 0.6 * np.tanh(x @ m) + 0.1 * rng.normal(size=x.shape).astype(np.float32)
            layers.append(x)
        writer = ShardWriter(folder, index, rows, {"key": key, "schema": 1, "shard": index}, None)
        writer.append({
            "ids": np.arange(lo, lo + rows, dtype=np.int64), "split": np.full(rows, 2, np.int8),
            "labels": np.zeros(rows, np.int64), "pooled/cls": np.stack(layers, axis=1).astype(np.float16),
        })  # fmt: skip
        entries.append({**writer.commit({}), "index": index, "seconds": 0.0})
    manifest = {
        "schema": 1, "key": key, "status": "complete", "num_shards": len(entries), "shards": entries, "dtype": "fp16",
        "model": {"name": "synthetic", "num_layers": LAYERS, "layer_dims": [DIM] * LAYERS, "pools": ["cls"],
                  "token_layers": [], "pooled_kind": "cls"},
        "dataset": {"name": "synthetic", "fingerprint": "synthetic", "class_names": ["a"], "multilabel": False,
                    "metric": "accuracy"},
    }  # fmt: skip
    atomic_write_json(folder / "manifest.json", manifest)
    return folder


def worker(cache: Path, matrix_out: Path | None) -> None:
    """One exact run in this process; prints seconds and peak RSS as JSON."""
    import torch

    start = time.perf_counter()
    result = compute_cka(
        select(CacheReader(cache), "all", "cls"), None, "test", "exact", True, device=torch.device("cpu")
    )
    seconds = time.perf_counter() - start
    if matrix_out is not None:
        np.save(matrix_out, result["matrix"])
    print(json.dumps({"n": result["n"], "seconds": seconds, "peak_rss_mb": peak_rss_mb(), **result["timings"]}))


def peak_rss_mb() -> float:
    """This process's own peak RSS. getrusage's ru_maxrss survives exec, so a worker forked from a parent holding
    gigabytes would report the parent's size; /proc's VmHWM belongs to this process's address space only."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_worker(cache: Path, matrix_out: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(cache)] + (["--matrix", str(matrix_out)] if matrix_out else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def pair_from_scratch(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA of one pair the way per-pair code does it: grams, zeroed diagonals, three unbiased HSICs."""
    import torch

    n = len(x)

    def hsic(k: torch.Tensor, m: torch.Tensor) -> float:
        trace = (k * m).sum()
        value = trace + k.sum() * m.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k.sum(0) @ m.sum(0))
        return float(value / (n * (n - 3)))

    grams = []
    for f in (x, y):
        t = torch.as_tensor(f, dtype=torch.float64)
        t = t - t.mean(0)  # centring, as the per-pair implementations do
        g = t @ t.T
        g.fill_diagonal_(0.0)
        grams.append(g)
    k, m = grams
    return hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=40_000, help="n of the second RSS run")
    parser.add_argument("--pairs", type=int, default=4, help="pairs the from-scratch loop computes (of 144)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--rss-only", action="store_true", help="skip the pair-by-pair loop")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--matrix", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.matrix)
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        small, big = write_cache(tmp / "small", args.n), write_cache(tmp / "big", args.big, seed=1)
        print(f"synthetic caches written in {time.perf_counter() - t0:.0f} s (n={args.n} and n={args.big})")

        exact = run_worker(small, tmp / "matrix.npy")
        matrix = np.load(tmp / "matrix.npy")
        print(f"exact, one pass: {exact['seconds']:.1f} s for 144 pairs (read {exact['read_seconds']:.1f} s)")

        if args.rss_only:
            report_rss(big, exact, args)
            return
        reader = CacheReader(small)
        features = [reader.pooled("test", n, "cls").astype(np.float64) for n in range(1, LAYERS + 1)]
        pairs = [(i, j) for i in range(LAYERS) for j in range(LAYERS)]
        # spread over the matrix and off the diagonal where possible (the diagonal is 1 by construction)
        spread = np.linspace(1, len(pairs) - 2, min(args.pairs, len(pairs))).round().astype(int)
        chosen = [pairs[k] for k in spread]
        start = time.perf_counter()
        diffs = [abs(pair_from_scratch(features[i], features[j]) - matrix[i, j]) for i, j in chosen]
        per_pair = (time.perf_counter() - start) / len(chosen)
        loop = per_pair * len(pairs)
        print(f"pair by pair: {per_pair:.1f} s per pair, {loop:.0f} s for 144 pairs (timed on {len(chosen)} pairs)")
        print(f"ratio: {loop / exact['seconds']:.1f}x (goal >= 10x)")
        print(f"max abs difference: {max(diffs):.2e} over {len(chosen)} pairs (goal <= 1e-6)")

        report_rss(big, exact, args)


def report_rss(big: Path, exact: dict, args: argparse.Namespace) -> None:
    large = run_worker(big)
    change = 100 * (large["peak_rss_mb"] - exact["peak_rss_mb"]) / exact["peak_rss_mb"]
    print(
        f"peak RSS: {exact['peak_rss_mb']:.0f} MB at n={args.n} vs {large['peak_rss_mb']:.0f} MB at n={args.big} "
        f"({change:+.1f} %, goal within 10 %); exact at n={args.big}: {large['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
