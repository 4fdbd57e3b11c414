"""Tiny fake external-validation datasets in their official layouts (see each loader's docstring for the facts).

Each ``make_X(root, ...)`` writes into ``root`` and returns the folder to pass as the data root; contents are
seeded, so the same arguments write the same files. Images are 32×32 PNG/JPEG (PIL) or DICOM (pydicom).
"""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from tests.fixtures_data import CHEXPERT_OBSERVATIONS, SIZE, write_csv, write_dicom, write_image

PAD_COLUMNS = (
    "patient_id", "lesion_id", "smoke", "drink", "background_father", "background_mother", "age", "pesticide",
    "gender", "skin_cancer_history", "cancer_history", "has_piped_water", "has_sewage_system", "fitspatrick",
    "region", "diameter_1", "diameter_2", "diagnostic", "itch", "grew", "hurt", "changed", "bleed", "elevation",
    "img_id", "biopsed",
)  # fmt: skip
PAD_CLASSES = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def make_pad_ufes20(root: Path, n: int = 24, seed: int = 0, flat: bool = False) -> Path:
    """``metadata.csv`` (all 26 release columns, rows shuffled) + images split over ``imgs_part_1/imgs_part_1/``
    (nested, as the zip unpacks), ``imgs_part_2/`` and ``imgs_part_3/`` (or one ``images/`` with ``flat``).

    Image i: patient ``PAT_{i // 3}``, lesion ``{100 + i // 2}``, diagnostic ``PAD_CLASSES[i % 6]``, age 40 + i
    (blank for every 5th image), gender FEMALE for even patients.
    """
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        patient, lesion = f"PAT_{i // 3}", str(100 + i // 2)
        img_id = f"{patient}_{lesion}_{i}.png"
        folder = root / "images" if flat else root / ("imgs_part_1/imgs_part_1", "imgs_part_2", "imgs_part_3")[i % 3]
        write_image(folder / img_id, rng)
        values = {c: "False" for c in PAD_COLUMNS}
        values.update(patient_id=patient, lesion_id=lesion, age="" if i % 5 == 4 else str(40 + i),
                      gender=("FEMALE", "MALE")[(i // 3) % 2], fitspatrick="3.0", region="NECK",
                      diameter_1="6.0", diameter_2="5.0", diagnostic=PAD_CLASSES[i % 6], img_id=img_id)  # fmt: skip
        rows.append([values[c] for c in PAD_COLUMNS])
    rng.shuffle(rows)
    write_csv(root / "metadata.csv", PAD_COLUMNS, rows)
    return root


def make_messidor2(root: Path, n: int = 12, seed: int = 0, pairs: bool = True) -> Path:
    """``IMAGES/`` (even i: Messidor ``2005102{i}_4380{i}_0100_PP.png``; odd i: Brest ``IM00{i}.JPG``, which the grades
    CSV spells ``.jpg``), ``messidor_data.csv`` (grade i % 5; image 3 ungradable with a blank grade) and, with
    ``pairs``, ``messidor-2.csv`` pairing images 2k and 2k+1 as one exam. One extra image has no CSV row."""
    rng = np.random.RandomState(seed)
    names = [f"20051020_{43800 + i}_0100_PP.png" if i % 2 == 0 else f"IM{i:06d}.JPG" for i in range(n)]
    for name in [*names, "IM999999.JPG"]:
        write_image(root / "IMAGES" / name, rng)
    rows = []
    for i, name in enumerate(names):
        csv_name = name.replace(".JPG", ".jpg")
        gradable = i != 3
        rows.append([csv_name, str(i % 5) if gradable else "", str(i % 2), "1" if gradable else "0"])
    write_csv(root / "messidor_data.csv", ("image_id", "adjudicated_dr_grade", "adjudicated_dme",
                                           "adjudicated_gradable"), rows)  # fmt: skip
    if pairs:
        lines = ["left;right", *(f"{names[k]};{names[k + 1]}" for k in range(0, n - 1, 2))]
        (root / "messidor-2.csv").write_text("\n".join(lines) + "\n")
    return root


def nih_labels(i: int) -> str:
    """Finding Labels of image i: every 4th has No Finding, else one or two findings."""
    if i % 4 == 0:
        return "No Finding"
    first, second = NIH_FINDINGS[i % 14], NIH_FINDINGS[(i * 5) % 14]
    return first if first == second or i % 3 else f"{first}|{second}"


def make_chestxray14(root: Path, n: int = 24, seed: int = 0, flat: bool = False) -> Path:
    """``Data_Entry_2017_v2020.csv`` with the release's header (bracketed columns, trailing comma), PNGs in
    ``images_001/images/`` and ``images_002/images/`` (or ``images/``), and the official lists: patients
    (``i // 3 + 1``, three images each) with an even id are test."""
    rng = np.random.RandomState(seed)
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")  # fmt: skip
    lines, train, test = [header], [], []
    for i in range(n):
        patient = i // 3 + 1
        name = f"{patient:08d}_{i % 3:03d}.png"
        folder = root / "images" if flat else root / f"images_{1 + i * 2 // n:03d}" / "images"
        write_image(folder / name, rng, gray=True)
        lines.append(f"{name},{nih_labels(i)},{i % 3},{patient},{50 + i},{'MF'[i % 2]},{('PA', 'AP')[i % 2]},"
                     "2500,2048,0.143,0.143,")  # fmt: skip
        (test if patient % 2 == 0 else train).append(name)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def _write_gz_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    with gzip.open(path, "wt", newline="") as handle:
        handle.write(buffer.getvalue())


def make_mimic_cxr(root: Path, subjects: int = 6, seed: int = 0) -> Path:
    """MIMIC-CXR-JPG 2.0.0: gzipped chexpert / split / metadata CSVs and ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``.

    Subject k (``1000000k``) has two studies with two images each (PA then LATERAL); subject k's split is
    train, validate or test by k % 3. The last study has no chexpert row (its two images are left out).
    Label values cycle through 1.0 / 0.0 / -1.0 / blank."""
    rng = np.random.RandomState(seed)
    observations = sorted(CHEXPERT_OBSERVATIONS)  # the release orders its columns alphabetically
    labels, splits, meta = [], [], []
    for k in range(subjects):
        subject = f"1000000{k}"
        for s in range(2):
            study = f"5{k}{s}00000"
            values = [("1.0", "0.0", "-1.0", "")[(k + s + j) % 4] for j in range(len(observations))]
            if (k, s) != (subjects - 1, 1):
                labels.append([subject, study, *values])
            for v, view in enumerate(("PA", "LATERAL")):
                dicom = f"d{k}{s}{v}-abcd"
                write_image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", rng,
                            gray=True)  # fmt: skip
                splits.append([dicom, study, subject, ("train", "validate", "test")[k % 3]])
                meta.append([dicom, subject, study, view, "2000", "2000"])
    _write_gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ("subject_id", "study_id", *observations), labels)
    _write_gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ("dicom_id", "study_id", "subject_id", "split"), splits)
    _write_gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
                  ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"), meta)  # fmt: skip
    return root


