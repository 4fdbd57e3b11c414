"""Paper scale by simulation: synthetic caches with the paper's true shapes, and stage two run on them as a user would.

The caches are written through the real writer code (``ShardWriter`` with its chunk layout, fletcher32 checksums and
fp16, ``shard_entries``/``write_manifest``, a complete manifest with model and dataset info) with random features, so
no model runs. Every stage-two command then runs through the CLI in its own process (``fmcache knn``, ``probe``,
``cka``, ``verify``, ``info``), measured from outside: wall time, peak RSS (of the process tree, polled, and the
kernel's own high-water mark) and bytes read (``/proc/<pid>/io``: ``rchar`` all reads, ``read_bytes`` from storage).
The page cache of the cache's files is dropped before each command (``posix_fadvise``), so reads are cold.

Sections (``--only``, comma-separated):

- ``disk``: bytes per image of each (model, pooled, tokens) choice of the paper's models, computed from shapes, and
  what the decapitation study (the tokens of every block) costs on each dataset.
- ``layout``: token read rate (samples/s, GB/s; page cache warm and cold) of whole-sample chunks vs chunks of several
  samples, for a ViT-B and a ViT-L layer, read item by item in a shuffled order (as token heads read) and whole.
- ``scale``: for each n of ``--n-list``, a cache of the chosen model and pools, then every command; a table and the
  growth exponent of each command (log-log slope over the two largest n: ~1 linear, ~2 quadratic).
- ``limits``: at the largest n, k-NN against a bare FAISS ``IndexFlatIP`` search of the same in-RAM float32 arrays
  (same k = 200), and the linear grid against a bare torch loop training the same 20 heads (4 LRs × 5 seeds, AdamW,
  per-head clipping) on in-RAM tensors for the same epochs and batch size. Goal: ≤ 1.2× each.
- ``layers``: one-layer commands (knn, probe) on caches of the same n with few and with many layers: their RSS must
  follow the layer's size, not the cache's.
- ``before``: a cache in the old layout ((256, L, D) chunks) at the largest n, read by this code and, with
  ``--old-src DIR``, by an older source tree of fmcache (the before of this layout).
- ``tokens``: a token cache of ``--tokens-n`` samples: the rate at which ``TokenDataset`` feeds shuffled batches
  through a DataLoader (0 and 2 workers, warm and cold; item by item as token heads read today, and whole batches
  through ``TokenDataset.batch``), and ``fmcache probe --head deit`` (random init, one epoch,
  one head, ``--head-depth``) on a small token cache for what one head pass consumes on this machine.

``--quick`` runs a small version of everything (n up to 20k, ViT-B shapes) in a few minutes. Results go to ``--out``
as ``bench_scale.json`` and ``bench_scale.png`` (growth curves); caches live under ``--workdir`` and are deleted
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmcache.cache import shards  # noqa: E402
from fmcache.cache.key import SCHEMA_VERSION, canonical_json  # noqa: E402
from fmcache.cache.manifest import shard_entries, write_manifest  # noqa: E402
from fmcache.cache.shards import ShardWriter  # noqa: E402

# the CLI of this source tree (``python -m fmcache``, PYTHONPATH set in ``measure``), whatever is installed
FMCACHE = sys.executable, "-m", "fmcache"
GB = 1e9
MIB = 1 << 20

# -- the paper's shapes ---------------------------------------------------------------------------------------------

# Synthetic cache models: registry name, timm arch, blocks, width, tokens per layer (prefix included) at 224 px.
MODELS = {
    "vit_s": {"name": "dinov2_vits14", "arch": "vit_small_patch14_dinov2.lvd142m", "layers": 12, "dim": 384},
    "vit_b": {"name": "dinov2_vitb14", "arch": "vit_base_patch14_dinov2.lvd142m", "layers": 12, "dim": 768},
    "vit_l": {"name": "dinov2_vitl14", "arch": "vit_large_patch14_dinov2.lvd142m", "layers": 24, "dim": 1024},
    "vit_g": {"name": "dinov2_vitg14", "arch": "vit_giant_patch14_dinov2.lvd142m", "layers": 40, "dim": 1536},
}
DINOV2_TOKENS = 1 + (224 // 14) ** 2  # CLS + 16 × 16 patches; the DINOv2 paper release has no registers

DATASETS = {  # official image counts; the split rule of each loader (CheXpert: the seed's contiguous hold-out)
    "aptos2019": (3662, ["No DR", "Mild", "Moderate", "Severe", "Proliferative DR"], False, "qwk"),
    "cbis_ddsm": (10239, ["benign", "malignant"], False, "auc"),
    "isic2019": (25331, ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"], False, "macro_recall"),
    "chexpert": (
        224316,
        ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
         "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
         "Fracture", "Support Devices"],
        True,
        "mean_auc",
    ),
}  # fmt: skip


def _vit(layers: int, dim: int, tokens: int, cls: bool = True) -> dict:
    return {"dims": [dim] * layers, "tokens": [tokens] * layers, "cls": cls, "paper": dim}


# Disk table: every layer's width and token count as fmcache caches them (stages for CNNs and Hiera).
DISK_MODELS = {
    "DINOv2 ViT-S/14 @224": _vit(12, 384, DINOV2_TOKENS),
    "DINOv2 ViT-B/14 @224": _vit(12, 768, DINOV2_TOKENS),
    "DINOv2 ViT-L/14 @224": _vit(24, 1024, DINOV2_TOKENS),
    "DINOv2 ViT-g/14 @224": _vit(40, 1536, DINOV2_TOKENS),
    "SAM ViT-B @1024": _vit(12, 768, 64 * 64, cls=False),
    "SAM ViT-L @1024": _vit(24, 1024, 64 * 64, cls=False),
    "SAM ViT-H @1024": _vit(32, 1280, 64 * 64, cls=False),
    "SAM ViT-H @224 (fmcache default)": _vit(32, 1280, 14 * 14, cls=False),
    "MAE ViT-B/16 @224": _vit(12, 768, 197),
    "MAE ViT-L/16 @224": _vit(24, 1024, 197),
    "MAE ViT-H/14 @224": _vit(32, 1280, 257),
    "CLIP/BLIP/DINO ViT-B/16 @224": _vit(12, 768, 197),
    "ResNet-50/152 @224 (stem + 4 stages)": {
        "dims": [64, 256, 512, 1024, 2048], "tokens": [112**2, 56**2, 28**2, 14**2, 7**2], "cls": False, "paper": 2048,
    },
    "SAM2 Hiera-L @224 (4 stages)": {
        "dims": [144, 288, 576, 1152], "tokens": [56**2, 28**2, 14**2, 7**2], "cls": False, "paper": 256,
    },
}  # fmt: skip


def disk_table(itemsize: int = 2) -> dict:
    """Bytes per image of each choice, and the decapitation study's total per dataset (fp16 unless ``itemsize``)."""
    rows = []
    for label, m in DISK_MODELS.items():
        width, layers = max(m["dims"]), len(m["dims"])
        kinds = 2 if m["cls"] else 1  # cls + mean, or mean only; zero-padded to the widest stage
        pooled = (kinds * layers * width + m["paper"]) * itemsize
        last = m["tokens"][-1] * m["dims"][-1] * itemsize
        every = sum(t * d for t, d in zip(m["tokens"], m["dims"], strict=True)) * itemsize
        per_dataset = {name: every * n for name, (n, *_rest) in DATASETS.items()}
        rows.append({"model": label, "layers": layers, "pooled_per_image": pooled, "last_tokens_per_image": last,
                     "every_block_tokens_per_image": every, "decapitation_bytes": per_dataset})  # fmt: skip
    return {"dtype_bytes": itemsize, "rows": rows}


