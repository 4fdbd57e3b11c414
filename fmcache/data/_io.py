"""Shared helpers of the loaders: the data root, CSV reading, existence checks and layout hints.

Every failure here is an :class:`FmcacheError` whose one line names the file at fault and the fix.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmcache.errors import FmcacheError

# Files or folders that only one official release has at its top level; used to say "this looks like X".
LAYOUT_MARKERS: dict[str, tuple[str, ...]] = {
    "aptos2019": ("train_images",),
    "isic2019": ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Input"),
    "cbis_ddsm": (
        "ddsm_raw_image_lists",
        "mass_case_description_train_set.csv",
        "calc_case_description_train_set.csv",
        "mass_case_description_test_set.csv",
        "calc_case_description_test_set.csv",
    ),
    "chexpert": ("CheXpert-v1.0-small", "CheXpert-v1.0", "valid.csv"),
    # External-validation releases: only names no other layout (or a user's class folders) would have.
    "pad_ufes20": ("imgs_part_1",),
    "ham10000": ("HAM10000_metadata.csv", "HAM10000_metadata", "HAM10000_images_part_1"),
    "messidor2": ("messidor_data.csv", "messidor-2.csv"),
    "idrid": ("B. Disease Grading",),
    "eyepacs": ("trainLabels.csv", "retinopathy_solution.csv"),
    "chestxray14": ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"),
    "mimic_cxr": ("mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-chexpert.csv"),
    "cmmd": ("CMMD_clinicaldata_revision.xlsx", "CMMD_clinicaldata_revision.csv"),
    "vindr_mammo": ("breast-level_annotations.csv",),
}

# How many missing files an error message names.
SHOW_MISSING = 3


def resolve_root(root: str | Path, dataset: str) -> Path:
    """The absolute data root; an error if it is not an existing folder."""
    path = Path(root).expanduser()
    if not path.exists():
        raise FmcacheError(f"data root {path} does not exist; pass --data-root pointing at the {dataset} folder")
    if not path.is_dir():
        raise FmcacheError(f"data root {path} is not a folder; pass --data-root pointing at the {dataset} folder")
    return path.resolve()


def detect_layouts(folder: Path) -> list[str]:
    """Names of the official releases whose top-level markers exist in ``folder``."""
    return [name for name, markers in LAYOUT_MARKERS.items() if any((folder / m).exists() for m in markers)]


def layout_hint(root: Path, dataset: str, expected: str) -> str:
    """The fix to suggest when ``root`` lacks the files of ``dataset`` (described by ``expected``)."""
    others = [name for name in detect_layouts(root) if name != dataset]
    if others:
        return f"this folder looks like {others[0]} data: use --dataset {others[0]}, or point --data-root elsewhere"
    if dataset in LAYOUT_MARKERS:
        children = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        for child in children[:100]:
            if dataset in detect_layouts(child):
                return f"the {dataset} files seem to be in {child}: pass --data-root {child}"
    return f"pass --data-root pointing at the folder that holds {expected}"


def require_file(path: Path, dataset: str, root: Path, expected: str) -> Path:
    """``path`` if it is a file, else an error naming it with a layout hint."""
    if not path.is_file():
        raise FmcacheError(f"{dataset}: {path} not found; {layout_hint(root, dataset, expected)}")
    return path


def read_csv(
    path: Path, required: Sequence[str], *, dataset: str, root: Path, expected: str, delimiter: str = ","
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and rows of a CSV (gzip-compressed when the name ends in .gz), each row as (line number,
    {column: stripped value}).

    Missing file, missing columns and a file without rows are errors naming the file. Short rows get "".
    """
    require_file(path, dataset, root, expected)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = [h.strip() for h in next(reader, [])]
            rows = [(reader.line_num, _row_dict(header, cells)) for cells in reader if cells]
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise FmcacheError(f"{dataset}: cannot read {path}: {exc}; check that it is a UTF-8 CSV file") from exc
    return _checked(path, header, rows, required, dataset=dataset, root=root, expected=expected)