def write_mammogram(path: Path, rng: np.random.RandomState, side: str, view: str) -> Path:
    """A DICOM mammogram with ImageLaterality and a ViewCodeSequence (as CMMD's files carry them)."""
    import pydicom
    from pydicom.dataset import Dataset

    write_dicom(path, rng.randint(0, 4096, (SIZE, SIZE)))
    ds = pydicom.dcmread(path)
    ds.ImageLaterality = side
    code = Dataset()
    code.CodeMeaning = {"CC": "cranio-caudal", "MLO": "medio-lateral oblique"}[view]
    ds.ViewCodeSequence = [code]
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.save_as(path, write_like_original=False)
    return path


CMMD_COLUMNS = ("ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype")


def cmmd_rows(patients: int) -> list[list[str]]:
    """Clinical rows: patient k has its left breast labelled (malignant for odd k); patient 0 also its right."""
    rows = []
    for k in range(patients):
        pid = f"D{1 + k % 2}-{k + 1:04d}"
        malignant = k % 2 == 1
        rows.append([pid, "L", str(40 + k), "2", "mass", "Malignant" if malignant else "Benign",
                     "Luminal A" if malignant else ""])  # fmt: skip
    rows.append([rows[0][0], "R", "40", "2", "calcification", "Malignant", ""])
    return rows


def make_cmmd(root: Path, patients: int = 4, seed: int = 0, sheet: str = "csv") -> Path:
    """CMMD: the clinical sheet (``sheet`` = "csv" comma-separated, "csv;" semicolon-separated, or "xlsx") and
    ``manifest-1/CMMD/<ID1>/<study>/<series>/1-N.dcm``: CC and MLO of both breasts per patient, so the right
    breast of patients 1.. (no clinical row) is skipped."""
    rng = np.random.RandomState(seed)
    rows = cmmd_rows(patients)
    for k in range(patients):
        series = root / "manifest-1" / "CMMD" / rows[k][0] / "07-18-2010-NA-NA-1" / "1.000000-NA-2"
        for n, (side, view) in enumerate((("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")), start=1):
            write_mammogram(series / f"1-{n}.dcm", rng, side, view)
    if sheet == "xlsx":
        write_xlsx(root / "CMMD_clinicaldata_revision.xlsx", CMMD_COLUMNS, rows)
    elif sheet == "csv;":
        lines = [";".join(CMMD_COLUMNS), *(";".join(r) for r in rows)]
        (root / "CMMD_clinicaldata_revision.csv").write_text("\n".join(lines) + "\n")
    else:
        write_csv(root / "CMMD_clinicaldata_revision.csv", CMMD_COLUMNS, rows)
    return root