def print_disk(table: dict) -> None:
    names = list(DATASETS)
    print("\nDisk per image (fp16; pooled = cls+mean of every layer + the paper feature) and the decapitation study")
    print(f"{'model':38s} {'pooled':>9s} {'last tok':>9s} {'all tok':>9s}  " + "  ".join(f"{n:>10s}" for n in names))
    for r in table["rows"]:
        cells = "  ".join(f"{_human(r['decapitation_bytes'][n]):>10s}" for n in names)
        print(f"{r['model']:38s} {_human(r['pooled_per_image']):>9s} {_human(r['last_tokens_per_image']):>9s} "
              f"{_human(r['every_block_tokens_per_image']):>9s}  {cells}")  # fmt: skip


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


# -- synthetic caches through the real writer -----------------------------------------------------------------------


def old_chunk_shape(name: str, sample_shape: tuple[int, ...], itemsize: int, planned: int) -> tuple[int, ...]:
    """The layout before per-layer chunks: (256, L, D) pooled stacks (for the before/after comparison)."""
    rows = 1 if len(sample_shape) >= 2 and "tokens/" in name else min(planned, 256)
    if name.startswith("views/") and sample_shape:
        rows = max(1, rows // sample_shape[0])
    return (max(rows, 1), *sample_shape)


def split_codes(dataset: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """0 train, 1 val, 2 test: CheXpert's seed split holds out the first int(0.2 n) + 15 rows (val, then test);
    the others shuffle (70/15/15), so a split's rows are scattered over every shard."""
    if dataset == "chexpert":
        codes = np.zeros(n, np.int8)
        hold = int(0.2 * n) + 15
        codes[: hold // 2], codes[hold // 2 : hold] = 1, 2
        return codes
    codes = np.zeros(n, np.int8)
    order = rng.permutation(n)
    codes[order[: int(0.15 * n)]], codes[order[int(0.15 * n) : int(0.3 * n)]] = 1, 2
    return codes


def labels_for(dataset: str, n: int, rng: np.random.Generator) -> np.ndarray:
    _, classes, multilabel, _ = DATASETS[dataset]
    if not multilabel:
        return rng.integers(0, len(classes), n).astype(np.int64)
    draw = rng.random((n, len(classes)))  # CheXpert-like: blank (NaN) 40 %, positive 20 %, negative 40 %
    return np.where(draw < 0.4, np.nan, (draw < 0.6).astype(np.float32)).astype(np.float32)


def write_cache(
    folder: Path, n: int, model: str, dataset: str, pools: list[str], layers: int | None = None,
    token_layers: tuple[int, ...] = (), shard_size: int = 1024, batch: int = 64, layout: str = "new", seed: int = 0,
) -> dict:  # fmt: skip
    """A complete synthetic cache at ``folder`` (fresh), written batch by batch as ``fmcache extract`` writes."""
    spec = MODELS[model]
    num_layers, dim = layers or spec["layers"], spec["dim"]
    _, classes, multilabel, metric = DATASETS[dataset]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    codes, labels = split_codes(dataset, n, rng), labels_for(dataset, n, rng)
    model_info = {
        "name": spec["name"], "backend": "timm", "arch": spec["arch"], "pooled_kind": "cls", "num_layers": num_layers,
        "layer_dims": [dim] * num_layers, "num_prefix_tokens": 1, "paper_dim": dim, "pools": pools,
        "token_layers": list(token_layers), "token_shapes": {str(t): [DINOV2_TOKENS, dim] for t in token_layers},
        "img_size": 224, "final_norm": {"kind": "layernorm", "dim": dim, "eps": 1e-6, "weight": [1.0] * dim,
                                        "bias": [0.0] * dim},
    }  # fmt: skip
    inputs = {
        "synthetic": "benchmarks/bench_scale.py: random features through the real writer",
        "model": {"name": spec["name"], "layers": num_layers, "pools": pools, "tokens": list(token_layers)},
        "transform": {"steps": ["synthetic"], "mean": None, "std": None, "norm_source": "synthetic"},
        "dtype": "fp16", "shard_size": shard_size, "layout": layout,
        "dataset": {"name": dataset, "n": n, "seed": seed, "fingerprint": f"synthetic-{dataset}-{n}-{seed}"},
    }  # fmt: skip
    key = hashlib.sha256(canonical_json({"schema": SCHEMA_VERSION, **inputs}).encode()).hexdigest()
    base = {
        "schema": SCHEMA_VERSION, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "inputs": inputs,
        "model": model_info, "weights": {"source": "random", "id": "synthetic random features"},
        "dataset": {"name": dataset, "root": "(synthetic)", "fingerprint": inputs["dataset"]["fingerprint"],
                    "class_names": classes, "multilabel": multilabel, "metric": metric,
                    "split_counts": {s: int((codes == c).sum()) for c, s in enumerate(("train", "val", "test"))},
                    "problems": []},
        "shard_size": shard_size, "dtype": "fp16", "versions": {"synthetic": True},
    }  # fmt: skip
    # A bank of random rows drawn once; each sample picks rows of it (generation at memcpy speed, not the RNG's).
    bank_rows = 2048
    bank = rng.standard_normal((bank_rows, num_layers, dim), dtype=np.float32).astype(np.float16)
    token_bank = (
        rng.standard_normal((64, DINOV2_TOKENS, dim), dtype=np.float32).astype(np.float16) if token_layers else None
    )
    planned = -(-n // shard_size)
    known: dict[str, dict] = {}
    start, write_seconds = time.perf_counter(), 0.0
    saved = shards.chunk_shape
    shards.chunk_shape = old_chunk_shape if layout == "old" else saved
    try:
        for index in range(planned):
            lo, hi = index * shard_size, min(n, (index + 1) * shard_size)
            writer = ShardWriter(folder, index, hi - lo, {"key": key, "schema": SCHEMA_VERSION, "shard": index}, None)
            for b in range(lo, hi, batch):
                e = min(hi, b + batch)
                pick = rng.integers(0, bank_rows, e - b)
                arrays = {"ids": np.arange(b, e, dtype=np.int64), "split": codes[b:e], "labels": labels[b:e]}
                for pool in pools:
                    arrays[f"pooled/{pool}"] = bank[pick, -1] if pool == "paper" else bank[pick]
                for t in token_layers:
                    arrays[f"tokens/layer_{t:02d}"] = token_bank[rng.integers(0, len(token_bank), e - b)]
                t0 = time.perf_counter()
                writer.append(arrays)
                write_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            entry = writer.commit({"skipped": []})
            write_seconds += time.perf_counter() - t0
            known[entry["file"]] = {**entry, "seconds": 0.0}
        write_manifest(folder, base, shard_entries(folder, key, known), planned)
    finally:
        shards.chunk_shape = saved
    size = sum(p.stat().st_size for p in folder.glob("shard-*.h5"))
    return {"path": str(folder), "n": n, "model": model, "layers": num_layers, "dim": dim, "pools": pools,
            "token_layers": list(token_layers), "layout": layout, "bytes": size, "shards": planned,
            "write_seconds": round(write_seconds, 2), "total_seconds": round(time.perf_counter() - start, 2),
            "write_mb_s": round(size / MIB / max(write_seconds, 1e-9), 1)}  # fmt: skip


# -- measuring one command from outside -----------------------------------------------------------------------------


def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files' pages from the page cache (clean pages; no root needed), so the next read is cold."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(
    cmd: list[str], cold: list[Path] | None = None, src: Path = REPO, env: dict | None = None, timeout: float = 3600
) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (process tree polled every 50 ms, and the kernel's ru_maxrss of the
    largest process), bytes read (rchar: every read(); read_bytes: from storage) summed over the tree."""
    import psutil

    if cold:
        drop_page_cache(cold)
    start = time.perf_counter()
    path = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    load = os.getloadavg()[0]  # this machine is shared: a busy core slows 2-thread BLAS/OpenMP far more than 2x
    # run from the source tree: ``python -m`` puts the working directory first on sys.path
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=src)
    root = psutil.Process(proc.pid)
    peak, io_seen, status = 0, {}, None
    import threading

    out_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while status is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        rss = 0
        for p in tree:
            try:
                rss += p.memory_info().rss
                io = p.io_counters()
                io_seen[p.pid] = (io.read_chars, io.read_bytes)
            except psutil.Error:
                pass
        peak = max(peak, rss)
        pid, status_raw, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            status = status_raw
            break
        if time.perf_counter() - start > timeout:
            proc.kill()
        time.sleep(0.05)
    wall = time.perf_counter() - start
    reader.join(timeout=10)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = b"".join(out_chunks).decode(errors="replace")
    return {
        "cmd": " ".join(cmd[2:] if cmd[:2] == list(FMCACHE[:2]) else cmd),
        "rc": proc.returncode,
        "wall_s": round(wall, 2),
        # CPU seconds of the command and the children it waited for: on a shared machine, far steadier than wall
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(max(peak, usage.ru_maxrss * 1024) / MIB, 1),  # ru_maxrss: KiB on Linux
        "tree_rss_mb": round(peak / MIB, 1),
        "rchar_mb": round(sum(r for r, _ in io_seen.values()) / MIB, 1),
        "read_bytes_mb": round(max(sum(b for _, b in io_seen.values()), usage.ru_inblock * 512) / MIB, 1),
        "load_before": round(load, 2),
        "tail": text[-600:],
    }


def result_json(folder: Path) -> dict:
    found = sorted(folder.rglob("result.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else {}


def worker(kind: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *args]


# -- the stage-two commands -----------------------------------------------------------------------------------------

LRS = "1e-5,3e-5,1e-4,1e-3"


def stage_two(cache: Path, out: Path, epochs: int, seeds: int, cka: bool = True) -> dict:
    """Every command on one cache (cold page cache each); returns name → measurement."""
    files = sorted(cache.glob("shard-*.h5"))
    runs = {
        "knn": [*FMCACHE, "knn", str(cache), "--layer", "last", "--cpu", "--out", str(out / "knn")],
        "probe": [*FMCACHE, "probe", str(cache), "--head", "linear", "--layer", "last", "--lrs", LRS,
                  "--seeds", str(seeds), "--epochs", str(epochs), "--device", "cpu", "--out", str(out / "probe")],
        "cka": [*FMCACHE, "cka", str(cache), "--layers", "all", "--split", "test", "--out", str(out / "cka")],
        "verify": [*FMCACHE, "verify", str(cache)],
        "info": [*FMCACHE, "info", str(cache)],
    }  # fmt: skip
    if not cka:
        del runs["cka"]
    results = {}
    for name, cmd in runs.items():
        m = measure(cmd, cold=files)
        if m["rc"] != 0:
            print(f"  {name} FAILED (rc {m['rc']}): {m['tail']}")
        m["argv"] = cmd
        if name in ("knn", "probe", "cka"):
            m.update(_result_timings(name, out / name))
        results[name] = m
        print(f"  {name:7s} {m['wall_s']:8.1f} s  {m['peak_rss_mb']:8.0f} MB  read {m['rchar_mb']:8.0f} MB "
              f"(storage {m['read_bytes_mb']:.0f} MB)", flush=True)  # fmt: skip
    return results


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Log-log slope between the two largest x (None when a value is not positive)."""
    if len(xs) < 2 or min(ys[-2:]) <= 0:
        return None
    return math.log(ys[-1] / ys[-2]) / math.log(xs[-1] / xs[-2])


def growth_word(s: float | None) -> str:
    if s is None:
        return "-"
    return "sub-linear" if s < 0.85 else "linear" if s < 1.2 else "n log n" if s < 1.5 else "n^2" if s < 2.4 else "n^3"


def print_scale(sizes: list[int], per_n: dict) -> dict:
    names = list(next(iter(per_n.values()))["commands"])
    print("\nScale: wall s / CPU s | peak RSS MB | MB read (rchar)")
    print(f"{'command':8s} " + " ".join(f"{'n=' + str(n):>32s}" for n in sizes) + "   slope (CPU, RSS, read)")
    slopes = {}
    for name in names:
        runs = [per_n[n]["commands"][name] for n in sizes]
        cells = [f"{m['wall_s']:6.1f}/{m['cpu_s']:6.1f} |{m['peak_rss_mb']:6.0f} |{m['rchar_mb']:6.0f}" for m in runs]
        s = {key: slope(sizes, [m[field] for m in runs])
             for key, field in (("cpu", "cpu_s"), ("wall", "wall_s"), ("rss", "peak_rss_mb"), ("read", "rchar_mb"))}  # fmt: skip
        slopes[name] = {**s, "growth": growth_word(s["cpu"])}
        text = ", ".join("-" if s[k] is None else f"{s[k]:.2f}" for k in ("cpu", "rss", "read"))
        print(f"{name:8s} " + " ".join(f"{c:>32s}" for c in cells) + f"   {text} ({growth_word(s['cpu'])})")
    return slopes


def plot(sizes: list[int], per_n: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(per_n.values()))["commands"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, ax, label in (("cpu_s", axes[0], "CPU s (1 thread: about the wall time)"),
                           ("peak_rss_mb", axes[1], "peak RSS MB"), ("rchar_mb", axes[2], "MB read")):  # fmt: skip
        for name in names:
            ax.loglog(sizes, [max(per_n[n]["commands"][name][key], 1e-3) for n in sizes], "o-", label=name)
        ax.set_xlabel("n (images in the cache)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(4096, color="red", ls="--", lw=1, label="4 GiB target")
    cache_mb = [per_n[n]["cache"]["bytes"] / MIB for n in sizes]
    axes[2].loglog(sizes, cache_mb, "k--", lw=1, label="cache size")
    axes[2].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    first = per_n[sizes[0]]["cache"]
    fig.suptitle(f"fmcache stage two vs n: {first['model']} shapes ({first['layers']} layers × {first['dim']}), "
                 f"pools {','.join(first['pools'])}, fp16, cold page cache, {os.cpu_count()} cores, "
                 f"{os.environ.get('OMP_NUM_THREADS', 'default')} thread(s)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- workers (run in their own process, measured like the commands) -------------------------------------------------


def _pooled_splits(cache: Path) -> tuple:
    from fmcache.cache.reader import CacheReader

    reader = CacheReader(cache)
    data = {s: (reader.pooled(s, "last", "cls"), reader.labels(s)) for s in ("train", "val", "test")}
    return reader, data


def worker_knn(cache: Path, k: int = 200) -> dict:
    """The limit of k-NN: FAISS IndexFlatIP over the same float32 arrays in RAM, normalised in place, k = 200."""
    import faiss

    _, data = _pooled_splits(cache)
    start, cpu = time.perf_counter(), time.process_time()
    bank = data["train"][0]
    bank /= np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    for split in ("val", "test"):
        q = data[split][0]
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        index.search(q, k)
    return {"search_seconds": time.perf_counter() - start, "search_cpu_s": time.process_time() - cpu, "bank": len(bank)}


def worker_linear(cache: Path, epochs: int, seeds: int, batch: int, lrs: list[float]) -> dict:
    """The limit of the linear grid: a plain torch loop of the same 20 heads (nn.Linear init per seed, each seed's
    randperm order, AdamW with decay on weights only, per-head clip at 1.0) on z-scored in-RAM tensors."""
    import torch
    import torch.nn.functional as F

    reader, data = _pooled_splits(cache)
    x_train = data["train"][0]
    mean, std = x_train.mean(0, dtype=np.float64), x_train.std(0, dtype=np.float64)
    std[std < 1e-12] = 1.0
    for x, _ in data.values():  # z-scored in place: no float64 copies of the splits
        x -= mean
        x /= std
    xs = {s: torch.from_numpy(x) for s, (x, _) in data.items()}
    ys = {s: torch.from_numpy(y) for s, (_, y) in data.items()}
    multilabel, classes = reader.multilabel, len(reader.class_names)
    n, dim = xs["train"].shape
    inits = []
    for s in range(seeds):
        torch.manual_seed(s)
        layer = torch.nn.Linear(dim, classes)
        inits.append((layer.weight.detach().clone(), layer.bias.detach().clone()))
    w0, b0 = torch.stack([w for w, _ in inits]), torch.stack([b for _, b in inits])
    weights = [w0.clone().requires_grad_() for _ in lrs]
    biases = [b0.clone().requires_grad_() for _ in lrs]
    groups = [g for lr, w, b in zip(lrs, weights, biases, strict=True)
              for g in ({"params": [w], "lr": lr}, {"params": [b], "lr": lr, "weight_decay": 0.0})]  # fmt: skip
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-5, foreach=True)
    generators = [torch.Generator().manual_seed(s) for s in range(seeds)]

    def losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not multilabel:
            return F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1), reduction="none").view(seeds, -1).mean(1)
        known = ~torch.isnan(y)
        bce = F.binary_cross_entropy_with_logits(logits, torch.where(known, y, 0.0), reduction="none") * known
        return bce.sum((1, 2)) / known.sum((1, 2)).clamp(min=1)

    train_s = eval_s = train_cpu = eval_cpu = 0.0
    for _ in range(epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        order = torch.stack([torch.randperm(n, generator=g) for g in generators])
        for begin in range(0, n, batch):
            idx = order[:, begin : begin + batch]
            xb, yb = xs["train"][idx], ys["train"][idx]  # (seeds, B, D): one gather serves every LR
            total = sum(losses(torch.baddbmm(b[:, None, :], xb, w.transpose(1, 2)), yb).sum()
                        for w, b in zip(weights, biases, strict=True))  # fmt: skip
            total.backward()
            with torch.no_grad():
                for w, b in zip(weights, biases, strict=True):
                    norm = (w.grad.pow(2).sum((1, 2)) + b.grad.pow(2).sum(1)).sqrt()
                    coef = (1.0 / (norm + 1e-6)).clamp(max=1.0)
                    w.grad.mul_(coef[:, None, None])
                    b.grad.mul_(coef[:, None])
            opt.step()
            opt.zero_grad(set_to_none=True)
        t1, c1 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for split in ("val", "test"):
                for w, b in zip(weights, biases, strict=True):
                    torch.sigmoid(torch.einsum("nd,hcd->hnc", xs[split], w) + b[:, None, :])
        train_s, eval_s = train_s + t1 - t0, eval_s + time.perf_counter() - t1
        train_cpu, eval_cpu = train_cpu + c1 - c0, eval_cpu + time.process_time() - c1
    return {"train_seconds": train_s, "eval_seconds": eval_s, "train_cpu_s": train_cpu, "eval_cpu_s": eval_cpu,
            "n_train": n, "heads": len(lrs) * seeds}  # fmt: skip


def worker_feed(cache: Path, layer: int, workers: int, batch: int, seconds: float, cold: bool, mode: str) -> dict:
    """Samples/s and GB/s at which the reader's TokenDataset feeds shuffled batches through a DataLoader: ``items``
    as token heads read today (a batch sampler, one item each, stacked by the default collate), ``batches`` with
    ``batch_size=None`` over index lists (``TokenDataset.batch``: one array per batch, nothing to stack)."""
    import torch

    from fmcache.cache.reader import CacheReader

    reader = CacheReader(cache)
    if cold:
        drop_page_cache(reader.files)
    dataset = reader.tokens("train", layer)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    lists = [b.tolist() for b in order.split(batch)]
    if mode == "items":
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=lists, num_workers=workers)
    else:
        loader = torch.utils.data.DataLoader(dataset, sampler=lists, batch_size=None, num_workers=workers)
    start, samples, nbytes = time.perf_counter(), 0, 0
    for tokens, _labels, _ids in loader:
        samples += len(tokens)
        nbytes += tokens.numel() * 2  # as stored (fp16)
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"mode": mode, "workers": workers, "cold": cold, "samples": samples, "samples_s": samples / elapsed,
            "gb_s": nbytes / elapsed / GB}  # fmt: skip


def run_worker(args: argparse.Namespace) -> None:
    kind, rest = args.worker[0], args.worker[1:]
    if kind == "knn":
        out = worker_knn(Path(rest[0]))
    elif kind == "linear":
        out = worker_linear(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), [float(v) for v in LRS.split(",")])
    elif kind == "feed":
        out = worker_feed(
            Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), float(rest[4]), rest[5] == "cold", rest[6]
        )
    else:
        raise SystemExit(f"unknown worker {kind}")
    print(json.dumps(out))


