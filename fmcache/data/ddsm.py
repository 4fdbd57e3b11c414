"""CBIS-DDSM, binary, in two layouts that pose **two different tasks**.

``lists`` (the paper's task): the seed's ``ddsm_raw_image_lists/{train,val,test}.txt`` with images under
``ddsm_raw/``; **normal vs abnormal**: the label comes from the file-name prefix (``normal`` → 0,
``benign``/``cancer`` → 1) and the split from the list.

``tcia``: the TCIA release, ``{mass,calc}_case_description_{train,test}_set.csv`` next to the downloaded
``CBIS-DDSM/`` tree of DICOM files. It has no normal mammograms: every image holds an abnormality, so the task
is **benign vs malignant** (``pathology`` MALIGNANT → 1, BENIGN / BENIGN_WITHOUT_CALLBACK → 0), not comparable
with the paper's numbers. Inner folders of the tree rarely match the CSV paths, so each row goes through its
case folder (the CSV path's first component) to the single full-mammogram DICOM below it. One sample per
mammogram: abnormality rows of one image merge (malignant if any row is), and so do the mass and calc copies
of one breast view (``Mass-…_P_00001_LEFT_CC`` and ``Calc-…_P_00001_LEFT_CC``); a copy that is train in one
set and test in the other stays in test, so no image is both trained on and tested.

Raw labels and metadata. ``lists``: the file-name class (normal / benign / cancer) as the raw label; the seed's
names (``cancer_05-C_0128_1.LEFT_CC.LJPEG.1.jpg``, the original DDSM file name behind the class and volume) give
``image_id`` (the name without its extension), ``patient`` (the DDSM case, ``C_0128``: one woman's screening
exam), ``laterality`` (left/right) and ``view`` (CC/MLO); a column no name carries is left out. ``tcia``: the
``pathology`` values of the merged rows as the raw label (``"|"``-joined when they differ), and from the CSVs
``patient`` (``patient_id``), ``breast_density`` (``breast_density`` in the mass CSVs, ``breast density`` in the
calc CSVs), ``view`` (``image view``), ``laterality`` (``left or right breast``, lower-cased) and
``abnormality_type`` (``"|"``-joined over the merged rows), with ``image_id`` the breast view (``P_00001_LEFT_CC``).
The patient is the bootstrap unit in both layouts.

TCIA splits: ``official`` keeps the official train/test and moves ``val_fraction`` of the train images to val
(image by image: views of one patient can land in train, val and test). ``patient`` groups by the ``P_NNNNN``
patient id: a patient with any image in the official test set goes to test with all their images, and
``val_fraction`` of the remaining train patients go to val, so no patient crosses splits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from fmcache.data._io import SHOW_MISSING, cell, check_files_exist, layout_hint, read_csv
from fmcache.data.columns import joined, numbers, text
from fmcache.data.index import TEST, TRAIN, VAL, DatasetIndex, build_index, check_choice, check_seed
from fmcache.data.splits import apply_split_file, parse_split
from fmcache.errors import FmcacheError

NAME = "cbis_ddsm"
LAYOUTS = ("auto", "lists", "tcia")
AMBIGUOUS = ("error", "skip")
SPLIT_MODES = ("official", "patient")
TASK_LISTS = "normal vs abnormal (benign+cancer), the seed's lists: the paper's task"
TASK_TCIA = "benign vs malignant (TCIA pathology; no normal images): not the paper's normal vs abnormal task"

LIST_DIR = "ddsm_raw_image_lists"
RAW_DIR = "ddsm_raw"  # the seed resolves list entries under <root>/ddsm_raw
LIST_SPLITS = {"train.txt": TRAIN, "val.txt": VAL, "test.txt": TEST}
LIST_PREFIX = {"normal": 0, "benign": 1, "cancer": 1}

CASE_CSVS = {
    kind: (f"{kind}_case_description_train_set.csv", f"{kind}_case_description_test_set.csv")
    for kind in ("mass", "calc")
}
PATHOLOGY = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}
PATH_COLUMN = "image file path"
EXPECTED = f"{LIST_DIR}/ or the TCIA mass/calc_case_description_*_set.csv files"
EXPECTED_NEITHER = f"{LIST_DIR}/ nor the TCIA mass/calc_case_description_*_set.csv files"


def load_cbis_ddsm(
    root: Path,
    *,
    layout: str = "auto",
    split: str = "official",
    seed: int = 42,
    val_fraction: float = 0.1,
    ambiguous: str = "error",
) -> DatasetIndex:
    """Binary CBIS-DDSM, ordered by image path (the two layouts are two tasks: see the module docstring).

    ``layout`` picks "lists" or "tcia" ("auto" detects it; both present is an error). ``split``: "official"
    (the lists as given; for "tcia" the official train/test with ``val_fraction`` of the train images moved to
    val by ``seed``), "patient" ("tcia" only: no patient in two splits) or "file:FILE.csv". Merges are reported
    in ``problems``. ``ambiguous="skip"`` drops TCIA rows whose case folder holds several DICOM files none of
    which matches the CSV path (each skip is reported); the default makes that an error.
    """
    mode, split_file = parse_split(split, SPLIT_MODES, NAME)
    layout = _detect_layout(root, check_choice(layout, LAYOUTS, "layout", NAME))
    if layout == "lists":
        if mode == "patient":
            raise FmcacheError(
                f"{NAME}: split='patient' needs the TCIA layout (patient ids); the seed's lists carry their own "
                "split: use --split official"
            )
        index = _load_lists(root)
    else:
        check_choice(ambiguous, AMBIGUOUS, "ambiguous", NAME)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 <= val_fraction < 1:
            raise FmcacheError(f"{NAME}: val_fraction must be a number in [0, 1), got {val_fraction!r}")
        index = _load_tcia(
            root,
            seed=check_seed(seed),
            val_fraction=float(val_fraction),
            ambiguous=ambiguous,
            by_patient=mode == "patient",
        )
    return apply_split_file(index, split_file) if split_file else index


def _detect_layout(root: Path, layout: str) -> str:
    if layout != "auto":
        return layout
    has_lists = (root / LIST_DIR).is_dir()
    has_tcia = any((root / name).is_file() for pair in CASE_CSVS.values() for name in pair)
    if has_lists and has_tcia:
        raise FmcacheError(
            f"{NAME}: {root} holds both {LIST_DIR}/ and TCIA case-description CSVs; pass layout='lists' or 'tcia'"
        )
    if has_lists:
        return "lists"
    if has_tcia:
        return "tcia"
    raise FmcacheError(f"{NAME}: found neither {EXPECTED_NEITHER} in {root}; {layout_hint(root, NAME, EXPECTED)}")


def _canonical_key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# ---------------------------------------------------------------------------------------------------------
# The seed's list files


def _list_prefix(entry: str) -> str:
    return PurePosixPath(entry.replace("\\", "/")).name.split("_")[0]


def _list_label(entry: str, list_path: Path, line: int) -> int:
    prefix = _list_prefix(entry)
    if prefix not in LIST_PREFIX:
        raise FmcacheError(
            f"{list_path} line {line}: cannot tell the label of {entry!r} from its name "
            f"(expected a normal_, benign_ or cancer_ prefix); fix or remove the line"
        )
    return LIST_PREFIX[prefix]


def _resolve_list_entry(entry: str, root: Path, list_dir: Path) -> Path:
    """Absolute entries as-is; relative ones under root/ddsm_raw, root, then the list folder (first that exists)."""
    path = Path(entry)
    if path.is_absolute():
        return path
    candidates = [root / RAW_DIR / path, root / path, list_dir / path]
    return next((c for c in candidates if c.is_file()), candidates[0])


def _read_list(list_path: Path, root: Path) -> list[tuple[int, Path, int]]:
    """(line, resolved path, label) of every non-blank line of one list file."""
    if not list_path.is_file():
        raise FmcacheError(
            f"{NAME}: {list_path} not found; the lists layout needs train.txt, val.txt and test.txt in {LIST_DIR}/"
        )
    text = list_path.read_text(encoding="utf-8-sig")
    entries = [(n, raw.strip()) for n, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    return [(n, _resolve_list_entry(e, root, list_path.parent), _list_label(e, list_path, n)) for n, e in entries]


def _load_lists(root: Path) -> DatasetIndex:
    samples: dict[Path, tuple[int, int, str]] = {}  # path -> (label, split, "file line n")
    duplicates = 0
    for file_name, code in LIST_SPLITS.items():
        list_path = root / LIST_DIR / file_name
        for line, path, label in _read_list(list_path, root):
            where = f"{list_path} line {line}"
            if path in samples:
                if samples[path][1] != code:
                    raise FmcacheError(
                        f"{NAME}: {path} is listed in two splits ({samples[path][2]} and {where}); "
                        "keep each image in one list"
                    )
                duplicates += 1
                continue
            samples[path] = (label, code, where)
    if not samples:
        raise FmcacheError(f"{NAME}: the list files in {root / LIST_DIR} are empty; use the complete lists")
    paths = sorted(samples, key=lambda p: _canonical_key(p, root))
    check_files_exist(
        paths, str(root / LIST_DIR), f"list entries are looked up under {root / RAW_DIR}, {root} and {LIST_DIR}/"
    )
    problems = [f"{LIST_DIR}: merged {duplicates} repeated line(s)"] if duplicates else []
    metadata = _list_metadata(paths)
    return build_index(
        name=NAME,
        root=root,
        paths=paths,
        labels=np.array([samples[p][0] for p in paths]),
        split=np.array([samples[p][1] for p in paths]),
        class_names=("normal", "abnormal"),
        multilabel=False,
        split_info={
            "mode": "lists",
            "files": [f"{LIST_DIR}/{f}" for f in LIST_SPLITS],
            "order": "path",
            "task": TASK_LISTS,
        },
        options={"layout": "lists"},
        problems=problems,
        metadata=metadata,
        raw_labels=np.array([[_list_prefix(p.name)] for p in paths]),
        raw_label_names=("class",),
        group_unit="patient" if "patient" in metadata else None,
    )


# The seed's names keep the original DDSM file name: <class>_<volume>-<case>_<n>.<SIDE>_<VIEW>.LJPEG.1.jpg.
_DDSM_CASE = re.compile(r"(?:^|[-_])([A-D]_\d{4})_\d+\.")
_SIDE_VIEW = re.compile(r"(LEFT|RIGHT)_(CC|MLO)(?:\.|$)")


def _list_metadata(paths: list[Path]) -> dict[str, np.ndarray]:
    """What the list layout's file names carry; a column that no name carries is left out."""
    cases = [_DDSM_CASE.search(p.name) for p in paths]
    sides = [_SIDE_VIEW.search(p.name) for p in paths]
    columns = {
        "image_id": text(p.stem for p in paths),
        "patient": text(m.group(1) if m else "" for m in cases),
        "laterality": text(m.group(1).lower() if m else "" for m in sides),
        "view": text(m.group(2) if m else "" for m in sides),
    }
    return {name: column for name, column in columns.items() if np.any(column != "")}


