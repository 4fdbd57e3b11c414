"""VinDr-Mammo 1.0.0 (Nguyen et al. 2023, PhysioNet): 20,000 digital mammograms of 5,000 four-view exams from
Vietnam with breast-level BI-RADS assessments, a mammography task for CBIS-DDSM models (external validation).

Layout, from the PhysioNet release page: ``breast-level_annotations.csv`` with ``study_id, series_id, image_id,
laterality, view_position, height, width, breast_birads, breast_density, split`` (``BI-RADS 1`` .. ``BI-RADS 5``,
``DENSITY A`` .. ``DENSITY D``, ``training`` / ``test``) and the images at ``images/<study_id>/<image_id>.dicom``.

VinDr-Mammo has no pathology, so labels come from the breast's BI-RADS by a stated rule (``task``):
``suspicious`` (default): BI-RADS 1-3 → 0, 4-5 → 1, the usual proxy for benign vs malignant (CBIS-DDSM's TCIA
task); ``abnormal``: BI-RADS 1 → 0, 2-5 → 1, a proxy for the paper's normal vs abnormal task (CBIS-DDSM's lists).
The rule is recorded in split_info["task"] and printed by ``fmcache datasets``. The raw label is the
``breast_birads`` text. Metadata: ``image_id``, ``study`` (the exam: the bootstrap unit; the release has no patient
id, one exam per woman), ``laterality`` (left/right), ``view`` (CC/MLO), ``breast_density`` (A-D), ``birads``
(1-5) and ``release_split``. Split: ``external`` (default), ``official`` (training → train with ``val_fraction``
of its exams to val, test → test), ``random`` (``fractions`` of the exams) or ``file:FILE.csv``. Normalisation:
none published, so the model's own (or CBIS-DDSM's, for transfer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, check_files_exist, merge_duplicates, read_csv
from fmcache.data.columns import first_rows, text
from fmcache.data.external import check_val_fraction, external_index, parse_external_split
from fmcache.data.index import TEST, TRAIN, DatasetIndex, check_choice
from fmcache.errors import FmcacheError

NAME = "vindr_mammo"
ANNOTATIONS = "breast-level_annotations.csv"
EXPECTED = f"{ANNOTATIONS} and images/<study_id>/<image_id>.dicom (the VinDr-Mammo release)"
BIRADS = {f"BI-RADS {n}": n for n in range(1, 6)}
OFFICIAL = {"training": TRAIN, "test": TEST}
SIDES = {"L": "left", "R": "right"}
GROUP_UNIT = "study"
GRAYSCALE = True
SOURCE = "cbis_ddsm"
# task -> (first BI-RADS that is positive, class names, the rule in words)
TASKS = {
    "suspicious": (4, ("BI-RADS 1-3", "BI-RADS 4-5"), "BI-RADS 1-3 -> 0, 4-5 -> 1 (suspicious; CBIS-DDSM tcia task)"),
    "abnormal": (2, ("BI-RADS 1", "BI-RADS 2-5"), "BI-RADS 1 -> 0, 2-5 -> 1 (abnormal; CBIS-DDSM lists task)"),
}
CLASS_NAMES = TASKS["suspicious"][1]  # the default task's
# Suggested maps onto CBIS-DDSM's classes (tcia layout, lists layout) for each task.
TO_SOURCES = {
    "suspicious": {"BI-RADS 1-3": "benign", "BI-RADS 4-5": "malignant"},
    "abnormal": {"BI-RADS 1": "normal", "BI-RADS 2-5": "abnormal"},
}
TO_SOURCE = TO_SOURCES["suspicious"]


def _birads(row: dict[str, str], path: Path, line: int) -> int:
    value = cell(row, "breast_birads", path, line)
    if value not in BIRADS:
        raise FmcacheError(f"{path} line {line}: breast_birads={value!r} is not BI-RADS 1..5; fix the row")
    return BIRADS[value]


def _official(row: dict[str, str], path: Path, line: int) -> int:
    value = cell(row, "split", path, line)
    if value not in OFFICIAL:
        raise FmcacheError(f"{path} line {line}: split={value!r} is not training or test; fix the row")
    return OFFICIAL[value]


def _metadata(rows: list[dict[str, str]], birads: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "image_id": text(r["image_id"] for r in rows),
        "study": text(r["study_id"] for r in rows),
        "laterality": text(SIDES.get(r.get("laterality", ""), "") for r in rows),
        "view": text(r.get("view_position", "") for r in rows),
        "breast_density": text(r.get("breast_density", "").replace("DENSITY", "") for r in rows),
        "birads": birads.astype(np.float64),
        "release_split": text(r["split"] for r in rows),
    }


def load_vindr_mammo(
    root: Path,
    *,
    task: str = "suspicious",
    split: str = "external",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    val_fraction: float = 0.1,
) -> DatasetIndex:
    """Binary VinDr-Mammo labels from breast BI-RADS by ``task``, ordered by image_id (module docstring)."""
    check_choice(task, tuple(TASKS), "task", NAME)
    mode, split_file = parse_external_split(split, NAME, official=True)
    val_fraction = check_val_fraction(val_fraction, NAME)
    csv_path = root / ANNOTATIONS
    columns = ("study_id", "image_id", "breast_birads", "split")
    _, rows = read_csv(csv_path, columns, dataset=NAME, root=root, expected=EXPECTED)
    row_ids = [cell(row, "image_id", csv_path, line) for line, row in rows]
    codes = [[_birads(row, csv_path, line), _official(row, csv_path, line)] for line, row in rows]
    ids, merged, problems = merge_duplicates(row_ids, np.array(codes), [line for line, _ in rows], csv_path)
    by_id = first_rows(row_ids, [row for _, row in rows])
    chosen = [by_id[i] for i in ids]
    paths = [root / "images" / r["study_id"] / f"{r['image_id']}.dicom" for r in chosen]
    check_files_exist(paths, str(csv_path), "images are read from images/<study_id>/<image_id>.dicom")
    first_positive, class_names, rule = TASKS[task]
    return external_index(
        mode=mode,
        split_file=split_file,
        order="image_id",
        seed=seed,
        fractions=fractions,
        official=merged[:, 1].astype(np.int8),
        val_fraction=val_fraction,
        task=rule,
        problems=problems,
        name=NAME,
        root=root,
        paths=paths,
        labels=(merged[:, 0] >= first_positive).astype(np.int64),
        class_names=class_names,
        multilabel=False,
        options={"task": task},
        metadata=_metadata(chosen, merged[:, 0]),
        raw_labels=np.array([[r["breast_birads"]] for r in chosen]),
        raw_label_names=("breast_birads",),
        group_unit=GROUP_UNIT,
    )
