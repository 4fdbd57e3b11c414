"""PAD-UFES-20 (Pacheco et al. 2020, Mendeley Data doi:10.17632/zr7vgbcyr2.1): smartphone photographs of skin
lesions, six diagnoses: ISIC 2019's task on another kind of camera and population (external validation).

Layout, from the release page and its ``metadata.csv``: ``metadata.csv`` with the columns ``patient_id, lesion_id,
smoke, drink, background_father, background_mother, age, pesticide, gender, skin_cancer_history, cancer_history,
has_piped_water, has_sewage_system, fitspatrick, region, diameter_1, diameter_2, diagnostic, itch, grew, hurt,
changed, bleed, elevation, img_id, biopsed``; images (``PAT_<patient>_<lesion>_<n>.png``) in the release's three
archives ``imgs_part_1/``, ``imgs_part_2/``, ``imgs_part_3/`` (each possibly nested once more, as the zip files
unpack) or in one ``images/`` folder. ``img_id`` is resolved by file name in those folders. ``diagnostic`` is one
of ACK, BCC, MEL, NEV, SCC, SEK (the release page: Bowen's disease is already merged into SCC). 2,298 images of
1,373 patients and 1,641 lesions (the paper).

Labels: ``diagnostic`` (also the raw label). Metadata: ``image_id`` (img_id without ``.png``: its own namespace,
not ISIC's), ``patient_id`` (the bootstrap unit), ``lesion_id`` and the clinical columns as released (``age``,
``fitspatrick``, ``diameter_1``, ``diameter_2`` as numbers; the rest as text). Split: ``external`` (default: all
test), ``random`` (``fractions`` of the patients) or ``file:FILE.csv``; the release has no official split.
Normalisation: none published for PAD-UFES-20, so the model's own (or the source dataset's, for transfer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import cell, layout_hint, merge_duplicates, read_csv
from fmcache.data.columns import first_rows, table_columns, text
from fmcache.data.external import FileTable, existing, external_index, parse_external_split
from fmcache.data.index import DatasetIndex
from fmcache.errors import FmcacheError

NAME = "pad_ufes20"
CLASS_NAMES = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")
METADATA_FILE = "metadata.csv"
IMAGE_FOLDERS = ("images", "imgs_part_1", "imgs_part_2", "imgs_part_3")
EXPECTED = f"{METADATA_FILE} and imgs_part_1/..imgs_part_3/ (or images/), the PAD-UFES-20 release"
GROUP_UNIT = "patient_id"
GRAYSCALE = False
SOURCE = "isic2019"
# Suggested map onto the source's classes: seborrheic keratosis is one of ISIC's benign keratoses (BKL); ISIC's
# DF and VASC have no PAD-UFES-20 counterpart.
TO_SOURCE = {"ACK": "AK", "BCC": "BCC", "MEL": "MEL", "NEV": "NV", "SCC": "SCC", "SEK": "BKL"}
NUMBER_COLUMNS = ("age", "fitspatrick", "diameter_1", "diameter_2")
TEXT_COLUMNS = (
    "patient_id",
    "lesion_id",
    "smoke",
    "drink",
    "background_father",
    "background_mother",
    "pesticide",
    "gender",
    "skin_cancer_history",
    "cancer_history",
    "has_piped_water",
    "has_sewage_system",
    "region",
    "itch",
    "grew",
    "hurt",
    "changed",
    "bleed",
    "elevation",
    "biopsed",
)
METADATA_COLUMNS = {
    **{c: (c, "text") for c in TEXT_COLUMNS},
    **{c: (c, "number") for c in NUMBER_COLUMNS},
}


def _diagnostic(row: dict[str, str], path: Path, line: int) -> int:
    value = cell(row, "diagnostic", path, line)
    if value not in CLASS_NAMES:
        raise FmcacheError(
            f"{path} line {line}: diagnostic={value!r} is not one of {', '.join(CLASS_NAMES)}; fix or remove the row"
        )
    return CLASS_NAMES.index(value)


def load_pad_ufes20(
    root: Path,
    *,
    split: str = "external",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> DatasetIndex:
    """Six skin-lesion diagnoses, ordered by img_id (see the module docstring for layout, metadata and splits)."""
    mode, split_file = parse_external_split(split, NAME, official=False)
    csv_path = root / METADATA_FILE
    header, rows = read_csv(
        csv_path, ("img_id", "diagnostic", "patient_id", "lesion_id"), dataset=NAME, root=root, expected=EXPECTED
    )
    row_ids = [cell(row, "img_id", csv_path, line) for line, row in rows]
    labels = np.array([_diagnostic(row, csv_path, line) for line, row in rows])
    ids, labels, problems = merge_duplicates(row_ids, labels, [line for line, _ in rows], csv_path)
    folders = existing(root / f for f in IMAGE_FOLDERS)
    if not folders:
        raise FmcacheError(f"{NAME}: no images/ or imgs_part_1/ folder in {root}; {layout_hint(root, NAME, EXPECTED)}")
    paths, notes = FileTable(folders, (".png", ".jpg", ".jpeg"), NAME).resolve(
        ids, str(csv_path), "unpack imgs_part_1.zip, imgs_part_2.zip and imgs_part_3.zip next to metadata.csv"
    )
    first = first_rows(row_ids, [row for _, row in rows])
    metadata, meta_notes = table_columns([first[i] for i in ids], METADATA_COLUMNS, header, METADATA_FILE)
    return external_index(
        mode=mode,
        split_file=split_file,
        order="img_id",
        seed=seed,
        fractions=fractions,
        problems=[*problems, *notes, *meta_notes],
        name=NAME,
        root=root,
        paths=paths,
        labels=labels,
        class_names=CLASS_NAMES,
        multilabel=False,
        metadata={"image_id": text(Path(i).stem for i in ids), **metadata},
        raw_labels=np.array(CLASS_NAMES)[labels][:, None],
        raw_label_names=("diagnostic",),
        group_unit=GROUP_UNIT,
    )
