"""NIH ChestX-ray14 (Wang et al., CVPR 2017): 112,120 frontal chest X-rays of 30,805 patients with 14 findings
mined from reports, CheXpert's multi-label task at another hospital (external validation).

Layout, from the NIH release (nihcc.app.box.com/v/ChestXray-NIHCC) and its Kaggle copy: ``Data_Entry_2017_v2020.csv``
(or the older ``Data_Entry_2017.csv``) with ``Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age,
Patient Gender`` (``Patient Sex`` in some copies) ``, View Position, OriginalImage[Width,Height],
OriginalImagePixelSpacing[x,y]``; the PNGs under ``images_001/images/`` .. ``images_012/images/`` (Kaggle) or one
``images/`` folder (the NIH tarballs), found by file name; the official patient-wise split in ``train_val_list.txt``
and ``test_list.txt``. ``Finding Labels`` joins findings with ``|``; ``No Finding`` stands alone.

Labels: the 14 findings as 0/1 columns (``No Finding`` = all zero); the raw label is the ``Finding Labels`` text.
Metadata: ``image_id`` (Image Index without ``.png``), ``patient`` (Patient ID: the bootstrap unit), ``follow_up``,
``age`` (``058Y`` in old copies reads as 58), ``sex`` and ``view`` (PA/AP). Split: ``external`` (default),
``official`` (train_val_list → train, ``val_fraction`` of its patients to val; test_list → test), ``random``
(``fractions`` of the patients) or ``file:FILE.csv``. Normalisation: none published, so the model's own (or
CheXpert's, for transfer). Grayscale, repeated to three channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, layout_hint, merge_duplicates, read_csv
from fmcache.data.columns import first_rows, table_columns, text
from fmcache.data.external import FileTable, check_val_fraction, existing, external_index, parse_external_split
from fmcache.data.index import TEST, TRAIN, DatasetIndex
from fmcache.errors import FmcacheError

NAME = "chestxray14"
FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
CLASS_NAMES = FINDINGS
NO_FINDING = "No Finding"
ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
LIST_FILES = {"train_val_list.txt": TRAIN, "test_list.txt": TEST}
EXPECTED = "Data_Entry_2017[_v2020].csv and images_*/images/ (or images/), the NIH ChestX-ray14 release"
GROUP_UNIT = "patient"
GRAYSCALE = True
SOURCE = "chexpert"
# Findings that are the same observation in CheXpert (others only overlap: Infiltration ~ Lung Opacity,
# Mass/Nodule ~ Lung Lesion, Pleural_Thickening ~ Pleural Other; Emphysema, Fibrosis, Hernia have none).
TO_SOURCE = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
}
METADATA_COLUMNS = {
    "follow_up": ("Follow-up #", "number"),
    "age": ("Patient Age", "age"),
    "view": ("View Position", "text"),
}


def _findings(value: str, path: Path, line: int) -> list[float]:
    """0/1 per finding of one ``Finding Labels`` cell."""
    names = [v.strip() for v in value.split("|")]
    if names == [NO_FINDING]:
        return [0.0] * len(FINDINGS)
    unknown = [n for n in names if n not in FINDINGS]
    if unknown:
        raise FmcacheError(
            f"{path} line {line}: Finding Labels has {unknown[0]!r}, which is not one of the 14 findings or "
            f"'{NO_FINDING}' alone; use the official file"
        )
    return [float(f in names) for f in FINDINGS]


def _entry_file(root: Path) -> tuple[Path, list[str]]:
    found = [root / name for name in ENTRY_FILES if (root / name).is_file()]
    if not found:
        raise FmcacheError(f"{NAME}: no {' or '.join(ENTRY_FILES)} in {root}; {layout_hint(root, NAME, EXPECTED)}")
    notes = [f"{found[1].name} ignored: {found[0].name} is the corrected release"] if len(found) > 1 else []
    return found[0], notes


def official_codes(root: Path, ids: Sequence[str]) -> np.ndarray:
    """Train/test codes from train_val_list.txt and test_list.txt; an image in neither or both is an error."""
    listed: dict[str, int] = {}
    for name, code in LIST_FILES.items():
        path = root / name
        if not path.is_file():
            raise FmcacheError(f"{NAME}: split='official' needs {path} (from the NIH release); or use external")
        for entry in path.read_text(encoding="utf-8-sig").split():
            if listed.setdefault(entry, code) != code:
                raise FmcacheError(f"{NAME}: {entry} is in both {' and '.join(LIST_FILES)}; use the official lists")
    absent = [i for i in ids if i not in listed]
    if absent:
        raise FmcacheError(
            f"{NAME}: {len(absent)} image(s) are in neither {' nor '.join(LIST_FILES)} (e.g. {absent[0]}); "
            "use the lists of the same release"
        )
    return np.array([listed[i] for i in ids], dtype=np.int8)


def load_chestxray14(
    root: Path,
    *,
    split: str = "external",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    val_fraction: float = 0.1,
) -> DatasetIndex:
    """The 14 NIH findings, multi-label, ordered by Image Index (see the module docstring)."""
    mode, split_file = parse_external_split(split, NAME, official=True)
    val_fraction = check_val_fraction(val_fraction, NAME)
    csv_path, problems = _entry_file(root)
    header, rows = read_csv(
        csv_path, ("Image Index", "Finding Labels", "Patient ID"), dataset=NAME, root=root, expected=EXPECTED
    )
    row_ids = [cell(row, "Image Index", csv_path, line) for line, row in rows]
    labels = np.array([_findings(cell(row, "Finding Labels", csv_path, n), csv_path, n) for n, row in rows])
    ids, labels, merged = merge_duplicates(row_ids, labels.astype(np.float32), [n for n, _ in rows], csv_path)
    folders = existing([root / "images", *sorted(root.glob("images_*"))])
    if not folders:
        raise FmcacheError(f"{NAME}: no images_*/ or images/ folder in {root}; {layout_hint(root, NAME, EXPECTED)}")
    paths, notes = FileTable(folders, (".png",), NAME).resolve(
        ids, str(csv_path), "unpack every images_NNN archive next to the CSV"
    )
    by_id = first_rows(row_ids, [row for _, row in rows])
    first = [by_id[i] for i in ids]
    metadata, meta_notes = table_columns(first, METADATA_COLUMNS, header, csv_path.name)
    sex = "Patient Gender" if "Patient Gender" in header else "Patient Sex"
    return external_index(
        mode=mode,
        split_file=split_file,
        order="Image Index",
        seed=seed,
        fractions=fractions,
        official=official_codes(root, ids) if mode == "official" else None,
        val_fraction=val_fraction,
        problems=[*problems, *merged, *notes, *meta_notes],
        name=NAME,
        root=root,
        paths=paths,
        labels=labels,
        class_names=FINDINGS,
        multilabel=True,
        metadata={
            "image_id": text(Path(i).stem for i in ids),
            "patient": text(r["Patient ID"] for r in first),
            **metadata,
            "sex": text(r.get(sex, "") for r in first),
        },
        raw_labels=np.array([[r["Finding Labels"]] for r in first]),
        raw_label_names=("Finding Labels",),
        group_unit=GROUP_UNIT,
    )
