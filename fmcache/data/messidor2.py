"""Messidor-2 with the adjudicated grades of Krause et al. (Ophthalmology 2018): diabetic-retinopathy grades
0-4, APTOS 2019's task on other cameras and patients (external validation).

Layout, from the ADCIS release page and the Kaggle "Messidor-2 DR grades" set (google-brain/messidor2-dr-grades):
``IMAGES/`` holds the 1,748 fundus photographs (``20051020_43808_0100_PP.png`` from Messidor, ``IM00xxxx.JPG``
from Brest); ``messidor_data.csv`` (Kaggle) has ``image_id, adjudicated_dr_grade, adjudicated_dme,
adjudicated_gradable``. ADCIS's optional ``messidor-2.csv`` (semicolon-separated ``left;right``) pairs the two
eyes of each examination. Image names are matched ignoring case when needed (the CSV says ``.jpg`` where the
files say ``.JPG``); how many is reported.

Images graded ungradable (``adjudicated_gradable`` = 0) are left out and counted; a blank grade on a gradable
image is an error. Labels: ``adjudicated_dr_grade`` (also the raw label). Metadata: ``image_id`` (the file name
without extension), ``dme`` (``adjudicated_dme``) and, with ``messidor-2.csv``, ``exam`` (the examination, named
by its left image): the bootstrap unit, since the two eyes of one patient are not independent. Without it every
image is its own unit (the file names do not tell the pairs apart: both eyes have different numbers). Split:
``external`` (default), ``random`` (``fractions`` of the exams) or ``file:FILE.csv``. Normalisation: none
published, so the model's own (or APTOS's, for transfer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, layout_hint, merge_duplicates, read_csv
from fmcache.data.aptos import CLASS_NAMES, parse_class_int
from fmcache.data.columns import first_rows, table_columns, text
from fmcache.data.external import FileTable, external_index, parse_external_split
from fmcache.data.index import DatasetIndex
from fmcache.errors import FmcacheError

NAME = "messidor2"
GRADES_FILE = "messidor_data.csv"
PAIRS_FILE = "messidor-2.csv"
IMAGE_DIR = "IMAGES"
EXPECTED = f"{IMAGE_DIR}/ (ADCIS) and {GRADES_FILE} (Krause et al.'s adjudicated grades)"
GROUP_UNIT = "exam"
GRAYSCALE = False
SOURCE = "aptos2019"
TO_SOURCE = {name: name for name in CLASS_NAMES}  # the same ICDR grades 0-4
METADATA_COLUMNS = {"dme": ("adjudicated_dme", "number")}


def _gradable(row: dict[str, str], path: Path, line: int) -> bool:
    value = cell(row, "adjudicated_gradable", path, line)
    if value not in ("0", "1", "0.0", "1.0"):
        raise FmcacheError(f"{path} line {line}: adjudicated_gradable={value!r} is not 0 or 1; fix the row")
    return float(value) == 1.0


def _grade(row: dict[str, str], path: Path, line: int) -> int:
    value = row.get("adjudicated_dr_grade", "")
    if not value:
        raise FmcacheError(
            f"{path} line {line}: adjudicated_dr_grade is blank on a gradable image; fix the row or set "
            "adjudicated_gradable=0"
        )
    grade = value[:-2] if value.endswith(".0") else value  # pandas exports write 2.0
    return parse_class_int(grade, len(CLASS_NAMES), path, line, "adjudicated_dr_grade")


def read_exams(root: Path) -> tuple[dict[str, str], list[str]]:
    """Image name (lower case) → exam id from ``messidor-2.csv``, empty when the file is absent."""
    path = root / PAIRS_FILE
    if not path.is_file():
        return {}, [f"{PAIRS_FILE} not found: every image is its own bootstrap unit (add it to pair the eyes)"]
    _, rows = read_csv(path, ("left", "right"), dataset=NAME, root=root, expected=EXPECTED, delimiter=";")
    exams = {}
    for _, row in rows:
        eyes = [row[side] for side in ("left", "right") if row.get(side)]
        for eye in eyes:
            exams[eye.lower()] = Path(eyes[0]).stem
    return exams, []


def load_messidor2(
    root: Path,
    *,
    split: str = "external",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> DatasetIndex:
    """Gradable Messidor-2 images with their adjudicated grade, ordered by image_id (see the module docstring)."""
    mode, split_file = parse_external_split(split, NAME, official=False)
    csv_path = root / GRADES_FILE
    header, rows = read_csv(
        csv_path,
        ("image_id", "adjudicated_dr_grade", "adjudicated_gradable"),
        dataset=NAME,
        root=root,
        expected=EXPECTED,
    )
    gradable = [(line, row) for line, row in rows if _gradable(row, csv_path, line)]
    left_out = len(rows) - len(gradable)
    problems = [f"{left_out} ungradable image(s) left out (adjudicated_gradable=0)"] if left_out else []
    row_ids = [cell(row, "image_id", csv_path, line) for line, row in gradable]
    labels = np.array([_grade(row, csv_path, line) for line, row in gradable])
    ids, labels, merged = merge_duplicates(row_ids, labels, [line for line, _ in gradable], csv_path)
    if not (root / IMAGE_DIR).is_dir():
        raise FmcacheError(f"{NAME}: {root / IMAGE_DIR} not found; {layout_hint(root, NAME, EXPECTED)}")
    table = FileTable([root / IMAGE_DIR], (".png", ".jpg", ".jpeg", ".tif", ".tiff"), NAME)
    paths, notes = table.resolve(ids, str(csv_path), f"download the ADCIS images into {IMAGE_DIR}/")
    unlisted = table.unlisted(r["image_id"] for _, r in rows)
    if unlisted:
        notes.append(f"{unlisted} image(s) in {IMAGE_DIR}/ have no row in {GRADES_FILE}: not used")
    first = first_rows(row_ids, [row for _, row in gradable])
    metadata, meta_notes = table_columns([first[i] for i in ids], METADATA_COLUMNS, header, GRADES_FILE)
    exams, exam_notes = read_exams(root)
    if exams:
        metadata["exam"] = text(exams.get(i.lower(), "") for i in ids)
    return external_index(
        mode=mode,
        split_file=split_file,
        order="image_id",
        seed=seed,
        fractions=fractions,
        problems=[*problems, *merged, *notes, *meta_notes, *exam_notes],
        name=NAME,
        root=root,
        paths=paths,
        labels=labels,
        class_names=CLASS_NAMES,
        multilabel=False,
        metadata={"image_id": text(Path(i).stem for i in ids), **metadata},
        raw_labels=labels[:, None],
        raw_label_names=("adjudicated_dr_grade",),
        group_unit=GROUP_UNIT if exams else None,
    )