def worker_json(m: dict) -> dict:
    lines = [line for line in m["tail"].splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


# -- sections -------------------------------------------------------------------------------------------------------


def section_scale(args: argparse.Namespace, report: dict) -> None:
    sizes = args.n_list
    per_n = {}
    for n in sizes:
        cache = args.workdir / f"scale-{args.model}-{n}"
        print(f"\nn = {n}: writing {args.model} cache ({args.pools})", flush=True)
        info = write_cache(cache, n, args.model, args.dataset, args.pools, args.layers, shard_size=args.shard_size)
        print(f"  {info['bytes'] / GB:.2f} GB in {info['shards']} shards, written in {info['total_seconds']:.0f} s "
              f"({info['write_mb_s']:.0f} MB/s through ShardWriter)", flush=True)  # fmt: skip
        commands = stage_two(cache, args.workdir / f"results-{n}", args.epochs, args.seeds)
        per_n[n] = {"cache": info, "commands": commands}
        if n == sizes[-1] and "limits" in args.only:
            fixed = {name: per_n[sizes[0]]["commands"][name]["cpu_s"] for name in ("knn", "probe")}
            report["limits"] = limits(args, cache, commands, fixed)
        if not args.keep:
            shutil.rmtree(cache)
            shutil.rmtree(args.workdir / f"results-{n}", ignore_errors=True)
    report["scale"] = {"sizes": sizes, "per_n": per_n, "slopes": print_scale(sizes, per_n)}
    plot(sizes, per_n, args.out / "bench_scale.png")
    big = per_n[sizes[-1]]
    layer_mb = big["cache"]["bytes"] / MIB / (big["cache"]["layers"] * len([p for p in args.pools if p != "paper"]))
    peak = {k: big["commands"][k]["peak_rss_mb"] for k in ("knn", "probe", "cka") if k in big["commands"]}
    report["rss_target"] = {"n": sizes[-1], "peak_rss_mb": peak, "limit_mb": 4096,
                            "holds": all(v <= 4096 for v in peak.values()),
                            "cache_mb": round(big["cache"]["bytes"] / MIB), "one_layer_fp16_mb": round(layer_mb)}  # fmt: skip
    print(f"\nRSS target at n={sizes[-1]} (cache {big['cache']['bytes'] / GB:.1f} GB, one layer {layer_mb:.0f} MB "
          f"fp16): " + ", ".join(f"{k} {v:.0f} MB" for k, v in peak.items())
          + f" -> {'holds' if report['rss_target']['holds'] else 'FAILS'} (≤ 4096 MB)")  # fmt: skip


def limits(args: argparse.Namespace, cache: Path, commands: dict, fixed: dict) -> dict:
    """knn and the linear grid against their bare limits on the same cache (the largest n).

    Compared in CPU seconds (the whole fmcache command vs the bare loop's timed part), best of ``--repeats``
    interleaved runs of each side (the scale run counts as fmcache's first): on a shared machine another process's
    load changes wall times at random, CPU time far less (run with ``--threads 1``, where CPU time ≈ wall time).
    """
    print("\nLimits (same arrays, in RAM; CPU seconds, best of the interleaved runs)", flush=True)
    knn_cmd, probe_cmd = commands["knn"]["argv"], commands["probe"]["argv"]
    runs: dict[str, list[dict]] = {"knn": [commands["knn"]], "probe": [commands["probe"]], "bare_knn": [],
                                   "bare_linear": []}  # fmt: skip
    files = sorted(cache.glob("shard-*.h5"))
    for repeat in range(args.repeats):
        runs["bare_knn"].append(measure(worker("knn", str(cache))))
        runs["bare_linear"].append(measure(worker("linear", str(cache), str(args.epochs), str(args.seeds), "64")))
        if repeat + 1 < args.repeats:
            for name, cmd in (("knn", knn_cmd), ("probe", probe_cmd)):
                m = measure(cmd, cold=files)
                m.update(_result_timings(name, args.workdir / f"results-{args.n_list[-1]}" / name))
                runs[name].append(m)
    bare = {k: [worker_json(m) for m in runs[k]] for k in ("bare_knn", "bare_linear")}
    knn_bare = min(bare["bare_knn"], key=lambda r: r.get("search_cpu_s", 1e9))
    lin_bare = min(bare["bare_linear"], key=lambda r: r.get("train_cpu_s", 1e9) + r.get("eval_cpu_s", 0))
    fm_knn, fm_probe = (min(runs[k], key=lambda m: m["cpu_s"]) for k in ("knn", "probe"))
    kt = fm_knn.get("knn_timings", {})
    inner = sum(
        [kt.get("index_seconds", 0), *kt.get("search_seconds", {}).values(), *kt.get("vote_seconds", {}).values()]
    )
    out = {
        "knn": {"fmcache_cpu_s": fm_knn["cpu_s"], "fmcache_wall_s": fm_knn["wall_s"],
                "fmcache_index_search_vote_s": round(inner, 2), "fmcache_timings": kt,
                "bare_cpu_s": round(knn_bare["search_cpu_s"], 2), "bare_wall_s": round(knn_bare["search_seconds"], 2),
                "fmcache_rss_mb": fm_knn["peak_rss_mb"], "bare_rss_mb": max(m["peak_rss_mb"] for m in runs["bare_knn"]),
                "runs_cpu": [m["cpu_s"] for m in runs["knn"]], "bare_runs_cpu": [round(r["search_cpu_s"], 2) for r in bare["bare_knn"]],
                "loads": [m["load_before"] for m in runs["knn"] + runs["bare_knn"]]},
        "linear": {"fmcache_cpu_s": fm_probe["cpu_s"], "fmcache_wall_s": fm_probe["wall_s"],
                   "fmcache_train_s": fm_probe.get("timings", {}).get("train_seconds"),
                   "bare_cpu_s": round(lin_bare["train_cpu_s"] + lin_bare["eval_cpu_s"], 2),
                   "bare_train_cpu_s": round(lin_bare["train_cpu_s"], 2), "bare_train_s": round(lin_bare["train_seconds"], 2),
                   "fmcache_rss_mb": fm_probe["peak_rss_mb"], "bare_rss_mb": max(m["peak_rss_mb"] for m in runs["bare_linear"]),
                   "runs_cpu": [m["cpu_s"] for m in runs["probe"]],
                   "bare_runs_cpu": [round(r["train_cpu_s"] + r["eval_cpu_s"], 2) for r in bare["bare_linear"]],
                   "loads": [m["load_before"] for m in runs["probe"] + runs["bare_linear"]]},
    }  # fmt: skip
    k, lin = out["knn"], out["linear"]
    # the fixed cost of a command (interpreter, imports, result files): its CPU seconds at the smallest n
    for entry, name in ((k, "knn"), (lin, "probe")):
        startup = entry["startup_cpu_s"] = fixed[name]
        entry["ratio_cpu"] = round(entry["fmcache_cpu_s"] / entry["bare_cpu_s"], 2)
        entry["ratio_cpu_after_startup"] = round((entry["fmcache_cpu_s"] - startup) / entry["bare_cpu_s"], 2)
    lin["ratio_train_cpu_bound"] = round(lin["fmcache_cpu_s"] / lin["bare_train_cpu_s"], 2)
    print(f"  knn: fmcache knn {k['fmcache_cpu_s']:.1f} CPU s for the whole command (index {kt.get('index_seconds', 0):.1f}"
          f" s, search {sum(kt.get('search_seconds', {}).values()):.1f} s, vote {sum(kt.get('vote_seconds', {}).values()):.1f}"
          f" s wall inside) vs bare FAISS IndexFlatIP {k['bare_cpu_s']:.1f} CPU s -> {k['ratio_cpu']:.2f}x "
          f"({k['ratio_cpu_after_startup']:.2f}x without the {k['startup_cpu_s']:.1f} s of the command at n = "
          f"{args.n_list[0]}; limit 1.2x); RSS {k['fmcache_rss_mb']:.0f} vs {k['bare_rss_mb']:.0f} MB")  # fmt: skip
    print(f"  linear grid: fmcache probe {lin['fmcache_cpu_s']:.1f} CPU s for the whole command (training "
          f"{lin['fmcache_train_s']} s wall inside) vs bare torch {lin['bare_cpu_s']:.1f} CPU s (training "
          f"{lin['bare_train_cpu_s']:.1f}) -> {lin['ratio_cpu']:.2f}x ({lin['ratio_cpu_after_startup']:.2f}x after "
          f"start-up; limit 1.2x); RSS {lin['fmcache_rss_mb']:.0f} vs "
          f"{lin['bare_rss_mb']:.0f} MB")  # fmt: skip
    return out


def _result_timings(name: str, folder: Path) -> dict:
    doc = result_json(folder)
    out = {"timings": doc.get("timings", {})}
    if name == "knn" and doc:
        layer = next(iter(doc.get("details", {}).get("layers", {}).values()), {})
        out["knn_timings"] = layer.get("timings", {})
    return out


def section_layers(args: argparse.Namespace, report: dict) -> None:
    """Same n, few vs many layers: one-layer commands must cost the layer, not the cache."""
    out = {}
    print(f"\nLayers: one-layer commands at n = {args.layers_n}, {args.model} width, cls+paper", flush=True)
    for layers in args.layers_list:
        cache = args.workdir / f"layers-{layers}"
        info = write_cache(cache, args.layers_n, args.model, args.dataset, ["cls", "paper"], layers,
                           shard_size=args.shard_size)  # fmt: skip
        files = sorted(cache.glob("shard-*.h5"))
        res = {}
        for name, cmd in {
            "knn": [*FMCACHE, "knn", str(cache), "--layer", "last", "--cpu", "--out", str(args.workdir / "lr")],
            "probe": [*FMCACHE, "probe", str(cache), "--layer", "last", "--lrs", LRS, "--seeds", str(args.seeds),
                      "--epochs", "1", "--device", "cpu", "--out", str(args.workdir / "lr")],
        }.items():  # fmt: skip
            res[name] = measure(cmd, cold=files)
        out[layers] = {"cache_mb": round(info["bytes"] / MIB), **{k: v["peak_rss_mb"] for k, v in res.items()},
                       **{f"{k}_read_mb": v["rchar_mb"] for k, v in res.items()}}  # fmt: skip
        print(f"  {layers:3d} layers: cache {info['bytes'] / MIB:7.0f} MB; knn {res['knn']['peak_rss_mb']:6.0f} MB RSS "
              f"{res['knn']['rchar_mb']:6.0f} MB read; probe {res['probe']['peak_rss_mb']:6.0f} MB RSS "
              f"{res['probe']['rchar_mb']:6.0f} MB read", flush=True)  # fmt: skip
        shutil.rmtree(cache)
        shutil.rmtree(args.workdir / "lr", ignore_errors=True)
    report["layers"] = out


def section_before(args: argparse.Namespace, report: dict) -> None:
    """A cache in the layout before per-layer chunks ((256, L, D)) at the largest n: read by this code (only the
    asked layer is held, every layer's bytes are read), and by the code of ``--old-src`` when given (the before)."""
    n = args.n_list[-1]
    cache = args.workdir / f"old-layout-{n}"
    print(f"\nBefore/after: n = {n}, {args.model}, chunks (256, L, D) as written before this layout", flush=True)
    info = write_cache(cache, n, args.model, args.dataset, args.pools, args.layers, shard_size=args.shard_size,
                       layout="old")  # fmt: skip
    print(f"  {info['bytes'] / GB:.2f} GB written at {info['write_mb_s']:.0f} MB/s (new layout: see scale)", flush=True)
    files = sorted(cache.glob("shard-*.h5"))
    out: dict = {"cache": info}
    sources = {"this code": REPO, **({"old code": args.old_src} if args.old_src else {})}
    for label, src in sources.items():
        for name, cmd in {
            "knn": [*FMCACHE, "knn", str(cache), "--layer", "last", "--cpu", "--out", str(args.workdir / "before")],
            "probe": [*FMCACHE, "probe", str(cache), "--layer", "last", "--lrs", LRS, "--seeds", str(args.seeds),
                      "--epochs", str(args.epochs), "--device", "cpu", "--out", str(args.workdir / "before")],
        }.items():  # fmt: skip
            m = measure(cmd, cold=files, src=src)
            out[f"{name} ({label})"] = {k: m[k] for k in ("rc", "wall_s", "peak_rss_mb", "rchar_mb", "read_bytes_mb")}
            print(f"  {name:5s} {label:9s}: {m['wall_s']:7.1f} s {m['peak_rss_mb']:7.0f} MB RSS "
                  f"{m['rchar_mb']:7.0f} MB read" + ("" if m["rc"] == 0 else f" FAILED: {m['tail']}"), flush=True)  # fmt: skip
            shutil.rmtree(args.workdir / "before", ignore_errors=True)
    shutil.rmtree(cache)
    report["before"] = out


def section_tokens(args: argparse.Namespace, report: dict) -> None:
    """Token feed rate of the reader, and what one DeiT head pass consumes (``probe --head deit``, CPU)."""
    layer = MODELS[args.model]["layers"] if args.layers is None else args.layers
    out: dict = {"model": args.model, "tokens": [DINOV2_TOKENS, MODELS[args.model]["dim"]], "layer": layer}
    cache = args.workdir / "tokens"
    info = write_cache(cache, args.tokens_n, args.model, args.dataset, ["cls", "paper"], args.layers,
                       token_layers=(layer,), shard_size=args.shard_size)  # fmt: skip
    out["cache"] = {k: info[k] for k in ("n", "bytes", "write_mb_s")}
    print(f"\nTokens: {args.tokens_n} samples of {DINOV2_TOKENS}x{MODELS[args.model]['dim']} fp16 "
          f"({info['bytes'] / GB:.2f} GB, written at {info['write_mb_s']:.0f} MB/s)", flush=True)  # fmt: skip
    feed = []
    for mode in ("items", "batches"):
        for workers in (0, 2):
            for state in ("cold", "warm"):
                cmd = worker("feed", str(cache), str(layer), str(workers), "64", str(args.feed_seconds), state, mode)
                m = measure(cmd)
                r = {**worker_json(m), "peak_rss_mb": m["peak_rss_mb"]}
                feed.append(r)
                print(f"  feed {mode:7s}, {workers} workers, {state}: {r['samples_s']:7.0f} samples/s "
                      f"{r['gb_s']:.2f} GB/s", flush=True)  # fmt: skip
    out["feed"] = feed
    shutil.rmtree(cache)
    small = args.workdir / "tokens-deit"
    write_cache(small, args.deit_n, args.model, args.dataset, ["cls", "paper"], args.layers, token_layers=(layer,),
                shard_size=args.shard_size)  # fmt: skip
    cmd = [*FMCACHE, "probe", str(small), "--head", "deit", "--head-random-init", "--head-depth", str(args.head_depth),
           "--epochs", "1", "--lrs", "1e-4", "--seeds", "1", "--layer", str(layer), "--preload", "no", "--workers",
           "0", "--device", "cpu", "--no-plots", "--out", str(args.workdir / "deit")]  # fmt: skip
    m = measure(cmd, cold=sorted(small.glob("shard-*.h5")))
    doc = result_json(args.workdir / "deit")
    n_train = json.loads((small / "manifest.json").read_text())["dataset"]["split_counts"]["train"]
    train_s = doc.get("timings", {}).get("train_seconds")
    consumed = n_train / train_s if train_s else None
    out["deit"] = {"wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"], "rc": m["rc"], "train_seconds": train_s,
                   "head_depth": args.head_depth, "n_train": n_train, "samples_s_one_head": consumed,
                   "samples_s_full_deit_b_estimate": consumed * args.head_depth / 12 if consumed else None}  # fmt: skip
    if m["rc"] != 0:
        print(f"  probe --head deit FAILED: {m['tail']}")
    else:
        print(
            f"  probe --head deit (depth {args.head_depth}, 1 head, CPU): {consumed:.1f} samples/s per head pass "
            f"(~{out['deit']['samples_s_full_deit_b_estimate']:.1f}/s for all 12 DeiT-B blocks); the reader feeds "
            f"{min(r['samples_s'] for r in feed):.0f}-{max(r['samples_s'] for r in feed):.0f} samples/s",
            flush=True,
        )
    shutil.rmtree(small)
    shutil.rmtree(args.workdir / "deit", ignore_errors=True)
    report["tokens"] = out