# ---------------------------------------------------------------------------------------------------------
# The TCIA release


@dataclass
class _Resolution:
    path: Path | None
    failure: str = ""  # "missing" or "ambiguous" when path is None
    detail: str = ""


def _tcia_csvs(root: Path) -> list[tuple[Path, int]]:
    """(csv path, official split) for every case-description pair present; half a pair is an error."""
    found: list[tuple[Path, int]] = []
    for train_name, test_name in CASE_CSVS.values():
        train, test = root / train_name, root / test_name
        if train.is_file() != test.is_file():
            missing = test if train.is_file() else train
            raise FmcacheError(f"{NAME}: {missing} not found; the TCIA layout needs both train and test CSVs")
        if train.is_file():
            found += [(train, TRAIN), (test, TEST)]
    if not found:
        raise FmcacheError(f"{NAME}: no TCIA case-description CSVs in {root}; {layout_hint(root, NAME, EXPECTED)}")
    return found


class _CaseResolver:
    """Finds the full-mammogram DICOM of a CSV path through its case folder, caching each folder's listing."""

    def __init__(self, root: Path) -> None:
        bases = [root, root / "CBIS-DDSM", *sorted(root.glob("manifest-*/CBIS-DDSM"))]
        self.bases = [b for b in bases if b.is_dir()]
        self._listing: dict[Path, list[Path]] = {}

    def resolve(self, csv_value: str) -> _Resolution:
        rel = PurePosixPath(csv_value.replace("\\", "/").strip("/"))
        case = rel.parts[0]
        folders = [b / case for b in self.bases if (b / case).is_dir()]
        if not folders:
            return _Resolution(None, "missing", f"case folder {case}")
        if len(folders) > 1:
            return _Resolution(None, "ambiguous", f"case folder {case} exists in {len(folders)} places")
        dicoms = self._dicoms(folders[0])
        if not dicoms:
            return _Resolution(None, "missing", f"a .dcm file under {folders[0]}")
        return self._pick(folders[0], dicoms, rel)

    def _dicoms(self, folder: Path) -> list[Path]:
        if folder not in self._listing:
            self._listing[folder] = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".dcm")
        return self._listing[folder]

    def _pick(self, folder: Path, dicoms: list[Path], rel: PurePosixPath) -> _Resolution:
        if len(dicoms) == 1:
            return _Resolution(dicoms[0])
        exact = folder.joinpath(*rel.parts[1:])
        if exact in dicoms:
            return _Resolution(exact)
        # The CSV path is <case>/<StudyInstanceUID>/<SeriesInstanceUID>/<file>: match the series in the headers.
        if len(rel.parts) >= 3:
            series = [p for p in dicoms if _series_uid(p) == rel.parts[-2]]
            if len(series) == 1:
                return _Resolution(series[0])
        return _Resolution(None, "ambiguous", f"{len(dicoms)} .dcm files under {folder}, none matching the CSV path")


