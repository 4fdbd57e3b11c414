"""scikit-learn's bundled handwritten digits as an ImageFolder: the offline demo's data and the grid's ``prepare: digits``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
