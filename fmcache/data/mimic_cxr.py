"""MIMIC-CXR-JPG 2.0.0 (Johnson et al., PhysioNet 2019): 377,110 chest X-rays of 65,379 patients with the 14
CheXpert observations labelled by the CheXpert labeler, CheXpert's task at another hospital (external validation).

Layout, from the PhysioNet release page: ``mimic-cxr-2.0.0-chexpert.csv.gz`` (``subject_id, study_id`` + the 14
observations with 1.0 / 0.0 / -1.0 / blank, one row per study), ``mimic-cxr-2.0.0-split.csv.gz`` (``dicom_id,
study_id, subject_id, split`` with train / validate / test, one row per image), optionally
``mimic-cxr-2.0.0-metadata.csv.gz`` (``dicom_id, ..., ViewPosition, ...``), and the images at
``files/p<first two digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg``. Uncompressed ``.csv`` copies work too.

Labels: a study's observations apply to each of its images, under the same ``uncertain`` policies as CheXpert
(:func:`fmcache.data.chexpert.apply_uncertainty`); images of a study without a label row are left out and counted.
Raw labels: the 14 columns as released. Metadata: ``image_id`` (dicom_id), ``patient`` (subject_id: the
bootstrap unit), ``study`` (study_id) and, with the metadata file, ``view`` (ViewPosition). No demographics: they
live in MIMIC-IV. Split: ``external`` (default), ``official`` (train / validate / test as released), ``random``
(``fractions`` of the patients) or ``file:FILE.csv``. Normalisation: none published, so the model's own (or
CheXpert's, for transfer). Grayscale, repeated to three channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, check_files_exist, layout_hint, read_csv
from fmcache.data.chexpert import OBSERVATIONS, UNCERTAIN, apply_uncertainty, raw_row
from fmcache.data.columns import text
from fmcache.data.external import external_index, parse_external_split
from fmcache.data.index import TEST, TRAIN, VAL, DatasetIndex, check_choice
from fmcache.errors import FmcacheError

NAME = "mimic_cxr"
CLASS_NAMES = OBSERVATIONS
PREFIX = "mimic-cxr-2.0.0-"
OFFICIAL = {"train": TRAIN, "validate": VAL, "test": TEST}
EXPECTED = f"{PREFIX}chexpert.csv.gz, {PREFIX}split.csv.gz and files/ (the MIMIC-CXR-JPG 2.0.0 release)"
GROUP_UNIT = "patient"
GRAYSCALE = True
SOURCE = "chexpert"
TO_SOURCE = {name: name for name in OBSERVATIONS}  # the same 14 observations, the same labeler


def release_file(root: Path, stem: str) -> Path | None:
    """``<PREFIX><stem>.csv.gz`` or ``.csv`` in root, None when neither exists."""
    found = [root / f"{PREFIX}{stem}{suffix}" for suffix in (".csv.gz", ".csv")]
    return next((path for path in found if path.is_file()), None)


def required_file(root: Path, stem: str) -> Path:
    """:func:`release_file`, or an error naming the file and the layout."""
    path = release_file(root, stem)
    if path is None:
        raise FmcacheError(f"{NAME}: {PREFIX}{stem}.csv.gz not found in {root}; {layout_hint(root, NAME, EXPECTED)}")
    return path


def _study_labels(path: Path, root: Path) -> dict[str, list[float]]:
    """Raw observations per study_id; a study listed twice with different values is an error."""
    _, rows = read_csv(path, ("study_id", *OBSERVATIONS), dataset=NAME, root=root, expected=EXPECTED)
    labels: dict[str, list[float]] = {}
    for line, row in rows:
        study, values = cell(row, "study_id", path, line), raw_row(row, path, line)
        known = labels.setdefault(study, values)
        if known is not values and not np.array_equal(known, values, equal_nan=True):
            raise FmcacheError(f"{path} line {line}: study {study} is listed twice with different labels")
    return labels


def _official(row: dict[str, str], path: Path, line: int) -> int:
    value = cell(row, "split", path, line)
    if value not in OFFICIAL:
        raise FmcacheError(f"{path} line {line}: split={value!r} is not one of {', '.join(OFFICIAL)}")
    return OFFICIAL[value]


def _images(root: Path, studies: dict[str, list[float]]) -> tuple[list[dict[str, str]], np.ndarray, list[str]]:
    """Rows of the split file for the labelled images (sorted by dicom_id), their official codes, problems."""
    path = required_file(root, "split")
    _, rows = read_csv(
        path, ("dicom_id", "study_id", "subject_id", "split"), dataset=NAME, root=root, expected=EXPECTED
    )
    by_id: dict[str, tuple[int, dict[str, str]]] = {}
    for line, row in rows:
        dicom = cell(row, "dicom_id", path, line)
        if by_id.setdefault(dicom, (line, row))[0] != line:
            raise FmcacheError(f"{path}: dicom_id {dicom} is on lines {by_id[dicom][0]} and {line}; keep one row")
    kept = sorted(i for i, (_, row) in by_id.items() if row["study_id"] in studies)
    if not kept:
        raise FmcacheError(f"{NAME}: no image of {path} has a study in the chexpert labels; check the files")
    left_out = len(by_id) - len(kept)
    problems = [f"{left_out} image(s) of studies without a label row left out"] if left_out else []
    official = np.array([_official(by_id[i][1], path, by_id[i][0]) for i in kept], dtype=np.int8)
    return [by_id[i][1] for i in kept], official, problems


def _image_path(root: Path, row: dict[str, str]) -> Path:
    subject = row["subject_id"]
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{row['study_id']}" / f"{row['dicom_id']}.jpg"


def _metadata(root: Path, rows: list[dict[str, str]]) -> dict[str, np.ndarray]:
    columns = {
        "image_id": text(r["dicom_id"] for r in rows),
        "patient": text(r["subject_id"] for r in rows),
        "study": text(r["study_id"] for r in rows),
    }
    path = release_file(root, "metadata")
    if path is not None:
        _, meta = read_csv(path, ("dicom_id", "ViewPosition"), dataset=NAME, root=root, expected=EXPECTED)
        views = {row["dicom_id"]: row["ViewPosition"] for _, row in meta}
        columns["view"] = text(views.get(r["dicom_id"], "") for r in rows)
    return columns


def load_mimic_cxr(
    root: Path,
    *,
    uncertain: str = "zeros",
    split: str = "external",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> DatasetIndex:
    """14-label MIMIC-CXR-JPG, one sample per image, ordered by dicom_id (see the module docstring)."""
    check_choice(uncertain, UNCERTAIN, "uncertain", NAME)
    mode, split_file = parse_external_split(split, NAME, official=True)
    studies = _study_labels(required_file(root, "chexpert"), root)
    rows, official, problems = _images(root, studies)
    paths = [_image_path(root, row) for row in rows]
    check_files_exist(paths, PREFIX + "split", "images live at files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg under the root")
    raw = np.array([studies[row["study_id"]] for row in rows], dtype=np.float32)
    return external_index(
        mode=mode,
        split_file=split_file,
        order="dicom_id",
        seed=seed,
        fractions=fractions,
        official=official,
        problems=problems,
        name=NAME,
        root=root,
        paths=paths,
        labels=apply_uncertainty(raw, uncertain),
        class_names=OBSERVATIONS,
        multilabel=True,
        options={"uncertain": uncertain},
        metadata=_metadata(root, rows),
        raw_labels=raw,
        raw_label_names=OBSERVATIONS,
        group_unit=GROUP_UNIT,
    )
