"""ISIC 2019 training set: ``ISIC_2019_Training_GroundTruth.csv`` + ``ISIC_2019_Training_Input/<image>.jpg``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, check_files_exist, merge_duplicates, read_csv
from fmcache.data.index import DatasetIndex, build_index, check_fractions, check_seed, random_split, random_split_info
from fmcache.errors import FmcacheError

NAME = "isic2019"
CLASS_NAMES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
IMAGE_DIR = "ISIC_2019_Training_Input"
EXPECTED = f"{GROUND_TRUTH} and {IMAGE_DIR}/ (the ISIC 2019 training release)"


def _one_hot_value(value: str, path: Path, line: int, column: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number not in (0.0, 1.0):
        raise FmcacheError(f"{path} line {line}: {column}={value!r} is not 0 or 1; fix or remove the row")
    return number


def _row_class(row: dict[str, str], path: Path, line: int) -> int:
    """The class index of one one-hot row: exactly one of MEL..SCC set, UNK never set."""
    image = row.get("image", "?")
    values = [_one_hot_value(cell(row, c, path, line), path, line, c) for c in CLASS_NAMES]
    if _one_hot_value(cell(row, "UNK", path, line), path, line, "UNK"):
        raise FmcacheError(
            f"{path} line {line} ({image}): UNK is set, which the ISIC 2019 training labels never do; "
            "use the official ground-truth file"
        )
    positives = int(sum(values))
    if positives != 1:
        what = "no class" if positives == 0 else f"{positives} classes"
        raise FmcacheError(
            f"{path} line {line} ({image}): {what} set among {', '.join(CLASS_NAMES)} (one-hot expected); "
            "fix or remove the row"
        )
    return int(np.argmax(values))


def load_isic2019(root: Path, *, seed: int = 42, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> DatasetIndex:
    """8 skin-lesion classes (argmax of the one-hot row), ordered by image id, split 80/10/10 by ``seed``."""
    seed, fractions = check_seed(seed), check_fractions(fractions)
    csv_path = root / GROUND_TRUTH
    columns = ("image", *CLASS_NAMES, "UNK")
    _, rows = read_csv(csv_path, columns, dataset=NAME, root=root, expected=EXPECTED)
    ids = [cell(row, "image", csv_path, line) for line, row in rows]
    labels = np.array([_row_class(row, csv_path, line) for line, row in rows])
    ids, labels, problems = merge_duplicates(ids, labels, [line for line, _ in rows], csv_path)
    paths = [root / IMAGE_DIR / f"{i}.jpg" for i in ids]
    check_files_exist(paths, str(csv_path), f"expected {IMAGE_DIR}/<image>.jpg next to {GROUND_TRUTH}")
    return build_index(
        name=NAME,
        root=root,
        paths=paths,
        labels=labels,
        split=random_split(len(paths), fractions, seed),
        class_names=CLASS_NAMES,
        multilabel=False,
        split_info=random_split_info(seed, fractions, "image"),
        problems=problems,
    )
