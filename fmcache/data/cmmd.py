"""The Chinese Mammography Database, CMMD (Cui et al. 2021, TCIA doi:10.7937/tcia.eqde-4b16): biopsy-confirmed
benign or malignant breasts of 1,775 patients, CBIS-DDSM's (TCIA layout) benign-vs-malignant task on digital
mammograms from another population (external validation).

Layout, from the TCIA collection page: the clinical sheet ``CMMD_clinicaldata_revision.xlsx`` (one row per
affected breast: ``ID1, LeftRight, Age, number, abnormality, classification, subtype``; classification Benign /
Malignant) and the NBIA download ``CMMD/<ID1>/<study>/<series>/1-N.dcm`` (the ``CMMD/`` folder may sit in a
``manifest-*/`` folder). Reading the .xlsx needs openpyxl; a CSV export of the sheet,
``CMMD_clinicaldata_revision.csv`` (comma or semicolon separated), is read without it and wins when both exist.
A file's breast comes from its DICOM header (ImageLaterality; the view from ViewPosition or ViewCodeSequence), so
every image of a breast with a clinical row is a sample; images of a breast without one (the unaffected side)
are skipped and counted. The paper counts 3,728 labelled mammograms.

Labels: classification, benign 0 / malignant 1 (the raw label is the text). Metadata: ``image_id`` (the DICOM
path below ``CMMD/`` without ``.dcm``), ``patient`` (ID1: the bootstrap unit), ``laterality`` (left/right),
``view`` (CC/MLO), ``age``, ``abnormality`` (calcification / mass / both) and ``subtype`` (molecular subtype,
malignant cases of the D2 part only). Split: ``external`` (default), ``random`` (``fractions`` of the patients)
or ``file:FILE.csv``. Normalisation: none published, so the model's own (or CBIS-DDSM's, for transfer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmcache.data._io import SHOW_MISSING, cell, layout_hint, read_csv, read_xlsx
from fmcache.data.columns import numbers, text
from fmcache.data.external import existing, external_index, parse_external_split
from fmcache.data.index import DatasetIndex
from fmcache.errors import FmcacheError

NAME = "cmmd"
CLASS_NAMES = ("benign", "malignant")
CLASSIFICATION = {"Benign": 0, "Malignant": 1}
SIDES = {"L": "left", "R": "right"}
CLINICAL = "CMMD_clinicaldata_revision"
EXPECTED = f"{CLINICAL}.xlsx (or .csv) and CMMD/<ID1>/.../*.dcm, the TCIA CMMD collection"
GROUP_UNIT = "patient"
GRAYSCALE = True
SOURCE = "cbis_ddsm"  # its TCIA layout: benign vs malignant
TO_SOURCE = {"benign": "benign", "malignant": "malignant"}
_VIEW_MEANINGS = {"cranio-caudal": "CC", "medio-lateral oblique": "MLO"}


@dataclass(frozen=True)
class _Breast:
    label: int
    row: dict[str, str]
    where: str


def _clinical_rows(root: Path) -> tuple[Path, list[tuple[int, dict[str, str]]]]:
    """(file, rows) of the clinical sheet: the CSV export when present, else the .xlsx."""
    required = ("ID1", "LeftRight", "classification")
    csv_path, xlsx_path = root / f"{CLINICAL}.csv", root / f"{CLINICAL}.xlsx"
    if csv_path.is_file():
        with open(csv_path, encoding="utf-8-sig") as handle:
            first = handle.readline()
        delimiter = ";" if ";" in first and "," not in first else ","
        return csv_path, read_csv(csv_path, required, dataset=NAME, root=root, expected=EXPECTED, delimiter=delimiter)[
            1
        ]
    return xlsx_path, read_xlsx(
        xlsx_path, required, dataset=NAME, root=root, expected=EXPECTED, alternative=csv_path.name
    )[1]


def _breasts(path: Path, rows: list[tuple[int, dict[str, str]]]) -> tuple[dict[tuple[str, str], _Breast], int]:
    """Labelled breasts by (ID1, L/R) and how many repeated rows merged; conflicting repeats are errors."""
    breasts: dict[tuple[str, str], _Breast] = {}
    merged = 0
    for line, row in rows:
        side, value = cell(row, "LeftRight", path, line), cell(row, "classification", path, line)
        if side not in SIDES or value not in CLASSIFICATION:
            bad = f"LeftRight={side!r}" if side not in SIDES else f"classification={value!r}"
            raise FmcacheError(f"{path} line {line}: {bad} is not one of L, R / Benign, Malignant; fix the row")
        key, breast = (cell(row, "ID1", path, line), side), _Breast(CLASSIFICATION[value], row, f"line {line}")
        other = breasts.setdefault(key, breast)
        if other is not breast:
            if other.label != breast.label:
                raise FmcacheError(
                    f"{path}: {key[0]} {key[1]} is on {other.where} and line {line} with different labels"
                )
            merged += 1
    return breasts, merged


def _dicom_side_view(path: Path) -> tuple[str, str]:
    """(ImageLaterality, CC/MLO or "") from a DICOM header."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises several types for a damaged or non-DICOM file
        raise FmcacheError(f"{NAME}: cannot read the DICOM header of {path}: {exc}; re-download the file") from exc
    side = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")).upper()
    view = str(ds.get("ViewPosition", "") or "").upper()
    if not view and ds.get("ViewCodeSequence"):
        view = _VIEW_MEANINGS.get(str(ds.ViewCodeSequence[0].get("CodeMeaning", "")).lower(), "")
    if side not in SIDES:
        raise FmcacheError(f"{NAME}: {path} has no ImageLaterality (L or R) in its header; use the TCIA files")
    return side, view


