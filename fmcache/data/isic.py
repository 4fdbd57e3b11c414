"""ISIC 2019 training set: ``ISIC_2019_Training_GroundTruth.csv`` + ``ISIC_2019_Training_Input/<image>.jpg``.

Raw labels are the nine one-hot columns as released (MEL..SCC and UNK). Metadata: ``image_id`` (the ``image``
column; HAM10000 and BCN20000 images keep their ``ISIC_00xxxxx`` ids here, so overlaps with those datasets show
by id) and, when the release's optional ``ISIC_2019_Training_Metadata.csv`` is present, its ``lesion_id``,
``age_approx``, ``sex`` and ``anatom_site_general`` columns. The lesion is the bootstrap unit then (many non-HAM
images have a blank lesion_id: each is its own unit).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, check_files_exist, merge_duplicates, read_csv
from fmcache.data.columns import first_rows, table_columns, text
from fmcache.data.index import DatasetIndex, build_index, check_fractions, check_seed, random_split, random_split_info
from fmcache.data.splits import (
    apply_split_file,
    group_split,
    parse_split,
    require_unique_rows,
    rows_to_samples,
    seed_row_codes,
)
from fmcache.errors import FmcacheError

NAME = "isic2019"
CLASS_NAMES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
IMAGE_DIR = "ISIC_2019_Training_Input"
METADATA = "ISIC_2019_Training_Metadata.csv"
EXPECTED = f"{GROUND_TRUTH} and {IMAGE_DIR}/ (the ISIC 2019 training release)"
SPLIT_MODES = ("seed", "random", "lesion")
SEED_HOLDOUT = 0.2  # the seed's val_size for ISIC2019: 20 % of the rows, halved into val and test
RAW_COLUMNS = (*CLASS_NAMES, "UNK")
METADATA_COLUMNS = {
    "lesion_id": ("lesion_id", "text"),
    "age_approx": ("age_approx", "number"),
    "sex": ("sex", "text"),
    "anatom_site_general": ("anatom_site_general", "text"),
}


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


def load_isic2019(
    root: Path,
    *,
    split: str = "seed",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> DatasetIndex:
    """8 skin-lesion classes (argmax of the one-hot row), ordered by image id.

    ``split``: "seed" (the seed's shuffle of the CSV rows, 20 % held out and halved into val/test, or the
    root's ``val_ids.json``; see :mod:`fmcache.data.splits`), "random" (``fractions`` of the images sorted by
    id, numpy ``seed``), "lesion" (``fractions`` of the lesions of ``ISIC_2019_Training_Metadata.csv``, see
    :func:`lesion_groups`) or "file:FILE.csv".
    """
    mode, split_file = parse_split(split, SPLIT_MODES, NAME)
    seed, fractions = check_seed(seed), check_fractions(fractions)
    csv_path = root / GROUND_TRUTH
    _, rows = read_csv(csv_path, ("image", *RAW_COLUMNS), dataset=NAME, root=root, expected=EXPECTED)
    lines = [line for line, _ in rows]
    row_ids = [cell(row, "image", csv_path, line) for line, row in rows]
    labels = np.array([_row_class(row, csv_path, line) for line, row in rows])
    if mode == "seed":
        require_unique_rows(row_ids, lines, csv_path, NAME)
    ids, labels, problems = merge_duplicates(row_ids, labels, lines, csv_path)
    # _row_class has checked every cell, so the raw one-hot rows parse; a merged duplicate repeats its row.
    first = first_rows(row_ids, [row for _, row in rows])
    raw = np.array([[float(first[i][c]) for c in RAW_COLUMNS] for i in ids], dtype=np.float32)
    metadata, notes = read_metadata(root, ids)
    problems += notes
    paths = [root / IMAGE_DIR / f"{i}.jpg" for i in ids]
    check_files_exist(paths, str(csv_path), f"expected {IMAGE_DIR}/<image>.jpg next to {GROUND_TRUTH}")
    if mode == "seed":
        row_codes, split_info, notes = seed_row_codes(len(row_ids), SEED_HOLDOUT, root, seed)
        codes = rows_to_samples(row_codes, row_ids, ids)
        split_info["order"] = "image"
        problems += notes
    elif mode == "lesion":
        groups, notes = lesion_groups(root, ids)
        codes = group_split(groups, fractions, seed)
        split_info = {
            "mode": "lesion",
            "seed": seed,
            "fractions": [float(f) for f in fractions],
            "fractions_of": "lesions (an image without lesion_id is its own lesion)",
            "source": METADATA,
            "lesions": len({g for g in groups if g.startswith("lesion:")}),
            "images_without_lesion_id": sum(g.startswith("image:") for g in groups),
            "order": "image",
        }
        problems += notes
    else:
        codes = random_split(len(paths), fractions, seed)
        split_info = random_split_info(seed, fractions, "image")
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
        metadata={"image_id": text(ids), **metadata},
        raw_labels=raw,
        raw_label_names=RAW_COLUMNS,
        group_unit="lesion_id" if "lesion_id" in metadata else None,
    )
    return apply_split_file(index, split_file) if split_file else index


def read_metadata(root: Path, ids: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The :data:`METADATA_COLUMNS` of ``ids`` from the optional metadata CSV (none when it is absent).

    Images the CSV does not list get blank cells; how many is reported.
    """
    meta_path = root / METADATA
    if not meta_path.is_file():
        return {}, []
    header, rows = read_csv(meta_path, ("image",), dataset=NAME, root=root, expected=EXPECTED)
    by_image = first_rows([row["image"] for _, row in rows], [row for _, row in rows])
    columns, problems = table_columns([by_image.get(i, {}) for i in ids], METADATA_COLUMNS, header, METADATA)
    unlisted = sum(1 for i in ids if i not in by_image)
    if unlisted:
        problems.append(f"{METADATA} does not list {unlisted} image(s); their metadata is blank")
    return columns, problems


def lesion_groups(root: Path, ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """The group key of every image: its ``lesion_id`` in the metadata CSV, or the image itself when blank.

    Images of one lesion (several photographs, mostly in the HAM10000 part) must not cross splits. Images
    the metadata does not list are their own group too; how many is reported.
    """
    meta_path = root / METADATA
    if not meta_path.is_file():
        raise FmcacheError(
            f"{NAME}: --split lesion needs {meta_path} (lesion_id per image, from the ISIC 2019 release); "
            "add it or use --split seed"
        )
    _, rows = read_csv(meta_path, ("image", "lesion_id"), dataset=NAME, root=root, expected=EXPECTED)
    lesion = {row["image"]: row["lesion_id"] for _, row in rows if row.get("image")}
    # Prefixes keep a lesion id from ever equalling an image id.
    groups = [f"lesion:{lesion[i]}" if lesion.get(i) else f"image:{i}" for i in ids]
    problems = []
    unlisted = sum(1 for i in ids if i not in lesion)
    if unlisted:
        problems.append(f"{METADATA} does not list {unlisted} image(s); each is its own group")
    return groups, problems
