"""IDRiD, part B "Disease Grading" (Porwal et al. 2018, IEEE DataPort): 516 fundus photographs from India with
ICDR retinopathy grades 0-4, APTOS 2019's task (external validation).

Layout, from the IEEE DataPort release: ``B. Disease Grading/1. Original Images/{a. Training Set,b. Testing Set}/
IDRiD_NNN.jpg`` and ``B. Disease Grading/2. Groundtruths/{a. IDRiD_Disease Grading_Training Labels.csv,
b. IDRiD_Disease Grading_Testing Labels.csv}`` with ``Image name, Retinopathy grade, Risk of macular edema`` (the
header has a trailing space and empty padding columns, which are ignored). ``--data-root`` may be the ``B. Disease
Grading`` folder, its parent, or the parent of the doubled ``B. Disease Grading/B. Disease Grading/`` the zip
unpacks to. 413 training and 103 test images; the two sets reuse names (``IDRiD_001`` is in both), so
``image_id`` alone does not identify an image: ``release_set`` tells them apart.

Labels: ``Retinopathy grade`` (also the raw label). Metadata: ``image_id``, ``release_set`` (train/test) and
``dme_risk`` (Risk of macular edema, 0-2). The release has no patient ids: every image is its own unit. Split:
``external`` (default), ``official`` (the release's train/test, ``val_fraction`` of train to val), ``random``
(``fractions`` of the images) or ``file:FILE.csv``. Normalisation: none published, so the model's own (or
APTOS's, for transfer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, check_files_exist, layout_hint, read_csv
from fmcache.data.aptos import CLASS_NAMES, parse_class_int
from fmcache.data.columns import numbers, text
from fmcache.data.external import check_val_fraction, external_index, parse_external_split
from fmcache.data.index import TEST, TRAIN, DatasetIndex
from fmcache.errors import FmcacheError

NAME = "idrid"
PART = "B. Disease Grading"
IMAGES, TRUTHS = "1. Original Images", "2. Groundtruths"
SETS = {
    "train": ("a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv", TRAIN),
    "test": ("b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv", TEST),
}
EXPECTED = f"'{PART}/' with '{IMAGES}/' and '{TRUTHS}/' (the IDRiD release)"
GROUP_UNIT = None  # the release has no patient ids
GRAYSCALE = False
SOURCE = "aptos2019"
TO_SOURCE = {name: name for name in CLASS_NAMES}  # the same ICDR grades 0-4


def find_part(root: Path) -> Path:
    """The folder that holds ``2. Groundtruths``: root, root/B. Disease Grading or the doubled folder."""
    for folder in (root, root / PART, root / PART / PART):
        if (folder / TRUTHS).is_dir():
            return folder
    raise FmcacheError(f"{NAME}: no '{TRUTHS}' folder in {root} or {root / PART}; {layout_hint(root, NAME, EXPECTED)}")


def _read_set(part: Path, root: Path, release_set: str) -> list[tuple[Path, int, str, str]]:
    """(image path, grade, image name, DME risk) of one release set, in CSV order."""
    folder, csv_name, _ = SETS[release_set]
    path = part / TRUTHS / csv_name
    columns = ("Image name", "Retinopathy grade")
    _, rows = read_csv(path, columns, dataset=NAME, root=root, expected=EXPECTED)
    samples = []
    for line, row in rows:
        image = cell(row, "Image name", path, line)
        grade = parse_class_int(cell(row, "Retinopathy grade", path, line), 5, path, line, "Retinopathy grade")
        samples.append((part / IMAGES / folder / f"{image}.jpg", grade, image, row.get("Risk of macular edema", "")))
    check_files_exist([s[0] for s in samples], str(path), f"images are read from '{IMAGES}/{folder}/<Image name>.jpg'")
    return samples


def load_idrid(
    root: Path,
    *,
    split: str = "external",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    val_fraction: float = 0.1,
) -> DatasetIndex:
    """IDRiD retinopathy grades of both release sets, ordered by path (see the module docstring)."""
    mode, split_file = parse_external_split(split, NAME, official=True)
    val_fraction = check_val_fraction(val_fraction, NAME)
    part = find_part(root)
    sets = [(name, sample) for name in SETS for sample in _read_set(part, root, name)]
    if len({sample[0] for _, sample in sets}) != len(sets):
        raise FmcacheError(f"{NAME}: an image is listed twice in the ground-truth CSVs; keep one row per image")
    sets.sort(key=lambda item: item[1][0].as_posix())
    dme, bad = numbers(sample[3] for _, sample in sets)
    labels = np.array([sample[1] for _, sample in sets])
    return external_index(
        mode=mode,
        split_file=split_file,
        order="path",
        seed=seed,
        fractions=fractions,
        official=np.array([SETS[name][2] for name, _ in sets], dtype=np.int8),
        val_fraction=val_fraction,
        problems=[f"{bad} 'Risk of macular edema' value(s) are not numbers; read as missing"] if bad else [],
        name=NAME,
        root=part,
        paths=[sample[0] for _, sample in sets],
        labels=labels,
        class_names=CLASS_NAMES,
        multilabel=False,
        metadata={
            "image_id": text(sample[2] for _, sample in sets),
            "release_set": text(name for name, _ in sets),
            "dme_risk": dme,
        },
        raw_labels=labels[:, None],
        raw_label_names=("Retinopathy grade",),
    )