def _series_uid(path: Path) -> str:
    import pydicom

    try:
        return str(
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID
        )
    except Exception:  # an unreadable candidate just does not match; load_image reports it if it is ever used
        return ""


def _pathology(row: dict[str, str], csv_path: Path, line: int) -> int:
    value = cell(row, "pathology", csv_path, line)
    if value not in PATHOLOGY:
        raise FmcacheError(
            f"{csv_path} line {line}: pathology={value!r} is not one of {', '.join(PATHOLOGY)}; fix or remove the row"
        )
    return PATHOLOGY[value]


def _examples(items: list[str]) -> str:
    return "; ".join(items[:SHOW_MISSING])


# A case folder names one breast view of one patient; its mass and calc folders hold the same mammogram.
_CASE = re.compile(r"(?:Mass|Calc)-(?:Training|Test)_(P_\d+_(?:LEFT|RIGHT)_(?:CC|MLO))")
_PATIENT = re.compile(r"(?:^|_)(P_\d+)(?:_|$)")


@dataclass
class _Sample:
    path: Path
    label: int
    split: int
    where: str
    case: str
    key: str
    rows: list[dict[str, str]] = field(default_factory=list)  # the CSV rows merged into this mammogram


@dataclass
class _TciaSamples:
    """One sample per mammogram, merging abnormality rows and the mass/calc copies of the same image."""

    by_image: dict[str, _Sample] = field(default_factory=dict)
    rows_merged: int = 0
    copies_merged: int = 0
    moved_to_test: int = 0

    def add(self, csv_value: str, path: Path, label: int, split: int, where: str, row: dict[str, str]) -> None:
        case = PurePosixPath(csv_value.replace("\\", "/").strip("/")).parts[0]
        match = _CASE.fullmatch(case)
        key = match.group(1) if match else path.as_posix()
        sample = self.by_image.get(key)
        if sample is None:
            self.by_image[key] = _Sample(path, label, split, where, case, key if match else "", [row])
            return
        sample.rows.append(row)
        sample.label = max(sample.label, label)  # malignant if any abnormality is
        if path == sample.path:
            self.rows_merged += 1
            if sample.split != split:
                raise FmcacheError(
                    f"{NAME}: {path} belongs to both train and test ({sample.where}, {where}); use the official CSVs"
                )
            return
        self.copies_merged += 1
        sample.path = min(sample.path, path, key=str)  # keep one copy, the same one every time
        if sample.split != split:
            sample.split = TEST  # never train on an image that is also tested
            self.moved_to_test += 1

    def problems(self) -> list[str]:
        out = []
        if self.rows_merged:
            out.append(f"merged {self.rows_merged} abnormality rows that share a full mammogram (malignant if any is)")
        if self.copies_merged:
            out.append(f"merged {self.copies_merged} mammograms present in both the mass and calc sets")
        if self.moved_to_test:
            out.append(f"{self.moved_to_test} of them were train in one set and test in the other: kept in test")
        return out


