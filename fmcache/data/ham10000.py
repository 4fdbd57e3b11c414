"""HAM10000 (Tschandl et al. 2018, Harvard Dataverse doi:10.7910/DVN/DBW86T): 10,015 dermoscopic images of 7
diagnoses from Vienna and Queensland.

**Not independent of ISIC 2019**: every HAM10000 image is part of the ISIC 2019 training set under the same
``ISIC_00xxxxx`` id. Use it to check overlaps (``image_id`` shares ISIC 2019's namespace), or to evaluate a model
trained on an ISIC 2019 split that excludes these ids; scores of a model trained on all of ISIC 2019 are not
external.

Layout, from the Dataverse and Kaggle copies: ``HAM10000_metadata.csv`` (``HAM10000_metadata`` without extension
on Dataverse) with ``lesion_id, image_id, dx, dx_type, age, sex, localization`` (and ``dataset`` in the newer
version); images ``<image_id>.jpg`` in ``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/`` (or one
``HAM10000_images/``), found by name. ``dx`` is one of akiec, bcc, bkl, df, mel, nv, vasc.

Labels: ``dx`` (also the raw label). Metadata: ``image_id``, ``lesion_id`` (the bootstrap unit: 7,470 lesions,
several photographs each), ``dx_type`` (how the diagnosis was confirmed), ``age``, ``sex``, ``localization`` and
``dataset`` when present. Split: ``external`` (default), ``random`` (``fractions`` of the lesions) or
``file:FILE.csv``. Normalisation: none published, so the model's own (or ISIC's, for transfer).
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

NAME = "ham10000"
CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
METADATA_FILES = ("HAM10000_metadata.csv", "HAM10000_metadata")
IMAGE_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images")
EXPECTED = "HAM10000_metadata.csv and HAM10000_images_part_1/ + _part_2/ (the HAM10000 release)"
GROUP_UNIT = "lesion_id"
GRAYSCALE = False
SOURCE = "isic2019"
# akiec (actinic keratoses and intraepithelial carcinoma / Bowen's disease) is mostly ISIC's AK.
TO_SOURCE = {"akiec": "AK", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL", "nv": "NV", "vasc": "VASC"}
METADATA_COLUMNS = {
    "lesion_id": ("lesion_id", "text"),
    "dx_type": ("dx_type", "text"),
    "age": ("age", "number"),
    "sex": ("sex", "text"),
    "localization": ("localization", "text"),
    "dataset": ("dataset", "text"),
}


def _metadata_file(root: Path) -> Path:
    found = next((root / name for name in METADATA_FILES if (root / name).is_file()), None)
    if found is None:
        raise FmcacheError(f"{NAME}: {root / METADATA_FILES[0]} not found; {layout_hint(root, NAME, EXPECTED)}")
    return found


def _dx(row: dict[str, str], path: Path, line: int) -> int:
    value = cell(row, "dx", path, line)
    if value not in CLASS_NAMES:
        raise FmcacheError(f"{path} line {line}: dx={value!r} is not one of {', '.join(CLASS_NAMES)}; fix the row")
    return CLASS_NAMES.index(value)


def load_ham10000(
    root: Path,
    *,
    split: str = "external",
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> DatasetIndex:
    """Seven dermoscopic diagnoses, ordered by image_id (see the module docstring)."""
    mode, split_file = parse_external_split(split, NAME, official=False)
    csv_path = _metadata_file(root)
    header, rows = read_csv(csv_path, ("image_id", "lesion_id", "dx"), dataset=NAME, root=root, expected=EXPECTED)
    row_ids = [cell(row, "image_id", csv_path, line) for line, row in rows]
    labels = np.array([_dx(row, csv_path, line) for line, row in rows])
    ids, labels, problems = merge_duplicates(row_ids, labels, [line for line, _ in rows], csv_path)
    folders = existing(root / f for f in IMAGE_FOLDERS)
    if not folders:
        raise FmcacheError(f"{NAME}: no HAM10000_images_part_1/ folder in {root}; {layout_hint(root, NAME, EXPECTED)}")
    paths, notes = FileTable(folders, (".jpg",), NAME).resolve(
        [f"{i}.jpg" for i in ids], str(csv_path), "unpack both image archives next to the metadata file"
    )
    first = first_rows(row_ids, [row for _, row in rows])
    # Only the newer release has "dataset": its absence is no problem.
    spec = {k: v for k, v in METADATA_COLUMNS.items() if k != "dataset" or "dataset" in header}
    metadata, meta_notes = table_columns([first[i] for i in ids], spec, header, csv_path.name)
    return external_index(
        mode=mode,
        split_file=split_file,
        order="image_id",
        seed=seed,
        fractions=fractions,
        problems=[*problems, *notes, *meta_notes],
        name=NAME,
        root=root,
        paths=paths,
        labels=labels,
        class_names=CLASS_NAMES,
        multilabel=False,
        metadata={"image_id": text(ids), **metadata},
        raw_labels=np.array(CLASS_NAMES)[labels][:, None],
        raw_label_names=("dx",),
        group_unit=GROUP_UNIT,
    )
