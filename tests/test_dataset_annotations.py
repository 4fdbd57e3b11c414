"""Raw labels, per-sample metadata and the bootstrap unit in the DatasetIndex, for the four paper loaders."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from fmcache.data import describe, format_description, load_dataset
from fmcache.data.index import DatasetIndex, build_index
from fmcache.data.registry import DATASETS, PAPER_DATASETS
from tests.fixtures_data import (
    CHEXPERT_OBSERVATIONS,
    make_aptos,
    make_chexpert,
    make_ddsm_tcia,
    make_isic,
    write_image,
)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def by_id(index: DatasetIndex, column: str = "image_id") -> dict[str, int]:
    return {value: i for i, value in enumerate(index.metadata[column].tolist())}


# ---------------------------------------------------------------------------------------------------------
# DatasetIndex semantics


def tiny_index(**extra: object) -> DatasetIndex:
    fields = {
        "name": "toy",
        "root": Path("/data"),
        "paths": [Path(f"/data/{i}.png") for i in range(4)],
        "labels": np.array([0, 1, 0, 1]),
        "split": np.array([0, 1, 2, 2]),
        "class_names": ("a", "b"),
        "multilabel": False,
        "split_info": {"mode": "toy"},
    }
    return build_index(**{**fields, **extra})  # type: ignore[arg-type]


def test_metadata_columns_are_typed_frozen_and_selected() -> None:
    index = tiny_index(
        metadata={"patient": ["p1", "p1", None, "p2"], "age": [50, np.nan, 61, 70]},
        raw_labels=np.array([["x"], ["y"], ["x"], ["z"]]),
        raw_label_names=["finding"],
        group_unit="patient",
    )
    assert index.metadata["patient"].dtype.kind == "U" and index.metadata["patient"].tolist() == ["p1", "p1", "", "p2"]
    assert index.metadata["age"].dtype == np.float64 and math.isnan(index.metadata["age"][1])
    with pytest.raises(ValueError, match="read-only"):
        index.metadata["age"][0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        index.raw_labels[0, 0] = "q"  # type: ignore[index]
    # A blank unit cell is its own unit; the prefixes keep unit values and image keys apart.
    assert index.groups().tolist() == ["patient:p1", "patient:p1", "image:2", "patient:p2"]
    test = index.select(index.indices("test"))
    assert test.metadata["patient"].tolist() == ["", "p2"] and test.raw_labels.tolist() == [["x"], ["z"]]
    assert test.group_unit == "patient" and test.raw_label_names == ("finding",)
    np.testing.assert_array_equal(index.subset(1).metadata["age"], [50.0, np.nan, 61.0])  # one sample per split


def test_index_rejects_bad_annotations() -> None:
    with pytest.raises(AssertionError, match="one value per sample"):
        tiny_index(metadata={"age": [1, 2, 3]})
    with pytest.raises(AssertionError, match="raw_labels must be"):
        tiny_index(raw_labels=np.zeros((4, 2)), raw_label_names=["only one"])
    with pytest.raises(AssertionError, match="group_unit must name a text metadata column"):
        tiny_index(metadata={"age": [1, 2, 3, 4]}, group_unit="age")


def test_annotations_stay_out_of_the_labels_fingerprint() -> None:
    plain = tiny_index()
    annotated = tiny_index(metadata={"patient": ["a", "b", "c", "d"]}, group_unit="patient",
                           raw_labels=np.ones((4, 1)), raw_label_names=["r"])  # fmt: skip
    other = tiny_index(metadata={"patient": ["a", "b", "c", "e"]}, group_unit="patient",
                       raw_labels=np.ones((4, 1)), raw_label_names=["r"])  # fmt: skip
    # Every cache key hangs on labels_fingerprint: annotations must never move it.
    assert plain.labels_fingerprint() == annotated.labels_fingerprint() == other.labels_fingerprint()
    assert annotated.annotations_fingerprint() != other.annotations_fingerprint()
    assert plain.annotations_fingerprint() != annotated.annotations_fingerprint()
    assert plain.groups().tolist() == ["image:0", "image:1", "image:2", "image:3"]


def test_external_mode_has_one_note_instead_of_empty_split_lines() -> None:
    index = tiny_index(split=np.array([2, 2, 2, 2]), split_info={"mode": "external"})
    assert len(index.problems) == 1 and "external evaluation set" in index.problems[0]
    assert "the train split is empty" in tiny_index(split=np.array([2, 2, 2, 2])).problems


# ---------------------------------------------------------------------------------------------------------
# The paper loaders


def test_aptos_raw_labels_and_image_id(tmp_path: Path) -> None:
    root = make_aptos(tmp_path, n=10)
    index = load_dataset("aptos2019", root)
    rows = {r["id_code"]: int(r["diagnosis"]) for r in read_rows(root / "train.csv")}
    assert index.metadata["image_id"].tolist() == [p.stem for p in index.paths]
    assert index.raw_label_names == ("diagnosis",)
    assert index.raw_labels[:, 0].tolist() == [rows[p.stem] for p in index.paths]  # type: ignore[index]
    assert index.group_unit is None and len(set(index.groups().tolist())) == 10


def test_isic_metadata_from_the_optional_csv(tmp_path: Path) -> None:
    root = make_isic(tmp_path / "with", n=15, metadata=True)
    index = load_dataset("isic2019", root)
    truth = {r["image"]: r for r in read_rows(root / "ISIC_2019_Training_GroundTruth.csv")}
    meta = {r["image"]: r for r in read_rows(root / "ISIC_2019_Training_Metadata.csv")}
    assert index.raw_label_names == ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
    for i, image in enumerate(index.metadata["image_id"].tolist()):
        assert index.paths[i].stem == image
        assert index.raw_labels[i].tolist() == [float(truth[image][c]) for c in index.raw_label_names]  # type: ignore[index]
        assert index.metadata["lesion_id"][i] == meta[image]["lesion_id"]
        assert index.metadata["sex"][i] == "male" and index.metadata["anatom_site_general"][i] == "anterior torso"
    assert index.metadata["age_approx"].tolist() == [55.0] * 15
    assert index.group_unit == "lesion_id"
    # Image i is lesion BCN_{i // 3} except every fifth, which has none: 5 lesions + 3 lone images.
    assert len(set(index.groups().tolist())) == 8


def test_isic_without_metadata_csv_has_no_metadata_columns(tmp_path: Path) -> None:
    index = load_dataset("isic2019", make_isic(tmp_path, n=10))
    assert set(index.metadata) == {"image_id"} and index.group_unit is None
    assert not index.problems


def test_isic_metadata_csv_missing_some_images_and_columns(tmp_path: Path) -> None:
    root = make_isic(tmp_path, n=10)
    (root / "ISIC_2019_Training_Metadata.csv").write_text("image,lesion_id\nISIC_0001000,BCN_1\n")
    index = load_dataset("isic2019", root)
    assert set(index.metadata) == {"image_id", "lesion_id"}
    assert index.metadata["lesion_id"].tolist().count("BCN_1") == 1
    assert any("does not list 9 image(s)" in p for p in index.problems)
    assert any("lacks metadata column(s) 'age_approx'" in p for p in index.problems)


def test_chexpert_metadata_and_raw_labels(tmp_path: Path) -> None:
    root = make_chexpert(tmp_path, n=40)
    index = load_dataset("chexpert", root, uncertain="ones", valid="test")
    rows = {r["Path"].split("/", 1)[1]: r for name in ("train.csv", "valid.csv")
            for r in read_rows(root / "CheXpert-v1.0-small" / name)}  # fmt: skip
    assert index.raw_label_names == CHEXPERT_OBSERVATIONS and index.group_unit == "patient"
    for i, path in enumerate(index.paths):
        rel = index.relative(path)
        row = rows[rel]
        patient, study = rel.split("/")[1:3]
        assert index.metadata["patient"][i] == patient and index.metadata["study"][i] == f"{patient}/{study}"
        assert index.metadata["view"][i] == row["Frontal/Lateral"] and index.metadata["ap_pa"][i] == "AP"
        assert index.metadata["sex"][i] == "Female" and index.metadata["age"][i] == 60.0
        raw = [math.nan if row[c] == "" else float(row[c]) for c in CHEXPERT_OBSERVATIONS]
        np.testing.assert_array_equal(index.raw_labels[i], raw)  # type: ignore[index]
    # Raw labels keep the -1 that U-Ones turned into 1.
    assert np.any(index.raw_labels == -1) and not np.any(index.labels == -1)
    assert len(set(index.groups().tolist())) == 23  # 20 train patients + 3 valid patients


def test_chexpert_without_demographic_columns(tmp_path: Path) -> None:
    root = make_chexpert(tmp_path, n=40)
    path = root / "CheXpert-v1.0-small" / "train.csv"
    rows = read_rows(path)
    header = ["Path", *CHEXPERT_OBSERVATIONS]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[r[c] for c in header] for r in rows])
    index = load_dataset("chexpert", root)
    assert set(index.metadata) == {"patient", "study"}
    assert any("lacks metadata column(s) 'Sex', 'Age'" in p for p in index.problems)


def test_ddsm_lists_metadata_from_the_seeds_file_names(tmp_path: Path) -> None:
    rng = np.random.RandomState(0)
    names = {
        "train.txt": ["cancer_05-C_0128_1.LEFT_CC.LJPEG.1.jpg", "cancer_05-C_0128_1.LEFT_MLO.LJPEG.1.jpg"],
        "val.txt": ["normal_08-A_1045_1.RIGHT_CC.LJPEG.1.jpg"],
        "test.txt": ["benign_01-B_3091_1.LEFT_CC.LJPEG.1.jpg"],
    }
    for file_name, entries in names.items():
        for entry in entries:
            write_image(tmp_path / "ddsm_raw" / entry, rng, gray=True)
        (tmp_path / "ddsm_raw_image_lists").mkdir(exist_ok=True)
        (tmp_path / "ddsm_raw_image_lists" / file_name).write_text("\n".join(entries) + "\n")
    index = load_dataset("cbis_ddsm", tmp_path)
    row = by_id(index)["cancer_05-C_0128_1.LEFT_MLO.LJPEG.1"]
    assert index.metadata["patient"][row] == "C_0128" and index.metadata["view"][row] == "MLO"
    assert index.metadata["laterality"][row] == "left"
    assert index.raw_labels[:, 0].tolist() == ["benign", "cancer", "cancer", "normal"]  # type: ignore[index]
    assert index.group_unit == "patient" and len(set(index.groups().tolist())) == 3
    assert index.labels.tolist() == [1, 1, 1, 0]


def test_ddsm_lists_names_without_a_case_give_no_patient(tmp_path: Path) -> None:
    from tests.fixtures_data import make_ddsm_lists

    index = load_dataset("cbis_ddsm", make_ddsm_lists(tmp_path, n=9))
    assert "patient" not in index.metadata and index.group_unit is None
    assert set(index.metadata["laterality"].tolist()) == {"left"}


def test_ddsm_tcia_metadata_merges_rows(tmp_path: Path) -> None:
    root = make_ddsm_tcia(tmp_path, n=8, per_patient=2)
    index = load_dataset("cbis_ddsm", root)
    rows: dict[str, list[dict[str, str]]] = {}
    for path in root.glob("*_case_description_*_set.csv"):
        for row in read_rows(path):
            case = row["image file path"].split("/")[0]
            rows.setdefault(case.split("_", 1)[1], []).append(row)
    assert index.group_unit == "patient" and index.raw_label_names == ("pathology",)
    for i, image in enumerate(index.metadata["image_id"].tolist()):
        own = rows[image]
        assert index.metadata["patient"][i] == own[0]["patient_id"] == image[:7]
        assert index.metadata["laterality"][i] == own[0]["left or right breast"].lower()
        assert index.metadata["view"][i] == own[0]["image view"]
        assert index.metadata["breast_density"][i] == 3.0
        assert index.raw_labels[i, 0] == "|".join(sorted({r["pathology"] for r in own}))  # type: ignore[index]
        assert index.metadata["abnormality_type"][i] == own[0]["abnormality type"]
    assert len(set(index.groups().tolist())) == 4


def test_ddsm_tcia_calc_csv_spells_breast_density_with_a_space(tmp_path: Path) -> None:
    root = make_ddsm_tcia(tmp_path, n=4)
    for path in root.glob("calc_case_description_*_set.csv"):
        text = path.read_text().replace("breast_density", "breast density", 1)
        path.write_text(text)
    index = load_dataset("cbis_ddsm", root)
    assert index.metadata["breast_density"].tolist() == [3.0] * 4


# ---------------------------------------------------------------------------------------------------------
# Registry and describe


@pytest.mark.parametrize("name", PAPER_DATASETS)
def test_registry_annotation_facts_are_what_the_loaders_fill(name: str, tmp_path: Path) -> None:
    makers = {
        "aptos2019": lambda: make_aptos(tmp_path, n=10),
        "isic2019": lambda: make_isic(tmp_path, n=10, metadata=True),
        "chexpert": lambda: make_chexpert(tmp_path, n=40),
        "cbis_ddsm": lambda: make_ddsm_tcia(tmp_path, n=4),
    }
    index = load_dataset(name, makers[name]())
    spec = DATASETS[name]
    assert index.group_unit == spec.group_unit
    assert set(index.metadata) <= set(spec.metadata_columns)
    assert spec.id_namespace == ("isic" if name == "isic2019" else None) and not spec.external


def test_describe_reports_metadata_unit_and_raw_labels(tmp_path: Path) -> None:
    index = load_dataset("isic2019", make_isic(tmp_path, n=10, metadata=True))
    desc = describe(index)
    assert desc["group_unit"] == "lesion_id" and desc["units"] == 5  # 3 lesions + 2 without lesion_id
    assert desc["metadata"]["lesion_id"] == {"kind": "text", "blank": 2}
    assert desc["metadata"]["age_approx"] == {"kind": "number", "blank": 0}
    text = format_description(desc)
    assert "lesion_id (text, 2 blank)" in text and "bootstrap unit: lesion_id (5 units)" in text
    assert "raw labels: MEL, NV" in text