def _load_tcia(root: Path, *, seed: int, val_fraction: float, ambiguous: str, by_patient: bool) -> DatasetIndex:
    resolver = _CaseResolver(root)
    samples = _TciaSamples()
    missing: list[str] = []
    unresolved: list[str] = []
    n_rows = 0
    csvs = _tcia_csvs(root)
    for csv_path, code in csvs:
        _, rows = read_csv(csv_path, ("pathology", PATH_COLUMN), dataset=NAME, root=root, expected=EXPECTED)
        for line, row in rows:
            n_rows += 1
            label = _pathology(row, csv_path, line)
            where = f"{csv_path.name} line {line}"
            value = cell(row, PATH_COLUMN, csv_path, line)
            found = resolver.resolve(value)
            if found.path is None:
                (missing if found.failure == "missing" else unresolved).append(f"{found.detail} ({where})")
            else:
                samples.add(value, found.path, label, code, where, row)
    _raise_unresolved(root, n_rows, missing, unresolved, ambiguous)
    problems = samples.problems()
    if unresolved:
        problems.append(f"skipped {len(unresolved)} ambiguous CSV row(s), e.g. {_examples(unresolved)}")
    return _tcia_index(
        root,
        list(samples.by_image.values()),
        csvs,
        problems,
        seed=seed,
        val_fraction=val_fraction,
        ambiguous=ambiguous,
        by_patient=by_patient,
    )


