#!/usr/bin/env bash
# One prepared GPU check (issue 20 §3): every GPU path of fmcache once, in about 5 minutes on one GPU, as one table.
#
#   extraction img/s vs a bare timm forward_intermediates on the same batches     (goal >= 0.8x)
#   FAISS GPU vs CPU k-NN: the same predictions                                   (goal: agreement >= 0.999)
#   CKA on CUDA vs on the CPU                                                     (goal: max difference <= 1e-6)
#   DeiT token head and linear grid throughput, tokens in memory, vs bare loops   (reported)
#   one AMP (bf16) fine-tuning epoch vs a bare timm loop, benchmarks/bench_finetune.py (a)   (goal >= 0.9x)
#   a ViT-B fine-tune epoch from a pixel cache with device augmentation vs from image files with 8 workers (img/s)
#   a 1-GPU torchrun extract, and an NCCL all-reduce under torchrun               (goal: runs, same cache)
#
# Usage: bash benchmarks/gpu_check.sh        (PYTHON=... picks the interpreter; default .venv/bin/python)
# Without a CUDA GPU it says so and exits 0 (CI runs that). FMCACHE_GPU_CHECK_ON_CPU=1 runs the same code on the
# CPU at toy sizes, to check the script itself; its figures mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
ON_CPU=${FMCACHE_GPU_CHECK_ON_CPU:-0}
if [ "$ON_CPU" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False here), so there is nothing to check; exit 0"
  exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROWS="$WORK/rows.tsv"
START=$SECONDS
row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$ROWS"; } # check, measured, goal, verdict

# -- 1-4: extraction, FAISS, CKA, token head and linear grid (one Python process; it writes its own rows) ----------
timeout 330 "$PY" - "$ROWS" "$WORK" "$ON_CPU" <<'PYEOF' || row "extraction, k-NN, CKA, heads" "exit $?" "runs" "ERROR"
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

rows, work, on_cpu = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
dev = torch.device("cpu" if on_cpu else "cuda")
small = on_cpu  # toy sizes on the CPU: this checks the script, not the machine


def row(check, measured, goal, ok):
    verdict = "ok" if ok is True else "FAIL" if ok is False else ok
    with rows.open("a") as f:
        f.write(f"{check}\t{measured}\t{goal}\t{verdict}\n")


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def guarded(name, fn):
    try:
        fn()
    except Exception as exc:  # one failed check must not hide the others
        row(name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:90] if str(exc) else ''}", "runs", "ERROR")


# images for the extraction and torchrun checks
from PIL import Image  # noqa: E402