def write_xlsx(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    """A minimal one-sheet .xlsx (inline strings; numbers as numbers), written without openpyxl."""

    def cell(value: str) -> str:
        try:
            return f"<c><v>{float(value):g}</v></c>"
        except ValueError:
            return f'<c t="inlineStr"><is><t>{escape(value)}</t></is></c>'

    body = "".join(f"<row>{''.join(cell(v) for v in row)}</row>" for row in [header, *rows])
    parts = {
        "[Content_Types].xml": '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/><Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>',
        "_rels/.rels": '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": '<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"><sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>{body}</sheetData></worksheet>',
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in parts.items():
            archive.writestr(name, text)
    return path


IDRID_PART = "B. Disease Grading"


def make_idrid(root: Path, n_train: int = 8, n_test: int = 4, seed: int = 0, doubled: bool = True) -> Path:
    """IDRiD part B as the zip unpacks (``B. Disease Grading/B. Disease Grading/`` with ``doubled``): both sets
    start at IDRiD_001; grade i % 5, DME risk i % 3; the training CSV has the release's trailing-space header and
    empty padding columns."""
    rng = np.random.RandomState(seed)
    part = root / IDRID_PART / IDRID_PART if doubled else root / IDRID_PART
    for set_folder, csv_name, count in (
        ("a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv", n_train),
        ("b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv", n_test),
    ):
        rows = []
        for i in range(count):
            name = f"IDRiD_{i + 1:03d}"
            write_image(part / "1. Original Images" / set_folder / f"{name}.jpg", rng)
            rows.append([name, str(i % 5), str(i % 3), "", ""])
        header = ("Image name", "Retinopathy grade", "Risk of macular edema ", "", "")
        write_csv(part / "2. Groundtruths" / csv_name, header, rows)
    return root


def make_eyepacs(root: Path, patients: int = 6, test_patients: int = 3, seed: int = 0) -> Path:
    """Kaggle DR 2015: ``trainLabels.csv`` + ``train/<k>_left.jpeg``, ``<k>_right.jpeg`` for ``patients``
    patients (level (k + eye) % 5) and, when ``test_patients``, ``retinopathy_solution.csv`` (Usage Public for
    even k) + ``test/``."""
    rng = np.random.RandomState(seed)
    for csv_name, folder, first, count in (("trainLabels.csv", "train", 10, patients),
                                           ("retinopathy_solution.csv", "test", 500, test_patients)):  # fmt: skip
        if not count:
            continue
        rows = []
        for k in range(first, first + count):
            for e, eye in enumerate(("left", "right")):
                write_image(root / folder / f"{k}_{eye}.jpeg", rng)
                rows.append([f"{k}_{eye}", str((k + e) % 5), ("Public", "Private")[k % 2]])
        header = ("image", "level", "Usage") if folder == "test" else ("image", "level")
        write_csv(root / csv_name, header, [r[: len(header)] for r in rows])
    return root


def make_ham10000(root: Path, n: int = 21, seed: int = 0) -> Path:
    """``HAM10000_metadata.csv`` (with the newer ``dataset`` column) + ``HAM10000_images_part_1/`` and ``_part_2/``.

    Image i is ``ISIC_{24306 + i:07d}`` of lesion ``HAM_{i // 2:07d}``, dx ``HAM_CLASSES[(i // 2) % 7]``."""
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        image = f"ISIC_{24306 + i:07d}"
        write_image(root / f"HAM10000_images_part_{1 + i % 2}" / f"{image}.jpg", rng)
        rows.append([f"HAM_{i // 2:07d}", image, HAM_CLASSES[(i // 2) % 7], "histo", str(30 + i), "male", "back",
                     "vidir_modern"])  # fmt: skip
    header = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
    write_csv(root / "HAM10000_metadata.csv", header, rows)
    return root


VINDR_COLUMNS = ("study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                 "breast_birads", "breast_density", "split")  # fmt: skip


def make_vindr_mammo(root: Path, studies: int = 5, seed: int = 0) -> Path:
    """``breast-level_annotations.csv`` + ``images/<study_id>/<image_id>.dicom``: four views per study; study s has
    BI-RADS (s % 5) + 1 on both breasts, density A..D by s, split training except the last two studies (test)."""
    rng = np.random.RandomState(seed)
    rows = []
    for s in range(studies):
        study = f"st{s:04d}"
        for side in ("L", "R"):
            for view in ("CC", "MLO"):
                image = f"im{s:02d}{side}{view}"
                write_dicom(root / "images" / study / f"{image}.dicom", rng.randint(0, 4096, (SIZE, SIZE)))
                rows.append([study, f"se{s}", image, side, view, str(SIZE), str(SIZE), f"BI-RADS {s % 5 + 1}",
                             f"DENSITY {'ABCD'[s % 4]}", "test" if s >= studies - 2 else "training"])  # fmt: skip
    write_csv(root / "breast-level_annotations.csv", VINDR_COLUMNS, rows)
    return root