def _dicom_base(root: Path) -> Path:
    bases = existing([root / "CMMD", *sorted(root.glob("manifest-*/CMMD"))])
    if len(bases) != 1:
        what = "no CMMD/ folder" if not bases else f"{len(bases)} CMMD/ folders ({', '.join(map(str, bases))})"
        raise FmcacheError(f"{NAME}: {what} in {root}; {layout_hint(root, NAME, EXPECTED)}")
    return bases[0]


@dataclass(frozen=True)
class _Image:
    path: Path
    patient: str
    side: str
    view: str
    breast: _Breast


def _images(base: Path, breasts: dict[tuple[str, str], _Breast], sheet: Path) -> tuple[list[_Image], int]:
    """The DICOM files of labelled breasts (sorted by path) and how many files belong to unlabelled breasts."""
    images, unlabelled = [], 0
    for path in sorted(base.rglob("*.dcm")):
        patient = path.relative_to(base).parts[0]
        side, view = _dicom_side_view(path)
        breast = breasts.get((patient, side))
        if breast is None:
            unlabelled += 1
        else:
            images.append(_Image(path, patient, side, view, breast))
    _check_every_breast_found(breasts, {(i.patient, i.side) for i in images}, sheet, base)
    return images, unlabelled


def _metadata(images: list[_Image], base: Path) -> tuple[dict[str, np.ndarray], int]:
    """The metadata columns (module docstring) and how many ages did not parse."""
    ages, bad = numbers(i.breast.row.get("Age", "") for i in images)
    return {
        "image_id": text(i.path.relative_to(base).with_suffix("").as_posix() for i in images),
        "patient": text(i.patient for i in images),
        "laterality": text(SIDES[i.side] for i in images),
        "view": text(i.view for i in images),
        "age": ages,
        "abnormality": text(i.breast.row.get("abnormality", "") for i in images),
        "subtype": text(i.breast.row.get("subtype", "") for i in images),
    }, bad


def load_cmmd(
    root: Path,
    *,
    split: str = "external",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> DatasetIndex:
    """Benign vs malignant CMMD mammograms, ordered by DICOM path (see the module docstring)."""
    mode, split_file = parse_external_split(split, NAME, official=False)
    sheet, rows = _clinical_rows(root)
    breasts, merged = _breasts(sheet, rows)
    base = _dicom_base(root)
    images, unlabelled = _images(base, breasts, sheet)
    metadata, bad_ages = _metadata(images, base)
    problems = [
        *([f"{unlabelled} DICOM file(s) of breasts without a clinical row skipped"] if unlabelled else []),
        *([f"{sheet.name}: merged {merged} repeated row(s) with identical labels"] if merged else []),
        *([f"{sheet.name}: {bad_ages} Age value(s) are not numbers; read as missing"] if bad_ages else []),
    ]
    return external_index(
        mode=mode,
        split_file=split_file,
        order="path",
        seed=seed,
        fractions=fractions,
        problems=problems,
        name=NAME,
        root=root,
        paths=[i.path for i in images],
        labels=np.array([i.breast.label for i in images]),
        class_names=CLASS_NAMES,
        multilabel=False,
        metadata=metadata,
        raw_labels=np.array([[i.breast.row["classification"]] for i in images]),
        raw_label_names=("classification",),
        group_unit=GROUP_UNIT,
    )


def _check_every_breast_found(
    breasts: dict[tuple[str, str], _Breast], found: set[tuple[str, str]], sheet: Path, base: Path
) -> None:
    missing = [f"{pid} {side}" for pid, side in breasts if (pid, side) not in found]
    if missing:
        raise FmcacheError(
            f"{NAME}: {len(missing)} of {len(breasts)} breasts in {sheet.name} have no DICOM file under {base} "
            f"(e.g. {', '.join(missing[:SHOW_MISSING])}); download the whole collection or fix --data-root"
        )
