"""Generators of tiny fake datasets laid out exactly like the official releases, for tests.

Each ``make_X(root, n, seed)`` writes into ``root`` (created if needed) and returns the folder to pass as the
data root. Images are 32×32 and random but seeded, so every call with the same arguments writes the same
content. Usage from another test: ``from tests.fixtures_data import make_aptos; root = make_aptos(tmp_path, n=40)``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
TCIA_MASS_COLUMNS = (
    "patient_id",
    "breast_density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "mass shape",
    "mass margins",
    "assessment",
    "pathology",
    "subtlety",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
)


def write_image(path: Path, rng: np.random.RandomState, gray: bool = False, size: int = SIZE) -> Path:
    """A random 8-bit image (RGB, or L when ``gray``) at ``path``; the format follows the suffix."""
    shape = (size, size) if gray else (size, size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """A CSV with ``header`` and ``rows`` at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    series_uid: str | None = None,
) -> Path:
    """A minimal valid 16-bit grayscale DICOM file. ``window`` is (center, width), ``rescale`` (slope, intercept)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    uid = generate_uid(entropy_srcs=[str(path)])  # deterministic per path
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(path), "study"])
    ds.SeriesInstanceUID = series_uid or generate_uid(entropy_srcs=[str(path), "series"])
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False  # pydicom 2.x
        pydicom.dcmwrite(path, ds, write_like_original=False)
    return path


def make_aptos(root: Path, n: int = 40, seed: int = 0) -> Path:
    """APTOS 2019: ``train.csv`` (id_code, diagnosis 0-4, rows unsorted) + ``train_images/<id_code>.png``."""
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"{rng.randint(16**8):08x}{i:04x}" for i in range(n)]
    labels = rng.permutation([i % 5 for i in range(n)])
    for id_code in ids:
        write_image(root / "train_images" / f"{id_code}.png", rng)
    write_csv(root / "train.csv", ("id_code", "diagnosis"), list(zip(ids, labels, strict=True)))
    return root


def make_isic(root: Path, n: int = 40, seed: int = 0, metadata: bool = False) -> Path:
    """ISIC 2019: one-hot ground-truth CSV (UNK always 0.0) + ``ISIC_2019_Training_Input/<image>.jpg``.

    With ``metadata``, also ``ISIC_2019_Training_Metadata.csv`` (image, age_approx, anatom_site_general,
    lesion_id, sex): image i belongs to lesion ``BCN_{i // 3}`` (three photographs per lesion), except that every
    fifth image has a blank lesion_id, as many non-HAM images do in the release.
    """
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(rng.permutation([i % 8 for i in range(n)])):
        image = f"ISIC_{i * 7 + 1000:07d}"
        rows.append([image, *("1.0" if j == label else "0.0" for j in range(len(ISIC_COLUMNS)))])
        write_image(root / "ISIC_2019_Training_Input" / f"{image}.jpg", rng)
    rng.shuffle(rows)
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ("image", *ISIC_COLUMNS), rows)
    if metadata:
        meta = [
            [f"ISIC_{i * 7 + 1000:07d}", "55.0", "anterior torso", "" if i % 5 == 4 else f"BCN_{i // 3:07d}", "male"]
            for i in range(n)
        ]
        header = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")
        write_csv(root / "ISIC_2019_Training_Metadata.csv", header, meta)
    return root


def make_ddsm_lists(root: Path, n: int = 30, seed: int = 0) -> Path:
    """CBIS-DDSM, the seed's layout: ``ddsm_raw/<prefix>_....jpg`` + ``ddsm_raw_image_lists/{train,val,test}.txt``.

    Prefixes cycle normal/benign/cancer; the first 60% of the (shuffled) images are train, then 20% val, 20% test.
    """
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{('normal', 'benign', 'cancer')[i % 3]}_{i:03d}_1.LEFT_CC.jpg" for i in range(n)]
    for name in names:
        write_image(root / "ddsm_raw" / name, rng, gray=True)
    order = [names[i] for i in rng.permutation(n)]
    cuts = (int(0.6 * n), int(0.8 * n))
    lists = root / "ddsm_raw_image_lists"
    lists.mkdir(exist_ok=True)
    for split, chunk in zip(("train", "val", "test"), np.split(np.array(order), cuts), strict=True):
        (lists / f"{split}.txt").write_text("".join(f"{name}\n" for name in chunk))
    return root


def _tcia_case(kind: str, split: str, i: int, per_patient: int = 1) -> str:
    # Up to 3 consecutive cases differ in side or view, so with per_patient <= 3 no patient repeats a view.
    side, view = ("LEFT", "RIGHT")[i % 2], ("CC", "MLO")[(i // 2) % 2]
    patient = i // per_patient
    return f"{kind.capitalize()}-{'Training' if split == 'train' else 'Test'}_P_{patient:05d}_{side}_{view}"


def make_ddsm_tcia(root: Path, n: int = 12, seed: int = 0, per_patient: int = 1) -> Path:
    """CBIS-DDSM, TCIA layout, with ``n`` full mammograms (DICOM) half train, half test, mass and calc alternating.

    On disk the inner folders differ from the CSV paths (as in real NBIA downloads):
    ``CBIS-DDSM/<case>/07-20-2016-DDSM-NNNNN/1.000000-full mammogram images-NNNNN/1-1.dcm``, next to cropped/ROI
    ``<case>_1/`` folders. Cases cycle through four abnormality patterns (see ``patterns``): case i is malignant
    iff i % 4 < 2, and cases with i % 2 == 1 have two CSV rows for the same full mammogram. Case i belongs to
    patient ``P_{i // per_patient}`` (1 to 3 views of one patient), so with ``per_patient`` > 1 a patient can
    have views in both the official train and test sets.
    """
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    # Abnormality rows per case, cycling: one malignant; benign + malignant; benign; two benign kinds.
    patterns = (
        ("MALIGNANT",),
        ("BENIGN", "MALIGNANT"),
        ("BENIGN_WITHOUT_CALLBACK",),
        ("BENIGN", "BENIGN_WITHOUT_CALLBACK"),
    )
    rows: dict[str, list[list[str]]] = {}
    for i in range(n):
        kind, split = ("mass", "calc")[i % 2], ("train", "test")[int(i >= n // 2)]
        case = _tcia_case(kind, split, i, per_patient)
        csv_path = f"{case}/1.3.6.1.4.1.9590.100.1.2.{1000 + i}/1.3.6.1.4.1.9590.100.1.2.{2000 + i}/000000.dcm"
        pixels = rng.randint(0, 4096, (SIZE, SIZE))
        series = root / "CBIS-DDSM" / case / f"07-20-2016-DDSM-{rng.randint(99999):05d}"
        write_dicom(series / f"1.000000-full mammogram images-{rng.randint(99999):05d}" / "1-1.dcm", pixels)
        write_dicom(root / "CBIS-DDSM" / f"{case}_1" / "x" / "1.000000-ROI mask images-1" / "1-1.dcm", pixels)
        crop = f"{case}_1/1.3.6.1.4.1.9590.100.1.2.{3000 + i}/1.3.6.1.4.1.9590.100.1.2.{4000 + i}/000000.dcm"
        for a, pathology in enumerate(patterns[i % 4], start=1):
            row = [
                f"P_{i // per_patient:05d}",
                "3",
                case.split("_")[-2],
                case.split("_")[-1],
                str(a),
                kind,
                "OVAL",
                "SPICULATED",
            ]
            rows.setdefault(f"{kind}_case_description_{split}_set.csv", []).append(
                [*row, "4", pathology, "3", csv_path, crop, crop]
            )
    for kind in ("mass", "calc"):
        for split in ("train", "test"):
            name = f"{kind}_case_description_{split}_set.csv"
            write_csv(root / name, TCIA_MASS_COLUMNS, rows.get(name, []))
    return root


def make_chexpert(root: Path, n: int = 40, seed: int = 0) -> Path:
    """CheXpert-v1.0-small with train.csv (``n`` rows, unsorted, 1.0/0.0/-1.0/blank labels; every 7th row all
    blank) and valid.csv (6 rows). Two views per patient. Returns the parent of the CheXpert folder."""
    rng = np.random.RandomState(seed)
    chex = root / "CheXpert-v1.0-small"
    header = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS)

    def rows_for(part: str, count: int, first_patient: int) -> list[list[str]]:
        rows = []
        for i in range(count):
            view = ("frontal", "lateral")[i % 2]
            rel = f"{part}/patient{first_patient + i // 2:05d}/study1/view{i % 2 + 1}_{view}.jpg"
            write_image(chex / rel, rng, gray=True)
            values = rng.choice(["1.0", "0.0", "-1.0", ""], size=len(CHEXPERT_OBSERVATIONS), p=[0.2, 0.2, 0.2, 0.4])
            if i % 7 == 0:
                values[:] = ""
            rows.append([f"CheXpert-v1.0-small/{rel}", "Female", "60", view.capitalize(), "AP", *values])
        rng.shuffle(rows)
        return rows

    write_csv(chex / "train.csv", header, rows_for("train", n, 1))
    write_csv(chex / "valid.csv", header, rows_for("valid", 6, 64541))
    return root


def make_csv(root: Path, n: int = 30, seed: int = 0, multilabel: bool = False) -> Path:
    """A generic manifest ``labels.csv`` with ``path`` (relative, under images/) and ``label`` (benign/malignant/
    normal), or with 0/1/blank columns ``a``, ``b``, ``c`` when ``multilabel`` (pass label_columns="a,b,c")."""
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rel = f"images/img_{i:03d}.png"
        write_image(root / rel, rng)
        if multilabel:
            rows.append([rel, *rng.choice(["1", "0", ""], size=3, p=[0.4, 0.4, 0.2])])
        else:
            rows.append([rel, ("benign", "malignant", "normal")[i % 3]])
    header = ("path", "a", "b", "c") if multilabel else ("path", "label")
    write_csv(root / "labels.csv", header, rows)
    return root


def make_imagefolder(root: Path, n: int = 30, seed: int = 0, splits: bool = False) -> Path:
    """Class folders ``root/<class>/img_NNN.png`` (classes benign/malignant/normal), or with ``splits``
    ``root/{train,val,test}/<class>/...`` (60/20/20 of the images)."""
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cls = ("benign", "malignant", "normal")[i % 3]
        folder = root / ("train", "train", "train", "val", "test")[i % 5] / cls if splits else root / cls
        write_image(folder / f"img_{i:03d}.png", rng)
    return root
