"""scikit-learn's bundled handwritten digits as an ImageFolder: the offline demo's data and the grid's ``prepare: digits``.

The release names no writer, so ``metadata.csv`` beside the class folders carries SYNTHETIC metadata (its ``synthetic``
column says so, as README and the demo's log do): a "patient" per group of scans, with a sex and an age per patient,
drawn from a fixed seed, so the demo's report can show patient-level CIs and subgroup tables on data it has offline.
"""

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
    written: list[str] = []
    for image, label in zip(digits.images, digits.target, strict=True):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16.0 * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).save(folder / f"{counts[label]:04d}.png")
        written.append(f"{label}/{counts[label]:04d}.png")
    write_synthetic_metadata(root, written)
    return root


SYNTHETIC_PATIENTS = 60  # ~17 scans each at the demo's 100 per class


def write_synthetic_metadata(root: Path, paths: list[str], seed: int = 0) -> Path:
    """``root/metadata.csv``: SYNTHETIC patient, sex and age per image (seeded), for the demo's evidence tables."""
    rng = np.random.default_rng(seed)
    patient = rng.integers(0, SYNTHETIC_PATIENTS, size=len(paths))
    sex = rng.choice(np.array(["F", "M"]), size=SYNTHETIC_PATIENTS)
    age = rng.integers(20, 90, size=SYNTHETIC_PATIENTS)
    lines = ["path,patient,sex,age,synthetic"]
    lines += [f"{p},synthetic{i:02d},{sex[i]},{age[i]},yes" for p, i in zip(paths, patient, strict=True)]
    target = Path(root) / "metadata.csv"
    target.write_text("\n".join(lines) + "\n")
    return target


def write_binary_digits(digits_root: Path, root: Path) -> Path:
    """``root/labels.csv`` (the ``csv`` layout): the same scans as a binary task, digit 0-4 vs 5-9, with their
    synthetic metadata, so the demo has a task scored by AUC (DeLong) and a second dataset (rankings across datasets).
    Paths point into ``digits_root``: no image is written twice."""
    import csv

    digits_root, root = Path(digits_root), Path(root)
    with open(digits_root / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,patient,sex,age,synthetic"]
    for row in rows:
        digit = int(row["path"].split("/")[0])
        relative = Path("..") / digits_root.name / row["path"]
        label = "0-4" if digit < 5 else "5-9"
        lines.append(f"{relative.as_posix()},{label},{row['patient']},{row['sex']},{row['age']},{row['synthetic']}")
    target = root / "labels.csv"
    target.write_text("\n".join(lines) + "\n")
    return target