def section_layout(args: argparse.Namespace, report: dict) -> None:
    """Token read rate of whole-sample chunks vs chunks of several samples (raw h5py, the writer's settings)."""
    import h5py

    n, shard = args.layout_n, 1024
    rows_out = []
    print(f"\nToken chunk layout: {n} samples, fletcher32, item-by-item reads as TokenDataset does", flush=True)
    for label, (tokens, dim) in {"ViT-B 197x768": (197, 768), "ViT-L 257x1024": (257, 1024)}.items():
        base = np.random.default_rng(0).standard_normal((64, tokens, dim), dtype=np.float32).astype(np.float16)
        for rows in (1, 8, 32):
            paths = []
            for s in range(-(-n // shard)):
                path = args.workdir / f"layout-{rows}-{s}.h5"
                m = min(shard, n - s * shard)
                with h5py.File(path, "w", libver="latest") as fh:
                    ds = fh.create_dataset("t", shape=(m, tokens, dim), dtype=np.float16, chunks=(rows, tokens, dim),
                                           fletcher32=True)  # fmt: skip
                    for lo in range(0, m, 64):
                        ds[lo : lo + 64] = base[: min(64, m - lo)]
                paths.append(path)
            for pattern in ("shuffled", "whole"):
                for state in ("cold", "warm"):
                    drop_page_cache(paths) if state == "cold" else _read_tokens(paths, shard, n, pattern)
                    t0 = time.perf_counter()
                    _read_tokens(paths, shard, n, pattern)
                    dt = time.perf_counter() - t0
                    r = {"model": label, "chunk_samples": rows, "pattern": pattern, "state": state,
                         "samples_s": round(n / dt), "gb_s": round(n * tokens * dim * 2 / dt / GB, 2)}  # fmt: skip
                    rows_out.append(r)
                    print(f"  {label:15s} {rows:3d}/chunk {pattern:8s} {state}: {r['samples_s']:6d} samples/s "
                          f"{r['gb_s']:.2f} GB/s", flush=True)  # fmt: skip
            for path in paths:
                path.unlink()
    report["layout"] = rows_out


def _read_tokens(paths: list[Path], shard: int, n: int, pattern: str) -> None:
    import h5py

    handles = [h5py.File(p, "r") for p in paths]
    try:
        sets = [h["t"] for h in handles]
        if pattern == "whole":
            for ds in sets:
                ds[...]
            return
        for i in np.random.default_rng(1).permutation(n):
            sets[i // shard][i % shard].astype(np.float32)
    finally:
        for h in handles:
            h.close()


# -- main -----------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (n ≤ 20k, ViT-B shapes): a few minutes")
    parser.add_argument("--only", default="disk,scale,limits,layers,tokens",
                        help="sections: disk, layout, scale, limits, layers, before, tokens")  # fmt: skip
    parser.add_argument("--model", choices=list(MODELS), default="vit_l")
    parser.add_argument("--layers", type=int, default=None, help="blocks cached (default: the model's)")
    parser.add_argument("--dataset", choices=list(DATASETS), default="chexpert")
    parser.add_argument("--n-list", default="1000,10000,100000,224316")
    parser.add_argument("--pools", default="cls,paper", help="pooled kinds written (cls,mean,paper doubles the size)")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each side of the limits")
    parser.add_argument("--layers-n", type=int, default=50000, help="n of the few-vs-many layers comparison")
    parser.add_argument("--layers-list", default="4,24")
    parser.add_argument("--tokens-n", type=int, default=4096)
    parser.add_argument(
        "--deit-n", type=int, default=400, help="samples of the small token cache for probe --head deit"
    )
    parser.add_argument("--head-depth", type=int, default=2)
    parser.add_argument("--feed-seconds", type=float, default=15.0)
    parser.add_argument("--layout-n", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path("/work/scale_tmp"))
    parser.add_argument("--out", type=Path, default=Path("/work/scale_tmp/out"))
    parser.add_argument("--old-src", type=Path, default=None, help="a source tree of fmcache before this layout")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP/MKL/OpenBLAS threads of every command (0: the libraries' default); 1 keeps timings "
                        "stable on a machine another process is also using")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the synthetic caches")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        defaults = {"n_list": "1000,5000,20000", "model": "vit_b", "layers_n": 10000, "layers_list": "2,12",
                    "tokens_n": 1024, "deit_n": 160, "feed_seconds": 5.0, "layout_n": 1024, "head_depth": 1}  # fmt: skip
        for key, value in defaults.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.n_list = sorted(int(v) for v in str(args.n_list).split(","))
    args.layers_list = [int(v) for v in str(args.layers_list).split(",")]
    args.pools = [p for p in args.pools.split(",") if p]
    args.only = set(args.only.split(","))
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.threads:  # inherited by every command and worker (measure copies this environment)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    print(f"workdir {args.workdir} ({free / GB:.0f} GB free); commands: {' '.join(FMCACHE)} from {REPO}")
    report: dict = {"args": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                             for k, v in vars(args).items() if k != "worker"}}  # fmt: skip
    if "disk" in args.only:
        report["disk"] = disk_table()
        print_disk(report["disk"])
    if "layout" in args.only:
        section_layout(args, report)
    if "scale" in args.only:
        section_scale(args, report)
    if "layers" in args.only:
        section_layers(args, report)
    if "before" in args.only:
        section_before(args, report)
    if "tokens" in args.only:
        section_tokens(args, report)
    path = args.out / "bench_scale.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {path}" + (f" and {args.out / 'bench_scale.png'}" if "scale" in args.only else ""))


if __name__ == "__main__":
    main()
