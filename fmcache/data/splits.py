"""Split modes shared by the loaders: the seed's row-shuffle split, grouped splits and exported split files.

``--split seed`` (APTOS, ISIC) reproduces ``BaseSet.get_validation_ids`` of the seed (joanaapa/Foundation-Medical
and sajjad-sh33/Medical-Transfer-Learning, ``defaults/bases.py``): the row positions of the label CSV, in file
order, shuffled by ``random.Random(42).shuffle``; the first ``int(N × val_size)`` are held out, the first
``int(len/2)`` of those are val and the rest test, everything else is train. A ``val_ids.json`` in the data root
(written by the seed on its first run) replaces the shuffle, as in the seed.

``--split file:FILE.csv`` reads a split written by :func:`write_split_csv` (``fmcache datasets --export-split``):
columns exactly ``id,path,split,label``, one row per sample.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from fmcache.data.index import EXTERNAL_NOTE, SPLITS, TEST, TRAIN, VAL, DatasetIndex, random_split
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_text

FILE_PREFIX = "file:"
FILE_COLUMNS = ("id", "path", "split", "label")
VAL_IDS = "val_ids.json"


# ---------------------------------------------------------------------------------------------------------
# Mode parsing


def parse_split(value: object, modes: Sequence[str], dataset: str) -> tuple[str, Path | None]:
    """(mode, file) for a ``split`` option: one of ``modes``, or ``file:FILE.csv`` (mode "file").

    An unknown mode is an error listing the valid ones for this dataset.
    """
    if isinstance(value, str) and value.startswith(FILE_PREFIX):
        name = value[len(FILE_PREFIX) :].strip()
        if not name:
            raise FmcacheError(f"{dataset}: split='file:' needs a file name, e.g. --split file:split.csv")
        return "file", Path(name).expanduser()
    if value not in modes:
        raise FmcacheError(
            f"{dataset}: split={value!r} is not valid; choose one of {', '.join(modes)} or file:FILE.csv "
            "(a file written by `fmcache datasets --export-split`)"
        )
    return str(value), None


# ---------------------------------------------------------------------------------------------------------
# The seed's split


def seed_holdout(n: int, val_size: float, seed: int = 42) -> tuple[list[int], list[int]]:
    """(train, held-out) row positions exactly as the seed's ``get_validation_ids`` makes them without a file."""
    positions = list(range(n))
    random.Random(seed).shuffle(positions)
    n_hold = int(n * val_size)
    return positions[n_hold:], positions[:n_hold]


def _int_list(value: object, what: str, path: Path) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise FmcacheError(f"{path}: {what} must be a list of integer row indices; fix or delete the file")
    return value