def _raise_unresolved(root: Path, n_rows: int, missing: list[str], unresolved: list[str], ambiguous: str) -> None:
    if missing:
        bases = f"{root}, {root / 'CBIS-DDSM'} (or manifest-*/CBIS-DDSM)"
        raise FmcacheError(
            f"{NAME}: {len(missing)} of {n_rows} CSV rows point at files not found under {bases}: "
            f"{_examples(missing)}; download the full-mammogram series of these cases or fix --data-root"
        )
    if unresolved and ambiguous == "error":
        raise FmcacheError(
            f"{NAME}: {len(unresolved)} of {n_rows} CSV rows stay ambiguous: {_examples(unresolved)}; keep only "
            "the full-mammogram DICOM in each case folder, or pass ambiguous='skip' to drop these rows"
        )


def _tcia_index(
    root: Path,
    samples: list[_Sample],
    csvs: list[tuple[Path, int]],
    problems: list[str],
    *,
    seed: int,
    val_fraction: float,
    ambiguous: str,
    by_patient: bool,
) -> DatasetIndex:
    if not samples:
        raise FmcacheError(f"{NAME}: no CSV row of {root} resolved to a DICOM file; check the download")
    samples = sorted(samples, key=lambda s: _canonical_key(s.path, root))
    official = np.array([s.split for s in samples], dtype=np.int8)
    split_info: dict = {
        "mode": "official+val",
        "seed": seed,
        "val_fraction": val_fraction,
        "val_unit": "image",
        "sources": [p.name for p, _ in csvs],
        "order": "path",
        "task": TASK_TCIA,
    }
    if by_patient:
        codes, moved = _patient_split([_patient_of(s) for s in samples], official, val_fraction, seed)
        split_info.update(mode="patient", val_unit="patient", patients_moved_to_test=moved[0])
        if moved[0]:
            problems = [
                *problems,
                f"{moved[0]} patient(s) had images in both the official train and test sets: "
                f"all their images are in test ({moved[1]} image(s) moved from train)",
            ]
    else:
        codes = _val_from_train(official, val_fraction, seed)
    metadata, notes = _tcia_metadata(samples)
    return build_index(
        name=NAME,
        root=root,
        paths=[s.path for s in samples],
        labels=np.array([s.label for s in samples]),
        split=codes,
        class_names=("benign", "malignant"),
        multilabel=False,
        split_info=split_info,
        options={"layout": "tcia", "ambiguous": ambiguous},
        problems=[*problems, *notes],
        metadata=metadata,
        raw_labels=np.array([[joined(r.get("pathology", "") for r in s.rows)] for s in samples]),
        raw_label_names=("pathology",),
        group_unit="patient",
    )


