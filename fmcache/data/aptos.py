"""APTOS 2019 Blindness Detection (Kaggle release): ``train.csv`` + ``train_images/<id_code>.png``.

The release carries no patient or demographic columns: metadata is the ``image_id`` (``id_code``) alone, raw
labels the ``diagnosis`` column, and every image is its own bootstrap unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, check_files_exist, merge_duplicates, read_csv
from fmcache.data.columns import text
from fmcache.data.index import DatasetIndex, build_index, check_fractions, check_seed, random_split, random_split_info
from fmcache.data.splits import apply_split_file, parse_split, require_unique_rows, rows_to_samples, seed_row_codes
from fmcache.errors import FmcacheError

NAME = "aptos2019"
CLASS_NAMES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")
EXPECTED = "train.csv and train_images/ (the Kaggle APTOS 2019 release)"
SPLIT_MODES = ("seed", "random")
SEED_HOLDOUT = 0.3  # the seed's val_size for APTOS2019: 30 % of the rows, halved into val and test


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


def load_aptos2019(
    root: Path,
    *,
    split: str = "seed",
    seed: int = 42,
    fractions: Sequence[float] = (0.70, 0.15, 0.15),
) -> DatasetIndex:
    """5 diabetic-retinopathy grades (0-4), ordered by ``id_code``.

    ``split``: "seed" (the seed's shuffle of the CSV rows, 30 % held out and halved into val/test, or the
    root's ``val_ids.json``; see :mod:`fmcache.data.splits`), "random" (``fractions`` of the rows sorted by
    id_code, numpy ``seed``) or "file:FILE.csv". ``seed`` seeds both shuffles (42 is the paper's).
    """
    mode, split_file = parse_split(split, SPLIT_MODES, NAME)
    seed, fractions = check_seed(seed), check_fractions(fractions)
    csv_path = root / "train.csv"
    _, rows = read_csv(csv_path, ("id_code", "diagnosis"), dataset=NAME, root=root, expected=EXPECTED)
    lines = [line for line, _ in rows]
    row_ids = [cell(row, "id_code", csv_path, line) for line, row in rows]
    labels = np.array(
        [parse_class_int(cell(row, "diagnosis", csv_path, line), 5, csv_path, line, "diagnosis") for line, row in rows]
    )
    if mode == "seed":
        require_unique_rows(row_ids, lines, csv_path, NAME)
    ids, labels, problems = merge_duplicates(row_ids, labels, lines, csv_path)
    paths = [root / "train_images" / f"{i}.png" for i in ids]
    check_files_exist(paths, str(csv_path), "expected train_images/<id_code>.png next to train.csv")
    if mode == "seed":
        row_codes, split_info, notes = seed_row_codes(len(row_ids), SEED_HOLDOUT, root, seed)
        codes = rows_to_samples(row_codes, row_ids, ids)
        split_info["order"] = "id_code"
        problems += notes
    else:
        codes = random_split(len(paths), fractions, seed)
        split_info = random_split_info(seed, fractions, "id_code")
    index = build_index(
        name=NAME,
        root=root,
        paths=paths,
        labels=labels,
        split=codes,
        class_names=CLASS_NAMES,
        multilabel=False,
        split_info=split_info,
        problems=problems,
        metadata={"image_id": text(ids)},
        raw_labels=labels[:, None],
        raw_label_names=("diagnosis",),
    )
    return apply_split_file(index, split_file) if split_file else index
