"""Bring-your-own data: a CSV manifest (``csv``) or class folders (``imagefolder``)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, check_files_exist, detect_layouts, merge_duplicates, read_csv
from fmcache.data.columns import numbers, text
from fmcache.data.images import IMAGE_EXTENSIONS
from fmcache.data.index import (
    SPLITS,
    DatasetIndex,
    build_index,
    check_fractions,
    check_seed,
    random_split,
    random_split_info,
)
from fmcache.data.splits import apply_split_file, parse_split
from fmcache.errors import FmcacheError

# "auto": the layout's own split (split column / split folders) when present, else a seeded random split.
SPLIT_MODES = ("auto",)

# Bring-your-own metadata: a CSV's other columns (csv), or an optional metadata.csv beside the class folders
# (imagefolder), become per-sample metadata (report --by, subgroup tables); the first of UNIT_COLUMNS present names
# the independent unit the bootstrap resamples (one patient's images are not independent).
METADATA_CSV = "metadata.csv"
UNIT_COLUMNS = ("patient_id", "patient", "lesion_id", "subject_id", "subject")

_INT = re.compile(r"[+-]?\d+")
_MULTI_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": math.nan, "nan": math.nan, "NaN": math.nan}


# ---------------------------------------------------------------------------------------------------------
# metadata


def user_metadata(
    header: Sequence[str], rows: Sequence[dict[str, str]], skip: Sequence[str]
) -> tuple[dict[str, np.ndarray], str | None]:
    """Metadata columns from ``rows`` (one per sample, in index order; ``{}`` for a sample without one): every
    column of ``header`` not in ``skip``, numeric where every non-blank value is a number (NaN when blank), text
    otherwise; and the unit column (text, see :data:`UNIT_COLUMNS`), or None."""
    columns: dict[str, np.ndarray] = {}
    unit = next((c for c in UNIT_COLUMNS if c in header and c not in skip), None)
    for name in header:
        if name in skip or not name:
            continue
        values = [row.get(name, "") for row in rows]
        parsed, bad = numbers(values)
        numeric = name != unit and bad == 0 and not np.isnan(parsed).all()
        columns[name] = parsed if numeric else text(values)
    return columns, unit


def _folder_metadata(root: Path, paths: Sequence[Path]) -> tuple[dict[str, np.ndarray], str | None, list[str]]:
    """imagefolder's optional ``root/metadata.csv`` (a ``path`` column relative to ``root``, then any columns),
    matched to the images by path; images it does not list get blank values, rows naming no image are counted."""
    csv_path = root / METADATA_CSV
    if not csv_path.is_file():
        return {}, None, []
    expected = f"{METADATA_CSV} with a path column (relative to {root}) and metadata columns"
    header, rows = read_csv(csv_path, ("path",), dataset="imagefolder", root=root, expected=expected)
    by_path: dict[str, dict[str, str]] = {}
    for line, row in rows:
        key = Path(cell(row, "path", csv_path, line)).as_posix()
        if key in by_path:
            raise FmcacheError(f"{csv_path} line {line}: {key!r} is listed twice; keep one row per image")
        by_path[key] = row
    keys = [path.relative_to(root).as_posix() for path in paths]
    problems = []
    unmatched = len(by_path) - len(set(keys) & set(by_path))
    if unmatched:
        problems.append(f"{METADATA_CSV}: {unmatched} row(s) name no image under {root}; ignored")
    missing = sum(key not in by_path for key in keys)
    if missing:
        problems.append(f"{METADATA_CSV} lists no row for {missing} image(s); their metadata is blank")
    columns, unit = user_metadata(header, [by_path.get(key, {}) for key in keys], ("path",))
    return columns, unit, problems


# ---------------------------------------------------------------------------------------------------------
# csv


def _label_columns(value: object) -> list[str] | None:
    if value is None:
        return None
    columns = [c.strip() for c in value.split(",")] if isinstance(value, str) else [str(c) for c in value]  # type: ignore[union-attr]
    if not columns or not all(columns) or len(set(columns)) != len(columns):
        raise FmcacheError(f"csv: label_columns must be distinct non-empty column names, got {value!r}")
    return columns


def _single_labels(values: list[str], csv_path: Path, lines: list[int]) -> tuple[np.ndarray, list[str], list[str]]:
    """Class indices, class names and problems. Integers keep their value as the index (0..max); any other
    values are class names, indexed in sorted order."""
    problems: list[str] = []
    if all(_INT.fullmatch(v) for v in values):
        ints = [int(v) for v in values]
        negative = next((i for i, v in enumerate(ints) if v < 0), None)
        if negative is not None:
            raise FmcacheError(
                f"{csv_path} line {lines[negative]}: label {values[negative]!r} is negative; integer labels are 0..K-1"
            )
        names = [str(i) for i in range(max(ints) + 1)]
        absent = sorted(set(range(len(names))) - set(ints))
        if absent:
            problems.append(f"integer class(es) {', '.join(map(str, absent))} have no samples")
        labels = np.array(ints)
    else:
        names = sorted(set(values))
        position = {name: i for i, name in enumerate(names)}
        labels = np.array([position[v] for v in values])
    if len(names) < 2:
        raise FmcacheError(f"csv: {csv_path} has a single class ({names[0]!r}); classification needs at least two")
    return labels, names, problems


def _multi_value(value: str, csv_path: Path, line: int, column: str) -> float:
    if value not in _MULTI_VALUES:
        raise FmcacheError(
            f"{csv_path} line {line}: {column}={value!r} is not 1, 0 or blank (blank = unknown); fix the value"
        )
    return _MULTI_VALUES[value]


def _split_codes(rows: list[tuple[int, dict[str, str]]], csv_path: Path) -> np.ndarray:
    codes = []
    for line, row in rows:
        value = row.get("split", "")
        if value not in SPLITS:
            raise FmcacheError(f"{csv_path} line {line}: split={value!r} is not one of {', '.join(SPLITS)}")
        codes.append(SPLITS.index(value))
    return np.array(codes, dtype=np.int64)


def load_csv(
    root: Path,
    *,
    csv: str = "labels.csv",
    label_columns: Sequence[str] | str | None = None,
    split: str = "auto",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> DatasetIndex:
    """A CSV manifest ``root/<csv>`` with a ``path`` column (relative to the CSV's folder, or absolute).

    Single-label: a ``label`` column of integers (the value is the class index) or class names (sorted).
    Multi-label: ``label_columns`` names the 0/1 columns, blank meaning unknown (NaN). An optional ``split``
    column (train/val/test) fixes the split; otherwise ``fractions`` by ``seed`` over rows sorted by path. Any other
    column is per-sample metadata; ``patient_id`` (or ``patient``, ``lesion_id``, ...) names the bootstrap's unit.
    ``split="file:FILE.csv"`` replaces either with an exported split.
    """
    _, split_file = parse_split(split, SPLIT_MODES, "csv")
    seed, fractions = check_seed(seed), check_fractions(fractions)
    columns = _label_columns(label_columns)
    csv_path = root / csv
    expected = f"{csv} with columns path and label (or label_columns)"
    header, rows = read_csv(csv_path, ("path", *(columns or ["label"])), dataset="csv", root=root, expected=expected)
    lines = [line for line, _ in rows]
    keys = [cell(row, "path", csv_path, line) for line, row in rows]
    problems: list[str] = []
    if columns:
        labels = np.array(
            [[_multi_value(row[c], csv_path, line, c) for c in columns] for line, row in rows], dtype=np.float32
        )
        names = columns
    else:
        labels, names, problems = _single_labels([cell(r, "label", csv_path, n) for n, r in rows], csv_path, lines)
    has_split = "split" in header
    codes = _split_codes(rows, csv_path) if has_split else np.zeros(len(rows), dtype=np.int64)
    # Merge on (labels, split) together, so a path listed in two splits is a conflict.
    combined = np.column_stack([labels, codes]).astype(labels.dtype)
    first_row: dict[str, dict[str, str]] = {}
    for key, (_, row) in zip(keys, rows, strict=True):
        first_row.setdefault(key, row)
    keys, combined, merged = merge_duplicates(keys, combined, lines, csv_path)
    metadata, unit = user_metadata(header, [first_row[k] for k in keys], ("path", "split", *(columns or ["label"])))
    labels = combined[:, :-1] if columns else combined[:, 0]
    codes = combined[:, -1].astype(np.int8)
    paths = [csv_path.parent / k for k in keys]
    check_files_exist(paths, str(csv_path), "paths in the CSV are relative to the CSV's folder")
    if has_split:
        split_info = {"mode": "column", "column": "split", "order": "path"}
    else:
        codes = random_split(len(paths), fractions, seed)
        split_info = random_split_info(seed, fractions, "path")
    index = build_index(
        name="csv",
        root=root,
        paths=paths,
        labels=labels,
        split=codes,
        class_names=names,
        multilabel=bool(columns),
        split_info=split_info,
        options={"csv": csv, "label_columns": columns},
        problems=problems + merged,
        metadata=metadata,
        group_unit=unit,
    )
    return apply_split_file(index, split_file) if split_file else index


# ---------------------------------------------------------------------------------------------------------
# imagefolder


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_classes(folder: Path) -> tuple[dict[str, list[Path]], int]:
    """Images below each class folder of ``folder`` (recursively), and how many other files were ignored."""
    classes: dict[str, list[Path]] = {}
    ignored = sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != METADATA_CSV)
    for class_dir in _visible_dirs(folder):
        images = []
        for path in class_dir.rglob("*"):
            if any(part.startswith(".") for part in path.relative_to(class_dir).parts) or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                ignored += 1
        classes[class_dir.name] = images
    return classes, ignored


def _split_folders(root: Path) -> list[Path] | None:
    """[train, val, test] folders when root uses split folders, None when it holds class folders directly."""
    dirs = _visible_dirs(root)
    if not any(d.name in SPLITS for d in dirs):
        return None
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    others = [d.name for d in dirs if d.name not in SPLITS]
    if missing or others:
        what = f"lacks {', '.join(missing)}/" if missing else f"also holds {', '.join(others)}/"
        raise FmcacheError(
            f"imagefolder: {root} has split folders but {what}; use either <class>/ folders or train/, val/ and "
            "test/ each with <class>/ folders"
        )
    return [root / s for s in SPLITS]


def _folder_samples(root: Path) -> tuple[list[tuple[Path, str, int]], list[str], int]:
    """(path, class, split code or -1) samples, class names, ignored-file count."""
    folders = _split_folders(root)
    samples: list[tuple[Path, str, int]] = []
    names: set[str] = set()
    ignored = 0
    for code, folder in enumerate(folders) if folders else [(-1, root)]:
        classes, n_ignored = _scan_classes(folder)
        ignored += n_ignored
        names.update(classes)
        samples += [(path, name, code) for name, paths in classes.items() for path in paths]
    return samples, sorted(names), ignored


def load_imagefolder(
    root: Path, *, split: str = "auto", seed: int = 42, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> DatasetIndex:
    """Class folders ``root/<class>/...`` (split ``fractions`` by ``seed``) or ``root/{train,val,test}/<class>/...``.

    Class names are the sorted folder names; images are found recursively by extension and ordered by path.
    ``split="file:FILE.csv"`` replaces the split with an exported one. An optional ``root/metadata.csv`` (``path``
    relative to root, then any columns) gives per-image metadata; ``patient_id`` (or ``patient``, ...) is the unit.
    """
    _, split_file = parse_split(split, SPLIT_MODES, "imagefolder")
    seed, fractions = check_seed(seed), check_fractions(fractions)
    known = detect_layouts(root)
    if known:
        raise FmcacheError(f"imagefolder: {root} looks like {known[0]} data; use --dataset {known[0]}")
    samples, names, ignored = _folder_samples(root)
    if not samples:
        raise FmcacheError(f"imagefolder: no images under {root}/<class>/; expected <class>/ folders of images")
    if len(names) < 2:
        raise FmcacheError(
            f"imagefolder: {root} has a single class folder ({names[0]!r}); point --data-root at the folder "
            "that holds one folder per class"
        )
    samples.sort(key=lambda s: s[0].relative_to(root).as_posix())
    position = {name: i for i, name in enumerate(names)}
    labels = np.array([position[name] for _, name, _ in samples])
    counts = np.bincount(labels, minlength=len(names))
    problems = [f"class folder {names[i]!r} holds no images" for i in np.flatnonzero(counts == 0)]
    if ignored:
        problems.append(f"ignored {ignored} file(s) that are not images or not inside a class folder")
    paths = [path for path, _, _ in samples]
    metadata, unit, found = _folder_metadata(root, paths)
    problems += found
    if samples[0][2] >= 0:
        codes = np.array([code for _, _, code in samples])
        split_info = {"mode": "folders", "order": "path"}
    else:
        codes = random_split(len(samples), fractions, seed)
        split_info = random_split_info(seed, fractions, "path")
    index = build_index(
        name="imagefolder",
        root=root,
        paths=paths,
        labels=labels,
        split=codes,
        class_names=names,
        multilabel=False,
        split_info=split_info,
        problems=problems,
        metadata=metadata,
        group_unit=unit,
    )
    return apply_split_file(index, split_file) if split_file else index
