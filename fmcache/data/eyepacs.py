"""EyePACS, the Kaggle Diabetic Retinopathy Detection release (2015): fundus photographs with retinopathy grades
0-4, APTOS 2019's task on another screening programme (external validation).

Layout, from the Kaggle competition's data page: ``trainLabels.csv`` (``image, level``) with ``train/<image>.jpeg``
(35,126 images), and optionally the test set's published labels ``retinopathy_solution.csv`` (``image, level,
Usage`` with Public / Private) with ``test/<image>.jpeg`` (53,576 images). Image names are ``<patient>_left`` and
``<patient>_right``.

Labels: ``level`` (also the raw label). Metadata: ``image_id``, ``patient`` (the number before ``_left`` /
``_right``: the bootstrap unit, as both eyes of a patient are not independent), ``laterality``, ``release_set``
(train/test) and ``usage`` (the test set's Public / Private, blank for train). Split: ``external`` (default),
``official`` (train → train with ``val_fraction`` of its patients to val, test → test; needs the test labels),
``random`` (``fractions`` of the patients) or ``file:FILE.csv``. Normalisation: none published, so the model's own
(or APTOS's, for transfer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, check_files_exist, layout_hint, read_csv
from fmcache.data.aptos import CLASS_NAMES, parse_class_int
from fmcache.data.columns import text
from fmcache.data.external import check_val_fraction, external_index, parse_external_split
from fmcache.data.index import TEST, TRAIN, DatasetIndex
from fmcache.errors import FmcacheError

NAME = "eyepacs"
SETS = {"train": ("trainLabels.csv", "train", TRAIN), "test": ("retinopathy_solution.csv", "test", TEST)}
EXPECTED = "trainLabels.csv and train/ (the Kaggle Diabetic Retinopathy Detection release)"
GROUP_UNIT = "patient"
GRAYSCALE = False
SOURCE = "aptos2019"
TO_SOURCE = {name: name for name in CLASS_NAMES}  # the same ICDR grades 0-4
_EYE = re.compile(r"(.+)_(left|right)")


def _read_set(root: Path, release_set: str) -> list[tuple[str, Path, int, dict[str, str]]]:
    """(release set, image path, level, row) of one set, in CSV order."""
    csv_name, folder, _ = SETS[release_set]
    path = root / csv_name
    _, rows = read_csv(path, ("image", "level"), dataset=NAME, root=root, expected=EXPECTED)
    samples = []
    for line, row in rows:
        image = cell(row, "image", path, line)
        level = parse_class_int(cell(row, "level", path, line), len(CLASS_NAMES), path, line, "level")
        samples.append((release_set, root / folder / f"{image}.jpeg", level, row))
    check_files_exist([s[1] for s in samples], str(path), f"images are read from {folder}/<image>.jpeg")
    return samples


def _sets(root: Path, mode: str) -> list[tuple[str, Path, int, dict[str, str]]]:
    if not (root / SETS["train"][0]).is_file():
        raise FmcacheError(f"{NAME}: {root / SETS['train'][0]} not found; {layout_hint(root, NAME, EXPECTED)}")
    has_test = (root / SETS["test"][0]).is_file()
    if mode == "official" and not has_test:
        raise FmcacheError(
            f"{NAME}: split='official' needs {root / SETS['test'][0]} (the test labels); or use external"
        )
    samples = [s for name in SETS if name == "train" or has_test for s in _read_set(root, name)]
    if len({s[1] for s in samples}) != len(samples):
        raise FmcacheError(f"{NAME}: an image is listed twice in {' / '.join(v[0] for v in SETS.values())}")
    return sorted(samples, key=lambda s: s[1].as_posix())


def load_eyepacs(
    root: Path,
    *,
    split: str = "external",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    val_fraction: float = 0.1,
) -> DatasetIndex:
    """EyePACS retinopathy grades (train, and test when its labels are there), ordered by path."""
    mode, split_file = parse_external_split(split, NAME, official=True)
    val_fraction = check_val_fraction(val_fraction, NAME)
    samples = _sets(root, mode)
    names = [s[3]["image"] for s in samples]
    eyes = [_EYE.fullmatch(n) for n in names]
    labels = np.array([s[2] for s in samples])
    return external_index(
        mode=mode,
        split_file=split_file,
        order="path",
        seed=seed,
        fractions=fractions,
        official=np.array([SETS[s[0]][2] for s in samples], dtype=np.int8),
        val_fraction=val_fraction,
        name=NAME,
        root=root,
        paths=[s[1] for s in samples],
        labels=labels,
        class_names=CLASS_NAMES,
        multilabel=False,
        metadata={
            "image_id": text(names),
            "patient": text(m.group(1) if m else "" for m in eyes),
            "laterality": text(m.group(2) if m else "" for m in eyes),
            "release_set": text(s[0] for s in samples),
            "usage": text(s[3].get("Usage", "") for s in samples),
        },
        raw_labels=labels[:, None],
        raw_label_names=("level",),
        group_unit=GROUP_UNIT,
    )