n_images, px = (48, 64) if small else (2048, 256)
rng = np.random.default_rng(0)
for i in range(n_images):
    folder = work / "images" / f"c{i % 4}"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:px, 0:px]
    pixels = ((xx * (i % 7 + 1) + yy) % 256)[..., None] + rng.integers(0, 32, (px, px, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
MODEL, SIZE, OVERRIDES, BATCH = ("dinov2_vits14", 56, {"depth": 2}, 16) if small else ("dinov2_vitb14", 224, {}, 128)
state = {}


def extraction():
    import os

    from fmcache.data import ImageDataset, build_transform, load_dataset
    from fmcache.extract.spec import ExtractSpec
    from fmcache.extract.run import run_extract
    from fmcache.models import create_foundation

    workers = 0 if small else min(8, os.cpu_count() or 1)
    spec = ExtractSpec(dataset="imagefolder", data_root=work / "images", model=MODEL, random_init=True, img_size=SIZE,
                       norm="model", batch_size=BATCH, workers=workers, shard_size=1024, cache_root=work / "cache",
                       tokens="last", arch_overrides=OVERRIDES, device=str(dev))
    folder = run_extract(spec, progress=False, log=lambda m: None)
    state["cache"] = folder
    ours = n_images / json.loads((folder / "manifest.json").read_text())["timings"]["extract_seconds"]
    # the bare timm model on the same batches, already on the device: the limit
    index = load_dataset("imagefolder", work / "images")
    transform, _ = build_transform(SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = ImageDataset(index, np.arange(len(index)), transform)
    batches = [torch.stack([ds[j][0] for j in range(i, min(i + BATCH, n_images))]).to(dev)
               for i in range(0, n_images, BATCH)]
    timm_model = create_foundation(MODEL, random_init=True, img_size=SIZE, arch_overrides=OVERRIDES).adapter.model
    timm_model = timm_model.to(dev).eval()
    if dev.type == "cuda":
        timm_model = timm_model.to(memory_format=torch.channels_last)
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def bare_pass():
        with torch.no_grad(), amp:
            for b in batches:
                timm_model.forward_intermediates(b, intermediates_only=True)
        sync()

    bare_pass()
    t0 = time.perf_counter()
    bare_pass()
    bare = n_images / (time.perf_counter() - t0)
    row(f"extraction ({MODEL} {SIZE} px, {workers} workers, tokens last) / bare forward_intermediates",
        f"{ours:.0f} / {bare:.0f} img/s = {ours / bare:.2f}x", ">= 0.8x", ours / bare >= 0.8)


def knn():
    from fmcache.frozen.knn import knn_predict

    n, d, q = (2000, 64, 200) if small else (50_000, 768, 10_000)
    x = rng.standard_normal((n + q, d)).astype(np.float32)
    y = rng.integers(0, 10, n)
    ks = (10, 20, 100, 200)
    t0 = time.perf_counter()
    gpu = knn_predict(x[:n], y, x[n:], ks, use_gpu=not on_cpu)
    t1 = time.perf_counter()
    cpu = knn_predict(x[:n], y, x[n:], ks, use_gpu=False)
    t2 = time.perf_counter()
    agree = min(float((gpu[k].argmax(1) == cpu[k].argmax(1)).mean()) for k in ks)
    row(f"k-NN FAISS GPU vs CPU (n={n}, d={d}, {q} queries, k={','.join(map(str, ks))})",
        f"agreement {agree:.4f}; {t1 - t0:.1f} s vs {t2 - t1:.1f} s", ">= 0.999", agree >= 0.999)


def cka():
    from fmcache.frozen.cka import ExactCka

    dims, n, block = ([32] * 3, 512, 128) if small else ([768] * 6, 16_384, 2048)
    feats = [rng.standard_normal((n, d)).astype(np.float32) + 0.5 * i for i, d in enumerate(dims)]
    matrices = []
    for device in (torch.device("cpu"), dev):
        acc = ExactCka(dims, None, device)
        for s in range(0, n, block):
            acc.update([f[s : s + block] for f in feats])
        matrices.append(np.asarray(acc.matrix(True)))
    diff = float(np.abs(matrices[0] - matrices[1]).max())
    row(f"CKA (exact, debiased, {len(dims)} x {dims[0]}-d layers, n={n}) on {dev.type} vs CPU",
        f"max difference {diff:.1e}", "<= 1e-6", diff <= 1e-6)


def token_head():
    import torch.nn.functional as F

    from fmcache.cache.reader import CacheReader
    from fmcache.frozen.heads import DeiTHead
    from fmcache.frozen.token_layers import layer_spec
    from fmcache.frozen.tokens import GridConfig, TokenSplit, train_token_grid
    from fmcache.training import adamw_param_groups

    reader = CacheReader(state["cache"])
    layer = reader.num_layers
    spec = layer_spec(reader, layer, "none", "deit")
    splits = [TokenSplit(reader, s, layer, preload=True, workers=0) for s in ("train", "val", "test")]
    depth, batch, epochs = (1, 8, 1) if small else (12, 64, 2)
    cfg = GridConfig("deit", [1e-4], [0], len(reader.class_names), "accuracy", False, epochs, batch, 1e-5,
                     {"warmup_iters": 0}, "constant", 1.0, depth, 0, None)
    result = train_token_grid(spec, *splits, cfg, dev, None)
    ours = splits[0].n * epochs / result.train_seconds
    # the bare loop: the same head, tokens already on the device
    x = splits[0].x.to(dev)
    y = torch.as_tensor(splits[0].labels).to(dev)
    head = DeiTHead(spec.dim, len(reader.class_names), depth, spec.grid).to(dev)
    opt = torch.optim.AdamW(adamw_param_groups(head.named_parameters(), 1e-5), lr=1e-4, foreach=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def epoch():
        for idx in torch.randperm(len(x), device=dev).split(batch)[: len(x) // batch]:
            with amp:
                loss = F.cross_entropy(head(x[idx][:, spec.prefix :].float()).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
        sync()

    epoch()
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    bare = len(x) * epochs / (time.perf_counter() - t0)
    row(f"DeiT head ({depth} blocks, {spec.num_tokens} x {spec.dim} tokens) from the cache vs a bare loop",
        f"{ours:.0f} / {bare:.0f} samples/s = {ours / bare:.2f}x", "report (>= 0.9x)", "ok" if ours / bare >= 0.9 else "LOW")


def linear_grid():
    from fmcache.frozen.linear import train_linear_grid

    n, d, c, epochs = (2000, 64, 5, 2) if small else (200_000, 1024, 10, 3)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, c, n)
    lrs, seeds = [1e-5, 3e-5, 1e-4, 1e-3], 5
    t0 = time.perf_counter()
    train_linear_grid(x, y, x[:2000], y[:2000], x[:2000], y[:2000], lrs=lrs, seeds=seeds, num_classes=c,
                      metric="accuracy", epochs=epochs, batch_size=64, device=dev)
    ours = n * epochs * 20 / (time.perf_counter() - t0)
    # bare: the same 20 heads as one (H, D, C) weight, einsum, cross-entropy, AdamW; data already on the device
    xt, yt = torch.as_tensor(x, device=dev), torch.as_tensor(y, device=dev)
    w = torch.zeros(20, d, c, device=dev, requires_grad=True)
    b = torch.zeros(20, c, device=dev, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=1e-4, foreach=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(n, device=dev).split(64)[: n // 64]:
            logits = torch.einsum("bd,hdc->hbc", xt[idx], w) + b[:, None]
            loss = F_ce(logits.reshape(-1, c), yt[idx].repeat(20))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync()
    bare = n * epochs * 20 / (time.perf_counter() - t0)
    row(f"linear grid (20 heads, n={n}, d={d}, {epochs} epochs, val each epoch) vs a bare batched loop",
        f"{ours / 1e6:.2f} / {bare / 1e6:.2f} M head-samples/s = {ours / bare:.2f}x", "report", "ok")


F_ce = torch.nn.functional.cross_entropy
for name, fn in (("extraction", extraction), ("k-NN", knn), ("CKA", cka), ("DeiT head", token_head),
                 ("linear grid", linear_grid)):
    guarded(name, fn)
PYEOF

# -- 5: one AMP fine-tuning epoch vs a bare timm loop ----------------------------------------------------------------
if [ "$ON_CPU" = 1 ]; then FT_ARGS=(--depth 2 --size 56 --n 32 --batch 8 --epochs 2); else FT_ARGS=(--depth 12 --size 224 --n 1024 --batch 64 --epochs 3); fi
FT=$(timeout 150 "$PY" benchmarks/bench_finetune.py --only a "${FT_ARGS[@]}" 2>&1)
FT_RC=$?
ratio=$(printf '%s\n' "$FT" | sed -n 's/^(a) train throughput fmcache \/ bare timm loop: \([0-9.]*\)x.*/\1/p')
if [ -n "$ratio" ]; then
  verdict=$("$PY" -c "print('ok' if $ratio >= 0.9 else 'FAIL')")
  row "AMP fine-tuning epoch (ViT-S/14, ${FT_ARGS[*]}) / bare timm loop" "${ratio}x" ">= 0.9x" "$verdict"
else
  row "AMP fine-tuning epoch / bare timm loop" "exit $FT_RC: $(printf '%s' "$FT" | tail -1 | cut -c1-90)" ">= 0.9x" "ERROR"
fi

# -- 5b: a ViT-B fine-tune epoch: pixel cache + augmentation on the GPU vs decoding the image files with 8 workers ------
timeout 240 "$PY" - "$ROWS" "$WORK" "$ON_CPU" <<'PYEOF' || row "fine-tune epoch, pixels + device aug / images" "exit $?" "report" "ERROR"
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fmcache.extract.pixel_spec import PixelSpec
from fmcache.extract.pixels import write_pixels
from fmcache.finetune.run import run_finetune
from fmcache.finetune.spec import FinetuneSpec

rows, work, on_cpu = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
n, w, h = (48, 96, 72) if on_cpu else (1024, 1024, 768)  # ISIC-like JPEGs: decoding is a real cost
model, size, over, batch = ("dinov2_vits14", 56, {"depth": 2}, 8) if on_cpu else ("dinov2_vitb14", 224, {}, 64)
root = work / "ft_images"
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:h, 0:w]
for i in range(n):
    folder = root / f"c{i % 4}"
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((xx * (i % 5 + 1) + yy) % 256)[..., None] + rng.integers(0, 24, (h, w, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
workers = 0 if on_cpu else 8
write_pixels(PixelSpec(dataset="imagefolder", data_root=root, img_size=size, cache_root=work / "ft_cache",
                       workers=workers), progress=False, log=lambda m: None)
rates = {}
for name, kw in (("images", dict(pixels="off", workers=workers)), ("pixels", dict(pixels="on", augment="device"))):
    spec = FinetuneSpec(dataset="imagefolder", data_root=root, model=model, random_init=True, img_size=size,
                        arch_overrides=over, lrs=(1e-4,), epochs=2, batch_size=batch, norm="model",
                        cache_root=work / "ft_cache", out=work / f"ft_runs_{name}", device="cpu" if on_cpu else None,
                        **kw)
    result = run_finetune(spec, progress=False, log=lambda m: None)
    doc = json.loads((Path(result["folder"]) / "result.json").read_text())
    runs = Path(result["runs_folder"])
    run = json.loads(next(runs.glob("lr*/run.json")).read_text())
    train = run["steps_per_epoch"] * batch
    rates[name] = train / run["timings"]["train_s_per_epoch_min"]
    assert doc["details"]["data_source"].startswith("pixels" if name == "pixels" else "images")
with rows.open("a") as f:
    ratio = rates["pixels"] / rates["images"]
    f.write(f"fine-tune epoch ({model} {size} px): pixel cache + device aug (2 workers) / image files + CPU aug "
            f"({workers} workers)\t{rates['pixels']:.0f} / {rates['images']:.0f} img/s = {ratio:.2f}x\treport (>= 1x)\t"
            f"{'ok' if ratio >= 1 else 'LOW'}\n")
PYEOF

# -- 6: torchrun: a 1-GPU extract, and NCCL itself (one all-reduce) ---------------------------------------------------
if [ "$ON_CPU" = 1 ]; then EX=(--model dinov2_vits14 --img-size 56 --device cpu); BACKEND=gloo; else EX=(--model dinov2_vitb14 --img-size 224 --device cuda); BACKEND=nccl; fi
TR=$(timeout 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m fmcache extract --dataset imagefolder \
  --data-root "$WORK/images" "${EX[@]}" --random-init --norm model --batch-size 64 --workers 2 \
  --cache-root "$WORK/cache_torchrun" --quiet 2>&1)
TR_RC=$?
if [ $TR_RC -eq 0 ] && ls "$WORK"/cache_torchrun/imagefolder/*/*/manifest.json >/dev/null 2>&1; then
  row "torchrun --nproc-per-node 1 extract" "complete cache" "runs" "ok"
else
  row "torchrun --nproc-per-node 1 extract" "exit $TR_RC: $(printf '%s' "$TR" | tail -1 | cut -c1-90)" "runs" "FAIL"
fi
cat >"$WORK/allreduce.py" <<PYEOF
import torch, torch.distributed as dist
dist.init_process_group("$BACKEND")
t = torch.ones(4, device="cuda" if "$BACKEND" == "nccl" else "cpu")
dist.all_reduce(t)
dist.barrier()
print("all-reduce", float(t.sum()))
dist.destroy_process_group()
PYEOF
NC=$(timeout 90 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 "$WORK/allreduce.py" 2>&1)
if printf '%s' "$NC" | grep -q "all-reduce 4.0"; then
  row "torchrun $BACKEND all-reduce + barrier" "4.0" "runs" "ok"
else
  row "torchrun $BACKEND all-reduce + barrier" "$(printf '%s' "$NC" | tail -1 | cut -c1-90)" "runs" "FAIL"
fi

# -- the table ----------------------------------------------------------------------------------------------------------
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (script check only)')" 2>/dev/null)
echo
echo "gpu_check on $DEVICE, $((SECONDS - START)) s"
"$PY" - "$ROWS" <<'PYEOF'
import sys

rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
head = ["check", "measured", "goal", "verdict"]
widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
for r in [head, ["-" * w for w in widths], *rows]:
    print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
PYEOF
if grep -qP '\t(FAIL|ERROR)$' "$ROWS"; then exit 1; fi
