"""An offline end-to-end demo on real scanned images: scikit-learn's bundled handwritten digits.

Writes the digits as an upsampled ImageFolder, extracts a small registry model (random weights, said loudly,
since no hub is reachable offline), then runs k-NN, the linear-probe grid and layer × layer CKA from the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fmcache.errors import FmcacheError


def write_digits(root: Path, size: int = 32, per_class: int | None = None) -> Path:
    """Write sklearn's 8×8 digits (1,797 scans) as ``root/<digit>/<n>.png`` grayscale PNGs of ``size`` px."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    counts: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target, strict=True):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16.0 * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).save(folder / f"{counts[label]:04d}.png")
    return root


def run_demo(
    out: Path = Path("demo_out"),
    model: str = "resnet50",
    img_size: int = 32,
    per_class: int | None = 100,
    epochs: int = 30,
    log: Callable[[str], None] = print,
) -> dict:
    """Digits → extract → knn → probe → cka; returns the results and writes them under ``out``."""
    from fmcache.cache.reader import CacheReader
    from fmcache.extract import ExtractSpec, run_extract
    from fmcache.frozen.run import run_cka, run_knn, run_probe

    out = Path(out)
    data_root = out / "digits"
    if not data_root.is_dir():
        log(f"writing scikit-learn digits to {data_root}")
        write_digits(data_root, per_class=per_class)
    log(f"[bold red]The demo uses --random-init: {model} has RANDOM weights (no hub access offline).[/]")
    spec = ExtractSpec(
        dataset="imagefolder",
        data_root=data_root,
        model=model,
        random_init=True,
        img_size=img_size,
        tokens="none",
        batch_size=64,
        workers=0,
        shard_size=512,
        cache_root=out / "cache",
    )
    folder = run_extract(spec, log=log)
    reader = CacheReader(folder)
    knn = run_knn(reader, out=out / "results", ks=(10, 20), layer="all")
    # Random-init CNN features are best at the middle stages; probe the one k-NN likes most on val.
    best = max(knn["layers"], key=lambda n: knn["layers"][n]["splits"]["val"][10]["value"])
    probe = run_probe(reader, out=out / "results", lrs=(1e-3, 1e-2), seeds=2, epochs=epochs, layer=best, sklearn=True)
    # every stage against every stage on the test split (exact, debiased): how far apart the stages' views are
    cka = run_cka(reader, out=out / "results", layers="all")
    if not knn or not probe:
        raise FmcacheError("the demo produced no results")
    return {"cache": folder, "knn": knn, "probe": probe, "cka": cka}