def _checked(
    path: Path,
    header: list[str],
    rows: list[tuple[int, dict[str, str]]],
    required: Sequence[str],
    *,
    dataset: str,
    root: Path,
    expected: str,
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """``(header, rows)`` once the required columns and at least one row are there; errors name the file."""
    missing = [c for c in required if c not in header]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FmcacheError(
            f"{dataset}: {path} lacks column(s) {', '.join(repr(c) for c in missing[:5])}{more} (found "
            f"{', '.join(repr(c) for c in header[:12]) or 'none'}); {layout_hint(root, dataset, expected)}"
        )
    if not rows:
        raise FmcacheError(f"{dataset}: {path} has a header but no rows; use the complete release file")
    return header, rows


def _row_dict(header: list[str], cells: list[str]) -> dict[str, str]:
    # zip/map run in C: this is the hot loop for CheXpert's 224k rows. Short rows read as blank cells.
    if len(cells) < len(header):
        cells = cells + [""] * (len(header) - len(cells))
    return dict(zip(header, map(str.strip, cells), strict=False))


def cell(row: dict[str, str], column: str, path: Path, line: int) -> str:
    """A required non-empty cell; an error naming file, line and column when blank."""
    value = row.get(column, "")
    if not value:
        raise FmcacheError(f"{path} line {line}: column {column!r} is empty; fill it in or remove the row")
    return value


def check_files_exist(paths: Sequence[Path], source: str, hint: str) -> None:
    """Stat every path; an error naming how many are missing and the first few."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(str(p) for p in missing[:SHOW_MISSING])
        raise FmcacheError(
            f"{len(missing)} of {len(paths)} images listed in {source} are missing (e.g. {shown}); {hint}"
        )


def merge_duplicates(
    keys: Sequence[str], labels: np.ndarray, lines: Sequence[int], source: Path
) -> tuple[list[str], np.ndarray, list[str]]:
    """Keys sorted and unique with their labels, plus problem lines for merged duplicates.

    Rows that repeat a key with the same label collapse into one sample; a repeated key with a different label
    is an error naming both lines.
    """
    first: dict[str, int] = {}
    dropped = 0
    for i, key in enumerate(keys):
        if key not in first:
            first[key] = i
            continue
        j = first[key]
        if not np.array_equal(labels[i], labels[j], equal_nan=labels.dtype.kind == "f"):
            raise FmcacheError(
                f"{source}: {key!r} appears on lines {lines[j]} and {lines[i]} with different labels; "
                "keep one row per image"
            )
        dropped += 1
    order = sorted(first)
    merged = labels[[first[k] for k in order]] if order else labels[:0]
    problems = [f"{source.name}: merged {dropped} duplicate row(s) with identical labels"] if dropped else []
    return order, merged, problems


def read_xlsx(
    path: Path, required: Sequence[str], *, dataset: str, root: Path, expected: str, alternative: str
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and rows of the first sheet of an Excel file, shaped like :func:`read_csv`'s (row numbers are
    the sheet's). Needs openpyxl; without it the error names ``pip install openpyxl`` and ``alternative`` (a CSV
    export the loader also reads)."""
    require_file(path, dataset, root, expected)
    try:
        import openpyxl
    except ImportError:
        raise FmcacheError(
            f"{dataset}: reading {path.name} needs openpyxl: pip install openpyxl, or save the sheet as "
            f"{alternative} next to it"
        ) from None
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        cells = [[_xlsx_text(v) for v in row] for row in book.worksheets[0].iter_rows(values_only=True)]
        book.close()
    except Exception as exc:  # openpyxl raises zipfile, XML and its own errors for a damaged file
        raise FmcacheError(
            f"{dataset}: cannot read {path}: {exc}; re-download it or export it as {alternative}"
        ) from exc
    header = [h.strip() for h in (cells[0] if cells else [])]
    rows = [(n, _row_dict(header, row)) for n, row in enumerate(cells[1:], start=2) if any(row)]
    return _checked(path, header, rows, required, dataset=dataset, root=root, expected=expected)


def _xlsx_text(value: object) -> str:
    # Whole numbers come back as floats from some writers; "44" and "44.0" must read the same.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)