def read_val_ids(path: Path, n: int, val_size: float) -> tuple[list[int], list[int]] | None:
    """(train, held-out) row positions from the seed's ``val_ids.json``, or None when the seed would ignore it.

    The seed accepts a dict ``{"train_split": [...], "val_split": [...]}`` (what it writes) or a list of held-out
    positions (train = the rest). When the sizes differ from ``int(n × val_size)`` held out, it ignores the file
    and shuffles again (overwriting it); None reproduces that. Contents the seed would silently misuse
    (out-of-range, repeated or overlapping indices) are errors here.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FmcacheError(f"cannot read {path}: {exc}; fix it or delete it to use the seed's shuffle") from exc
    if isinstance(data, dict):
        missing = [k for k in ("train_split", "val_split") if k not in data]
        if missing:
            raise FmcacheError(f"{path}: lacks key(s) {', '.join(missing)}; the seed writes train_split and val_split")
        held = _int_list(data["val_split"], "val_split", path)
        train = _int_list(data["train_split"], "train_split", path)
    elif isinstance(data, list):
        held = _int_list(data, "the list", path)
        train = sorted(set(range(n)) - set(held))
    else:
        raise FmcacheError(f"{path}: expected a dict with train_split/val_split or a list of held-out row indices")
    every = train + held
    bad = [i for i in every if not 0 <= i < n]
    if bad:
        raise FmcacheError(f"{path}: row index {bad[0]} is outside 0..{n - 1}; the file belongs to other data")
    if len(set(every)) != len(every):
        raise FmcacheError(f"{path}: some row indices repeat or are in both splits; fix or delete the file")
    n_hold = int(n * val_size)
    if len(held) != n_hold or len(train) != n - n_hold:
        return None
    return train, held


def seed_row_codes(n: int, val_size: float, root: Path, seed: int = 42) -> tuple[np.ndarray, dict, list[str]]:
    """Split codes per CSV row (file order), the split_info entries and problem lines of the seed's split."""
    info: dict = {"mode": "seed", "holdout": val_size, "seed": seed}
    problems: list[str] = []
    json_path = root / VAL_IDS
    found = read_val_ids(json_path, n, val_size) if json_path.is_file() else None
    # Rows not held out are train (read_val_ids checked that train_split is exactly the rest).
    if found is not None:
        _, held = found
        info["source"] = VAL_IDS
        info["val_ids_sha256"] = hashlib.sha256(json_path.read_bytes()).hexdigest()
    else:
        _, held = seed_holdout(n, val_size, seed)
        info["source"] = f"random.Random({seed}).shuffle of the CSV rows"
        if json_path.is_file():
            problems.append(
                f"{VAL_IDS} ignored: its sizes differ from {int(n * val_size)} held out of {n} rows "
                "(the seed ignores and overwrites it too)"
            )
    codes = np.full(n, TRAIN, dtype=np.int8)
    half = int(len(held) / 2)
    codes[held[:half]] = VAL
    codes[held[half:]] = TEST
    return codes, info, problems


def require_unique_rows(keys: Sequence[str], lines: Sequence[int], source: Path, dataset: str) -> None:
    """The seed's split is defined over CSV rows; a repeated image would be two samples there, one here."""
    first: dict[str, int] = {}
    for key, line in zip(keys, lines, strict=True):
        if key in first:
            raise FmcacheError(
                f"{dataset}: {key!r} appears on lines {first[key]} and {line} of {source}; the seed split is "
                "defined over CSV rows, so remove the repeated row or pass --split random"
            )
        first[key] = line


def rows_to_samples(row_codes: np.ndarray, row_keys: Sequence[str], sample_keys: Sequence[str]) -> np.ndarray:
    """Codes per sample (canonical order) from codes per CSV row (file order), matched by key."""
    position = {key: i for i, key in enumerate(sample_keys)}
    codes = np.empty(len(sample_keys), dtype=np.int8)
    codes[[position[k] for k in row_keys]] = row_codes
    return codes


# ---------------------------------------------------------------------------------------------------------
# Grouped splits


