"""CheXpert v1.0 (small or full): ``CheXpert-v1.0[-small]/train.csv`` and ``valid.csv``, 14 observations.

``--data-root`` may be the CheXpert folder itself or its parent. CSV ``Path`` values start with the CheXpert
folder's name (``CheXpert-v1.0-small/train/patient00001/...``); that first component is dropped and the rest is
resolved inside the CheXpert folder, so a renamed folder still works. The index's ``root`` is the CheXpert
folder either way, so both forms of ``--data-root`` give the same fingerprint.

Raw labels are the 14 observation columns as released (1, 0, -1, NaN for blank), before the uncertainty policy.
Metadata: ``patient`` (the ``patientNNNNN`` folder of Path, the bootstrap unit), ``study`` (``patientNNNNN/studyN``,
unique across patients), and the CSV's ``Sex``, ``Age``, ``Frontal/Lateral`` and ``AP/PA`` as ``sex``, ``age``,
``view`` and ``ap_pa``.

valid.csv (234 radiologist-labelled images) is never mixed in silently. With ``valid="report"`` (default) its
row count is reported and it is not used. With ``valid="test"`` it becomes the test split, and the part of
train.csv that would have been test goes to val instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache import labels as policies
from fmcache.data._io import cell, check_files_exist, layout_hint, merge_duplicates, read_csv
from fmcache.data.columns import first_rows, table_columns, text
from fmcache.data.index import (
    TEST,
    TRAIN,
    VAL,
    DatasetIndex,
    build_index,
    check_choice,
    check_fractions,
    check_seed,
    random_split,
)
from fmcache.data.splits import apply_split_file, parse_split
from fmcache.errors import FmcacheError

NAME = "chexpert"
OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
UNCERTAIN = policies.UNCERTAIN
SPLIT_MODES = ("seed", "patient")
VALID_MODES = ("report", "test")
EXPECTED = "CheXpert-v1.0-small/ (or CheXpert-v1.0/) with train.csv and valid.csv"

# Raw cell values: 1 positive, 0 negative, -1 uncertain, NaN blank (not mentioned in the report).
_RAW = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0, "": math.nan}
_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")
_PATIENT_STUDY = re.compile(r"(?:^|/)(patient\d+)(?:/(study\d+))?(?:/|$)")
METADATA_COLUMNS = {
    "sex": ("Sex", "text"),
    "age": ("Age", "number"),
    "view": ("Frontal/Lateral", "text"),
    "ap_pa": ("AP/PA", "text"),
}


def find_chexpert_dir(root: Path) -> Path:
    """The CheXpert folder: ``root`` itself when it holds train.csv, else root/CheXpert-v1.0[-small]."""
    found = [root / f for f in FOLDERS if (root / f / "train.csv").is_file()]
    if len(found) > 1:
        raise FmcacheError(
            f"{NAME}: {root} holds both {' and '.join(FOLDERS)}; pass --data-root {found[0]} or {found[1]}"
        )
    if found:
        return found[0]
    if (root / "train.csv").is_file():
        return root
    raise FmcacheError(
        f"{NAME}: no train.csv in {root} or in {root}/{{{','.join(FOLDERS)}}}; {layout_hint(root, NAME, EXPECTED)}"
    )


def _raw_value(value: str, path: Path, line: int, column: str) -> float:
    if value in _RAW:
        return _RAW[value]
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if number not in (1.0, 0.0, -1.0):
        raise FmcacheError(
            f"{path} line {line}: {column}={value!r} is not 1, 0, -1 or blank; fix the value or remove the row"
        )
    return number


def raw_row(row: dict[str, str], path: Path, line: int) -> list[float]:
    """The 14 observations of one CSV row as 1, 0, -1 or NaN (blank); another value is an error naming the cell.

    MIMIC-CXR-JPG's chexpert labels use the same columns and values, so its loader reads them with this too.
    """
    try:  # fast path: every cell is one of the usual spellings
        return [_RAW[row[c]] for c in OBSERVATIONS]
    except KeyError:
        return [_raw_value(row[c], path, line, c) for c in OBSERVATIONS]


def _image_path(value: str, chex_dir: Path, csv_path: Path) -> Path:
    parts = value.replace("\\", "/").split("/")
    if not parts[0] or ".." in parts:
        raise FmcacheError(f"{csv_path}: Path {value!r} must be relative to the CheXpert parent folder")
    if parts[0].startswith("CheXpert-v1.0"):
        parts = parts[1:]
    return chex_dir / "/".join(parts)


def _patient_id(value: str, csv_path: Path) -> str:
    match = _PATIENT.search(value.replace("\\", "/"))
    if match is None:
        raise FmcacheError(f"{csv_path}: no patientNNNNN folder in Path {value!r}; use the official CSV")
    return match.group(1)


def _read_rows(csv_path: Path, root: Path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray], list[str]]:
    """Sorted unique Path values, their raw (N, 14) labels, metadata columns and problem lines."""
    header, rows = read_csv(csv_path, ("Path", *OBSERVATIONS), dataset=NAME, root=root, expected=EXPECTED)
    keys = [cell(row, "Path", csv_path, line) for line, row in rows]
    raw = np.array([raw_row(row, csv_path, line) for line, row in rows], dtype=np.float32)
    unique, raw, problems = merge_duplicates(keys, raw, [line for line, _ in rows], csv_path)
    first = first_rows(keys, [row for _, row in rows])
    metadata, notes = table_columns([first[k] for k in unique], METADATA_COLUMNS, header, csv_path.name)
    return unique, raw, {**_patient_study(unique), **metadata}, problems + notes


def _patient_study(keys: Sequence[str]) -> dict[str, np.ndarray]:
    """``patient`` and ``study`` (``patientNNNNN/studyN``) columns from Path values (blank where absent)."""
    # One regex pass for both columns: this runs once per image (224k for CheXpert).
    found = [_PATIENT_STUDY.search(k.replace("\\", "/")) for k in keys]
    patients = [m.group(1) if m else "" for m in found]
    studies = [f"{m.group(1)}/{m.group(2)}" if m and m.group(2) else "" for m in found]
    return {"patient": text(patients), "study": text(studies)}


def apply_uncertainty(raw: np.ndarray, policy: str) -> np.ndarray:
    """Labels from raw values (1, 0, -1, NaN=blank) under an uncertainty policy (:mod:`fmcache.labels`)."""
    return policies.apply_uncertainty(raw, policy, OBSERVATIONS)


def seed_split(n: int) -> np.ndarray:
    """The seed's split of train.csv rows sorted by Path: the first int(0.2n)+15 are held out (first half
    val, second half test), the rest train. Consecutive rows share patients, so this is nearly patient-wise."""
    n_hold = int(0.2 * n) + 15
    if n_hold >= n:
        raise FmcacheError(
            f"{NAME}: train.csv has {n} rows, too few for the seed split (holds out {n_hold}); use split='patient'"
        )
    codes = np.full(n, TRAIN, dtype=np.int8)
    codes[: n_hold // 2] = VAL
    codes[n_hold // 2 : n_hold] = TEST
    return codes


def patient_split(keys: Sequence[str], csv_path: Path, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Strict patient-level split: sorted patient ids, seeded permutation, fractions of patients."""
    patients = [_patient_id(k, csv_path) for k in keys]
    unique = sorted(set(patients))
    code_of = dict(zip(unique, random_split(len(unique), fractions, seed), strict=True))
    return np.array([code_of[p] for p in patients], dtype=np.int8)


