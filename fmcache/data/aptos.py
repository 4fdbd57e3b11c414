"""APTOS 2019 Blindness Detection (Kaggle release): ``train.csv`` + ``train_images/<id_code>.png``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, check_files_exist, merge_duplicates, read_csv
from fmcache.data.index import DatasetIndex, build_index, check_fractions, check_seed, random_split, random_split_info
from fmcache.errors import FmcacheError

NAME = "aptos2019"
CLASS_NAMES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")
EXPECTED = "train.csv and train_images/ (the Kaggle APTOS 2019 release)"


def parse_class_int(value: str, num_classes: int, path: Path, line: int, column: str) -> int:
    """An integer class label in 0..num_classes-1; an error naming file, line and column otherwise."""
    try:
        label = int(value)
    except ValueError:
        label = -1
    if not 0 <= label < num_classes:
        raise FmcacheError(
            f"{path} line {line}: {column}={value!r} is not a class (expected an integer 0-{num_classes - 1}); "
            "fix or remove the row"
        )
    return label


def load_aptos2019(root: Path, *, seed: int = 42, fractions: Sequence[float] = (0.70, 0.15, 0.15)) -> DatasetIndex:
    """5 diabetic-retinopathy grades (0-4), ordered by ``id_code``, split 70/15/15 by ``seed``."""
    seed, fractions = check_seed(seed), check_fractions(fractions)
    csv_path = root / "train.csv"
    _, rows = read_csv(csv_path, ("id_code", "diagnosis"), dataset=NAME, root=root, expected=EXPECTED)
    ids = [cell(row, "id_code", csv_path, line) for line, row in rows]
    labels = np.array(
        [parse_class_int(cell(row, "diagnosis", csv_path, line), 5, csv_path, line, "diagnosis") for line, row in rows]
    )
    ids, labels, problems = merge_duplicates(ids, labels, [line for line, _ in rows], csv_path)
    paths = [root / "train_images" / f"{i}.png" for i in ids]
    check_files_exist(paths, str(csv_path), "expected train_images/<id_code>.png next to train.csv")
    return build_index(
        name=NAME,
        root=root,
        paths=paths,
        labels=labels,
        split=random_split(len(paths), fractions, seed),
        class_names=CLASS_NAMES,
        multilabel=False,
        split_info=random_split_info(seed, fractions, "id_code"),
        problems=problems,
    )