def _first_cell(rows: list[dict[str, str]], *columns: str) -> str:
    """The first non-blank value of any of ``columns`` (the mass and calc CSVs spell some headers differently)."""
    return next((row[c] for row in rows for c in columns if row.get(c)), "")


def _tcia_metadata(samples: list[_Sample]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Metadata columns of the merged TCIA samples (see the module docstring) and problem lines."""
    density, bad = numbers(_first_cell(s.rows, "breast_density", "breast density") for s in samples)
    patients = (_first_cell(s.rows, "patient_id") or _patient_of(s, required=False) for s in samples)
    columns = {
        "image_id": text(s.key for s in samples),
        "patient": text(patients),
        "breast_density": density,
        "view": text(_first_cell(s.rows, "image view") for s in samples),
        "laterality": text(_first_cell(s.rows, "left or right breast").lower() for s in samples),
        "abnormality_type": text(joined(r.get("abnormality type", "") for r in s.rows) for s in samples),
    }
    return columns, [f"{bad} breast density value(s) are not numbers; read as missing"] if bad else []


def _patient_of(sample: _Sample, required: bool = True) -> str:
    match = _PATIENT.search(sample.case)
    if match is None and not required:
        return ""
    if match is None:
        raise FmcacheError(
            f"{NAME}: no patient id P_NNNNN in case folder {sample.case!r} ({sample.where}); "
            "split='patient' needs the official case names"
        )
    return match.group(1)


def _patient_split(
    patients: list[str], official: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Codes with no patient in two splits, and (patients, images) moved from official train to test.

    A patient with any official test image goes to test entirely (the official test set is what results are
    compared on, so it keeps every image it had). ``val_fraction`` of the other patients (sorted ids, seeded
    permutation, half up) go to val.
    """
    in_test = {p for p, code in zip(patients, official, strict=True) if code == TEST}
    crossing = {p for p, code in zip(patients, official, strict=True) if code == TRAIN and p in in_test}
    train_patients = sorted({p for p in patients if p not in in_test})
    n_val = int(len(train_patients) * val_fraction + 0.5)
    order = np.random.RandomState(seed).permutation(len(train_patients))
    val_patients = {train_patients[i] for i in order[:n_val]}
    codes = np.array([TEST if p in in_test else VAL if p in val_patients else TRAIN for p in patients], dtype=np.int8)
    moved_images = int(sum(1 for p, code in zip(patients, official, strict=True) if code == TRAIN and p in crossing))
    return codes, (len(crossing), moved_images)


def _val_from_train(official: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Move ``val_fraction`` of the official train images (a seeded permutation, half up) to val."""
    split = official.copy()
    train = np.flatnonzero(official == TRAIN)
    n_val = int(len(train) * val_fraction + 0.5)
    split[train[np.random.RandomState(seed).permutation(len(train))[:n_val]]] = VAL
    return split