def load_chexpert(
    root: Path,
    *,
    uncertain: str = "zeros",
    split: str = "seed",
    valid: str = "report",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> DatasetIndex:
    """14-label CheXpert from train.csv, ordered by Path (see the module docstring for valid.csv).

    ``uncertain``: "zeros" | "ones" | "ignore" (see :func:`apply_uncertainty`). ``split``: "seed" (see
    :func:`seed_split`), "patient" (``fractions`` of patients by ``seed``) or "file:FILE.csv".
    ``valid``: "report" | "test".
    """
    check_choice(uncertain, UNCERTAIN, "uncertain", NAME)
    mode, split_file = parse_split(split, SPLIT_MODES, NAME)
    check_choice(valid, VALID_MODES, "valid", NAME)
    seed, fractions = check_seed(seed), check_fractions(fractions)
    chex_dir = find_chexpert_dir(root)
    train_csv, valid_csv = chex_dir / "train.csv", chex_dir / "valid.csv"
    keys, raw, metadata, problems = _read_rows(train_csv, root)
    if mode == "file":
        codes = np.full(len(keys), TRAIN, dtype=np.int8)  # replaced by the file's split below
    elif mode == "seed":
        codes = seed_split(len(keys))
    else:
        codes = patient_split(keys, train_csv, fractions, seed)
    paths = [_image_path(k, chex_dir, train_csv) for k in keys]
    check_files_exist(paths, str(train_csv), f"Path values are resolved inside {chex_dir}")
    if valid == "test":
        codes[codes == TEST] = VAL  # valid.csv takes the test role; train.csv's test part is not wasted
        valid_keys, valid_raw, valid_metadata, valid_problems = _read_rows(valid_csv, root)
        valid_paths = [_image_path(k, chex_dir, valid_csv) for k in valid_keys]
        check_files_exist(valid_paths, str(valid_csv), f"Path values are resolved inside {chex_dir}")
        paths += valid_paths
        raw = np.concatenate([raw, valid_raw])
        metadata = _concat_columns(metadata, valid_metadata)
        codes = np.concatenate([codes, np.full(len(valid_keys), TEST, dtype=np.int8)])
        problems += valid_problems
    else:
        problems.append(_valid_note(valid_csv))
    split_info = {"mode": mode, "valid": valid, "order": "Path"}
    if mode == "patient":
        split_info.update(seed=seed, fractions=list(fractions))
    # The CheXpert folder is the index root whichever form --data-root took, so fingerprints agree.
    index = build_index(
        name=NAME,
        root=chex_dir,
        paths=paths,
        labels=apply_uncertainty(raw, uncertain),
        split=codes,
        class_names=OBSERVATIONS,
        multilabel=True,
        split_info=split_info,
        options={"uncertain": uncertain},
        problems=problems,
        metadata=metadata,
        raw_labels=raw,
        raw_label_names=OBSERVATIONS,
        group_unit="patient",
    )
    return apply_split_file(index, split_file) if split_file else index


def _concat_columns(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Columns of train.csv then valid.csv; a column only one file has is left out."""
    return {name: np.concatenate([first[name], second[name]]) for name in first if name in second}


def _valid_note(valid_csv: Path) -> str:
    if not valid_csv.is_file():
        return f"{valid_csv} not found (it is not used unless valid='test')"
    with open(valid_csv, encoding="utf-8-sig") as handle:
        n_rows = max(sum(1 for line in handle if line.strip()) - 1, 0)
    return f"valid.csv ({n_rows} images) is not used; pass valid='test' to make it the test split"