def group_split(groups: Sequence[str], fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split codes per sample such that each group lies in one split.

    Fractions apply to groups: the sorted unique group keys get :func:`random_split` codes (seeded
    permutation), and every sample takes its group's code.
    """
    unique = sorted(set(groups))
    code_of = dict(zip(unique, random_split(len(unique), fractions, seed), strict=True))
    return np.array([code_of[g] for g in groups], dtype=np.int8)


# ---------------------------------------------------------------------------------------------------------
# Exported split files


def _format_label(index: DatasetIndex, i: int) -> str:
    if not index.multilabel:
        return str(int(index.labels[i]))
    return ";".join("" if math.isnan(v) else str(int(v)) for v in index.labels[i].tolist())


def split_csv_text(index: DatasetIndex) -> str:
    """The ``id,path,split,label`` CSV of an index: id = global position, path relative to the root."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FILE_COLUMNS)
    for i, path in enumerate(index.paths):
        writer.writerow([i, index.relative(path), SPLITS[index.split[i]], _format_label(index, i)])
    return buffer.getvalue()


def write_split_csv(index: DatasetIndex, path: Path) -> Path:
    """Write the split of ``index`` to ``path`` atomically (see :func:`split_csv_text`)."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise FmcacheError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    atomic_write_text(path, split_csv_text(index))
    return path


def _parse_label(text: str, index: DatasetIndex, where: str) -> np.ndarray:
    if not index.multilabel:
        try:
            return np.array(int(text), dtype=np.int64)
        except ValueError:
            raise FmcacheError(f"{where}: label {text!r} is not a class index; use the exported file") from None
    cells = text.split(";")
    values = {"": math.nan, "0": 0.0, "1": 1.0}
    if len(cells) != index.num_classes or any(c not in values for c in cells):
        raise FmcacheError(
            f"{where}: label {text!r} is not {index.num_classes} ';'-joined 0/1/blank values; use the exported file"
        )
    return np.array([values[c] for c in cells], dtype=np.float32)


def read_split_csv(path: Path, index: DatasetIndex) -> np.ndarray:
    """Split codes for ``index`` from a split file, checked against the index sample by sample.

    Unknown paths, samples the file lacks, repeated paths, ids that are not the sample's position, split
    names other than train/val/test and labels that differ from the dataset's are errors.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            rows = [(reader.line_num, cells) for cells in reader if cells]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FmcacheError(f"cannot read split file {path}: {exc}; pass an existing CSV after file:") from exc
    if tuple(header) != FILE_COLUMNS:
        raise FmcacheError(
            f"split file {path}: columns are {','.join(header) or 'none'}, expected exactly {','.join(FILE_COLUMNS)}"
        )
    position = {index.relative(p): i for i, p in enumerate(index.paths)}
    codes = np.full(len(index), -1, dtype=np.int8)
    for line, cells in rows:
        where = f"split file {path} line {line}"
        if len(cells) != len(FILE_COLUMNS):
            raise FmcacheError(f"{where}: {len(cells)} cells, expected 4 ({','.join(FILE_COLUMNS)})")
        sid, rel, split, label = (c.strip() for c in cells)
        if rel not in position:
            raise FmcacheError(f"{where}: path {rel!r} is not a sample of {index.name} at {index.root}")
        i = position[rel]
        if codes[i] >= 0:
            raise FmcacheError(f"{where}: path {rel!r} is listed twice; keep one row per sample")
        if sid != str(i):
            raise FmcacheError(f"{where}: id {sid!r} for {rel!r}, but that sample is id {i}; re-export the split")
        if split not in SPLITS:
            raise FmcacheError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if not np.array_equal(_parse_label(label, index, where), index.labels[i], equal_nan=index.multilabel):
            raise FmcacheError(
                f"{where}: label {label!r} of {rel!r} disagrees with the dataset ({_format_label(index, i)!r}); "
                "the file was made from other labels or options"
            )
        codes[i] = SPLITS.index(split)
    absent = np.flatnonzero(codes < 0)
    if len(absent):
        raise FmcacheError(
            f"split file {path} lacks {len(absent)} of {len(index)} samples (e.g. "
            f"{index.relative(index.paths[absent[0]])}); export the split of the same data again"
        )
    return codes


def apply_split_file(index: DatasetIndex, path: Path) -> DatasetIndex:
    """``index`` with its split read from ``path``; split_info names the file and its sha256."""
    codes = read_split_csv(path, index)
    info = {"mode": "file", "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    # Keys that describe the data rather than the split the file replaces.
    info.update({k: v for k, v in index.split_info.items() if k in ("order", "task", "valid")})
    extra = [f"the {s} split is empty" for code, s in enumerate(SPLITS) if not np.any(codes == code)]
    kept = [p for p in index.problems if not p.endswith("split is empty") and p != EXTERNAL_NOTE]
    return replace(index, split=codes, split_info=info, problems=(*kept, *extra))
