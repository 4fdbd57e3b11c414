"""External-validation datasets in their official layouts: counts, labels, metadata, splits and one-line errors."""

from __future__ import annotations

import csv
import gzip
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from fmcache.data import SPLITS, aptos, describe, format_description, isic, load_dataset, write_split_csv
from fmcache.data.chexpert import OBSERVATIONS, apply_uncertainty
from fmcache.data.registry import DATASETS, EXTERNAL_DATASETS, PAPER_DATASETS, dataset_norm
from fmcache.errors import FmcacheError
from tests import fixtures_external as fx

REPO = Path(__file__).resolve().parents[1]
SOURCE_CLASSES = {
    "aptos2019": aptos.CLASS_NAMES,
    "isic2019": isic.CLASS_NAMES,
    "chexpert": OBSERVATIONS,
    "cbis_ddsm": ("benign", "malignant", "normal", "abnormal"),  # tcia and lists layouts
}
MAKERS: dict[str, Callable[[Path], Path]] = {
    "pad_ufes20": fx.make_pad_ufes20,
    "ham10000": fx.make_ham10000,
    "messidor2": fx.make_messidor2,
    "idrid": fx.make_idrid,
    "eyepacs": fx.make_eyepacs,
    "chestxray14": fx.make_chestxray14,
    "mimic_cxr": fx.make_mimic_cxr,
    "cmmd": fx.make_cmmd,
    "vindr_mammo": fx.make_vindr_mammo,
}


def read_rows(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def rewrite(path: Path, rows: list[dict[str, str]]) -> None:
    fx.write_csv(path, list(rows[0]), [list(r.values()) for r in rows])


def sizes(index) -> tuple[int, ...]:
    return tuple(len(index.indices(s)) for s in SPLITS)


def class_counts(index) -> dict[str, int]:
    return {name: int(np.sum(index.labels == k)) for k, name in enumerate(index.class_names)}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One read-only fixture root per dataset (tests that edit files build their own)."""
    return {name: maker(tmp_path_factory.mktemp(name)) for name, maker in MAKERS.items()}


# ---------------------------------------------------------------------------------------------------------
# Every external dataset


def test_registry_lists_every_external_dataset_with_its_facts() -> None:
    assert set(EXTERNAL_DATASETS) == set(MAKERS)
    for name in EXTERNAL_DATASETS:
        spec = DATASETS[name]
        assert spec.external and spec.source in PAPER_DATASETS and dataset_norm(name) is None
        assert spec.option_defaults()["split"] == "external" and spec.official_images and spec.classes
        assert spec.metric == DATASETS[spec.source].metric or name == "vindr_mammo" or name == "cmmd"


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_default_split_is_all_test_and_facts_match_the_index(name: str, roots: dict[str, Path]) -> None:
    index = load_dataset(name, roots[name])
    spec = DATASETS[name]
    assert sizes(index) == (0, 0, len(index)) and index.split_info["mode"] == "external"
    assert any("external evaluation set" in p for p in index.problems)
    assert index.num_classes == spec.classes and set(index.metadata) <= set(spec.metadata_columns)
    assert index.group_unit == spec.group_unit and "image_id" in index.metadata
    assert index.raw_labels is not None and len(index.raw_labels) == len(index)
    assert index.metadata["image_id"].dtype.kind == "U" and all(index.metadata["image_id"])
    # The suggested class map goes from this dataset's classes to the source's.
    assert set(spec.to_source) <= set(index.class_names)
    assert set(spec.to_source.values()) <= set(SOURCE_CLASSES[spec.source])  # type: ignore[index]
    text = format_description(describe(index))
    assert "test" in text and index.class_names[0] in text


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_yaml_config_matches_registry(name: str) -> None:
    config = yaml.safe_load((REPO / "configs" / "datasets" / f"{name}.yaml").read_text())
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in DATASETS[name].option_defaults().items()}
    assert config["name"] == name and config["options"] == defaults
    assert config["norm"] is None and config["metric"] == DATASETS[name].metric


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_random_split_keeps_each_unit_in_one_split(name: str, roots: dict[str, Path]) -> None:
    index = load_dataset(name, roots[name], split="random", fractions=(0.5, 0.25, 0.25))
    groups = index.groups()
    for unit in set(groups.tolist()):
        assert len(set(index.split[groups == unit].tolist())) == 1
    assert index.split_info["unit"] == (index.group_unit or "image")
    assert load_dataset(name, roots[name], split="random", fractions=(0.5, 0.25, 0.25)).split.tolist() == (
        index.split.tolist()
    )


def test_split_file_round_trip(roots: dict[str, Path], tmp_path: Path) -> None:
    index = load_dataset("pad_ufes20", roots["pad_ufes20"], split="random")
    path = write_split_csv(index, tmp_path / "split.csv")
    again = load_dataset("pad_ufes20", roots["pad_ufes20"], split=f"file:{path}")
    assert again.split.tolist() == index.split.tolist() and again.split_info["mode"] == "file"
    assert not any("external evaluation set" in p for p in again.problems)


def test_unknown_split_mode_lists_the_valid_ones(roots: dict[str, Path]) -> None:
    with pytest.raises(FmcacheError, match="split='official' is not valid; choose one of external, random"):
        load_dataset("pad_ufes20", roots["pad_ufes20"], split="official")
    with pytest.raises(FmcacheError, match="val_fraction must be a number in"):
        load_dataset("idrid", roots["idrid"], val_fraction=1.5)


def test_wrong_dataset_for_a_folder_says_which_it_looks_like(roots: dict[str, Path]) -> None:
    with pytest.raises(FmcacheError, match="looks like messidor2 data: use --dataset messidor2"):
        load_dataset("pad_ufes20", roots["messidor2"])
    with pytest.raises(FmcacheError, match="looks like pad_ufes20 data"):
        load_dataset("imagefolder", roots["pad_ufes20"])


def test_cli_datasets_prints_counts_per_split_and_class(roots: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from fmcache.cli import app

    result = CliRunner().invoke(
        app, ["datasets", "--dataset", "pad_ufes20", "--data-root", str(roots["pad_ufes20"])], env={"COLUMNS": "250"}
    )
    assert result.exit_code == 0, result.output
    assert "SEK" in result.output and "bootstrap unit: patient_id (8 units)" in result.output
    assert "external evaluation set" in result.output


# ---------------------------------------------------------------------------------------------------------
# PAD-UFES-20


def test_pad_ufes20_labels_and_metadata(roots: dict[str, Path]) -> None:
    root = roots["pad_ufes20"]
    index = load_dataset("pad_ufes20", root)
    rows = {r["img_id"]: r for r in read_rows(root / "metadata.csv")}
    assert class_counts(index) == dict.fromkeys(fx.PAD_CLASSES, 4)
    assert [p.name for p in index.paths] == sorted(rows)
    for i, path in enumerate(index.paths):
        row = rows[path.name]
        assert index.class_names[index.labels[i]] == row["diagnostic"] == index.raw_labels[i, 0]
        assert index.metadata["image_id"][i] == path.stem
        assert index.metadata["patient_id"][i] == row["patient_id"]
        assert index.metadata["lesion_id"][i] == row["lesion_id"]
        assert index.metadata["gender"][i] == row["gender"] and index.metadata["region"][i] == "NECK"
        age = index.metadata["age"][i]
        assert (math.isnan(age) and row["age"] == "") or age == float(row["age"])
    assert index.metadata["fitspatrick"].tolist() == [3.0] * 24
    assert {p.parent.name for p in index.paths} == {"imgs_part_1", "imgs_part_2", "imgs_part_3"}
    assert len(set(index.groups().tolist())) == 8


def test_pad_ufes20_flat_images_folder(tmp_path: Path) -> None:
    index = load_dataset("pad_ufes20", fx.make_pad_ufes20(tmp_path, n=12, flat=True))
    assert len(index) == 12 and {p.parent.name for p in index.paths} == {"images"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: rows[3].update(diagnostic="BOD"), r"metadata.csv line 5: diagnostic='BOD' is not one of ACK"),
        (lambda rows: rows[2].update(img_id=""), r"metadata.csv line 4: column 'img_id' is empty"),
        (lambda rows: [r.pop("diagnostic") for r in rows], r"metadata.csv lacks column\(s\) 'diagnostic'"),
        (lambda rows: rows[0].update(img_id="PAT_9_9_9.png"), r"1 of 12 images listed in .*metadata.csv are missing"),
    ],
)
def test_pad_ufes20_errors(tmp_path: Path, edit, message: str) -> None:
    root = fx.make_pad_ufes20(tmp_path, n=12)
    rows = read_rows(root / "metadata.csv")
    edit(rows)
    rewrite(root / "metadata.csv", rows)
    with pytest.raises(FmcacheError, match=message):
        load_dataset("pad_ufes20", root)


def test_pad_ufes20_layout_errors(tmp_path: Path) -> None:
    root = fx.make_pad_ufes20(tmp_path, n=6)
    name = next((root / "imgs_part_2").iterdir()).name
    (root / "imgs_part_3" / name).write_bytes((root / "imgs_part_2" / name).read_bytes())
    with pytest.raises(FmcacheError, match=f"image {name} exists twice"):
        load_dataset("pad_ufes20", root)
    for part in ("imgs_part_1", "imgs_part_2", "imgs_part_3"):
        for path in sorted((root / part).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (root / part).rmdir()
    with pytest.raises(FmcacheError, match="pad_ufes20: no images/ or imgs_part_1/ folder"):
        load_dataset("pad_ufes20", root)
    (root / "metadata.csv").unlink()
    with pytest.raises(FmcacheError, match=r"pad_ufes20: .*metadata.csv not found"):
        load_dataset("pad_ufes20", root)


# ---------------------------------------------------------------------------------------------------------
# HAM10000


def test_ham10000_labels_lesions_and_isic_ids(roots: dict[str, Path]) -> None:
    root = roots["ham10000"]
    index = load_dataset("ham10000", root)
    rows = {r["image_id"]: r for r in read_rows(root / "HAM10000_metadata.csv")}
    assert index.metadata["image_id"].tolist() == sorted(rows) and len(index) == 21
    for i, image in enumerate(index.metadata["image_id"].tolist()):
        assert image.startswith("ISIC_") and index.paths[i].name == f"{image}.jpg"
        assert index.class_names[index.labels[i]] == rows[image]["dx"] == index.raw_labels[i, 0]
        assert index.metadata["lesion_id"][i] == rows[image]["lesion_id"]
        assert index.metadata["dataset"][i] == "vidir_modern" and index.metadata["age"][i] == float(rows[image]["age"])
    assert len(set(index.groups().tolist())) == 11 and DATASETS["ham10000"].id_namespace == "isic"
    assert DATASETS["isic2019"].id_namespace == "isic"


def test_ham10000_metadata_without_extension_and_bad_dx(tmp_path: Path) -> None:
    root = fx.make_ham10000(tmp_path, n=7)
    (root / "HAM10000_metadata.csv").rename(root / "HAM10000_metadata")
    assert len(load_dataset("ham10000", root)) == 7
    rows = read_rows(root / "HAM10000_metadata")
    rows[1]["dx"] = "scc"
    rewrite(root / "HAM10000_metadata", rows)
    with pytest.raises(FmcacheError, match=r"HAM10000_metadata line 3: dx='scc' is not one of akiec"):
        load_dataset("ham10000", root)


# ---------------------------------------------------------------------------------------------------------
# Messidor-2


def test_messidor2_gradable_images_exams_and_notes(roots: dict[str, Path]) -> None:
    root = roots["messidor2"]
    index = load_dataset("messidor2", root)
    rows = {r["image_id"].lower(): r for r in read_rows(root / "messidor_data.csv")}
    assert len(index) == 11  # 12 rows, one ungradable
    for i, path in enumerate(index.paths):
        row = rows[path.name.lower()]
        assert index.labels[i] == int(row["adjudicated_dr_grade"]) == index.raw_labels[i, 0]
        assert index.metadata["dme"][i] == float(row["adjudicated_dme"])
        assert index.metadata["image_id"][i] == path.stem
    assert sorted(index.metadata["exam"].tolist())[:2] == ["20051020_43800_0100_PP"] * 2
    assert index.group_unit == "exam" and len(set(index.groups().tolist())) == 6
    problems = " | ".join(index.problems)
    assert "1 ungradable image(s) left out" in problems and "matched only ignoring case" in problems
    assert "1 image(s) in IMAGES/ have no row in messidor_data.csv" in problems


def test_messidor2_without_pairs_file_every_image_is_a_unit(tmp_path: Path) -> None:
    index = load_dataset("messidor2", fx.make_messidor2(tmp_path, n=6, pairs=False))
    assert index.group_unit is None and "exam" not in index.metadata
    assert any("messidor-2.csv not found" in p for p in index.problems)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"adjudicated_dr_grade": ""}, r"line 2: adjudicated_dr_grade is blank on a gradable image"),
        ({"adjudicated_dr_grade": "7"}, r"line 2: adjudicated_dr_grade='7' is not a class"),
        ({"adjudicated_gradable": "yes"}, r"line 2: adjudicated_gradable='yes' is not 0 or 1"),
    ],
)
def test_messidor2_bad_values(tmp_path: Path, change: dict[str, str], message: str) -> None:
    root = fx.make_messidor2(tmp_path, n=6)
    rows = read_rows(root / "messidor_data.csv")
    rows[0].update(change)
    rewrite(root / "messidor_data.csv", rows)
    with pytest.raises(FmcacheError, match=message):
        load_dataset("messidor2", root)


def test_messidor2_pandas_float_grades_and_missing_images(tmp_path: Path) -> None:
    root = fx.make_messidor2(tmp_path, n=6)
    rows = read_rows(root / "messidor_data.csv")
    for row in rows:
        row["adjudicated_dr_grade"] += ".0" if row["adjudicated_dr_grade"] else ""
    rewrite(root / "messidor_data.csv", rows)
    assert load_dataset("messidor2", root).labels.tolist() == [0, 2, 4, 1, 0]  # by image_id, image 3 ungradable
    for path in (root / "IMAGES").iterdir():
        path.unlink()
    with pytest.raises(FmcacheError, match=r"messidor2: 5 of 5 images listed in .*messidor_data.csv are missing"):
        load_dataset("messidor2", root)


# ---------------------------------------------------------------------------------------------------------
# IDRiD


@pytest.mark.parametrize("form", ["parent", "part", "doubled"])
def test_idrid_root_forms(tmp_path: Path, form: str) -> None:
    root = fx.make_idrid(tmp_path, doubled=form == "doubled")
    given = root / fx.IDRID_PART if form == "part" else root
    index = load_dataset("idrid", given)
    assert len(index) == 12 and index.root.name == fx.IDRID_PART


def test_idrid_labels_sets_and_official_split(roots: dict[str, Path]) -> None:
    index = load_dataset("idrid", roots["idrid"], split="official", val_fraction=0.25)
    assert sizes(index) == (6, 2, 4) and index.split_info["mode"] == "official"
    test = index.indices("test")
    assert set(index.metadata["release_set"][test].tolist()) == {"test"}
    # The two sets reuse names: IDRiD_001 is two different images.
    assert index.metadata["image_id"].tolist().count("IDRiD_001") == 2
    for i in range(len(index)):
        n = int(index.metadata["image_id"][i][-3:]) - 1
        assert index.labels[i] == n % 5 and index.metadata["dme_risk"][i] == n % 3
    assert index.group_unit is None


def test_idrid_errors(tmp_path: Path) -> None:
    root = fx.make_idrid(tmp_path, doubled=False)
    path = root / fx.IDRID_PART / "2. Groundtruths" / "b. IDRiD_Disease Grading_Testing Labels.csv"
    rows = read_rows(path)
    rows[1]["Retinopathy grade"] = "5"
    rewrite(path, rows)
    with pytest.raises(FmcacheError, match=r"Testing Labels.csv line 3: Retinopathy grade='5' is not a class"):
        load_dataset("idrid", root)
    with pytest.raises(FmcacheError, match=r"idrid: no '2. Groundtruths' folder"):
        load_dataset("idrid", tmp_path / fx.IDRID_PART / "1. Original Images")


# ---------------------------------------------------------------------------------------------------------
# EyePACS


def test_eyepacs_patients_and_official_split(roots: dict[str, Path]) -> None:
    index = load_dataset("eyepacs", roots["eyepacs"], split="official", val_fraction=0.34)
    assert len(index) == 18 and sizes(index) == (8, 4, 6)
    groups = index.groups()
    for unit in set(groups.tolist()):
        assert len(set(index.split[groups == unit].tolist())) == 1
    first = index.metadata["image_id"].tolist().index("10_left")
    assert index.metadata["patient"][first] == "10" and index.metadata["laterality"][first] == "left"
    assert index.labels[first] == 0 and index.metadata["release_set"][first] == "train"
    test = index.indices("test")
    assert set(index.metadata["usage"][test].tolist()) == {"Public", "Private"}


def test_eyepacs_train_only_and_errors(tmp_path: Path) -> None:
    root = fx.make_eyepacs(tmp_path, patients=3, test_patients=0)
    assert len(load_dataset("eyepacs", root)) == 6
    with pytest.raises(FmcacheError, match=r"split='official' needs .*retinopathy_solution.csv"):
        load_dataset("eyepacs", root, split="official")
    rows = read_rows(root / "trainLabels.csv")
    rows[0]["level"] = "-1"
    rewrite(root / "trainLabels.csv", rows)
    with pytest.raises(FmcacheError, match=r"trainLabels.csv line 2: level='-1' is not a class"):
        load_dataset("eyepacs", root)


# ---------------------------------------------------------------------------------------------------------
# NIH ChestX-ray14


def test_chestxray14_labels_metadata_and_official_split(roots: dict[str, Path]) -> None:
    root = roots["chestxray14"]
    index = load_dataset("chestxray14", root, split="official", val_fraction=0.25)
    assert index.multilabel and index.class_names == fx.NIH_FINDINGS and len(index) == 24
    for i, name in enumerate(index.metadata["image_id"].tolist()):
        n = (int(name[:8]) - 1) * 3 + int(name[-3:])
        findings = fx.nih_labels(n)
        expected = [] if findings == "No Finding" else findings.split("|")
        assert [f for f, v in zip(fx.NIH_FINDINGS, index.labels[i], strict=True) if v == 1] == [
            f for f in fx.NIH_FINDINGS if f in expected
        ]
        assert index.raw_labels[i, 0] == findings and index.metadata["patient"][i] == str(int(name[:8]))
        assert index.metadata["age"][i] == 50 + n and index.metadata["sex"][i] == "MF"[n % 2]
        assert index.metadata["view"][i] == ("PA", "AP")[n % 2] and index.metadata["follow_up"][i] == n % 3
    patients = index.metadata["patient"].astype(int)
    assert set(patients[index.indices("test")] % 2) == {0} and sizes(index) == (9, 3, 12)


def test_chestxray14_release_variants(tmp_path: Path) -> None:
    root = fx.make_chestxray14(tmp_path, n=9, flat=True)
    text = (root / "Data_Entry_2017_v2020.csv").read_text()
    old = text.replace("Patient Gender", "Patient Sex").replace(",50,", ",050Y,")
    (root / "Data_Entry_2017.csv").write_text(old)
    index = load_dataset("chestxray14", root)
    assert any("Data_Entry_2017.csv ignored" in p for p in index.problems)
    (root / "Data_Entry_2017_v2020.csv").unlink()
    index = load_dataset("chestxray14", root)
    assert index.metadata["age"][0] == 50.0 and index.metadata["sex"][0] == "M"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("No Finding", "No Finding|Hernia", r"line 2: Finding Labels has 'No Finding'"),
        ("No Finding", "Covid", r"line 2: Finding Labels has 'Covid', which is not one of the 14"),
    ],
)
def test_chestxray14_bad_findings(tmp_path: Path, old: str, new: str, message: str) -> None:
    root = fx.make_chestxray14(tmp_path, n=6)
    path = root / "Data_Entry_2017_v2020.csv"
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(FmcacheError, match=message):
        load_dataset("chestxray14", root)


def test_chestxray14_official_lists_must_cover_every_image(tmp_path: Path) -> None:
    root = fx.make_chestxray14(tmp_path, n=6)
    (root / "test_list.txt").write_text("")
    with pytest.raises(FmcacheError, match=r"3 image\(s\) are in neither train_val_list.txt nor test_list.txt"):
        load_dataset("chestxray14", root, split="official")
    (root / "test_list.txt").unlink()
    with pytest.raises(FmcacheError, match=r"split='official' needs .*test_list.txt"):
        load_dataset("chestxray14", root, split="official")


# ---------------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG


def test_mimic_cxr_labels_policy_and_official_split(roots: dict[str, Path]) -> None:
    root = roots["mimic_cxr"]
    index = load_dataset("mimic_cxr", root, uncertain="ignore", split="official")
    labels = {r["study_id"]: r for r in read_rows(root / "mimic-cxr-2.0.0-chexpert.csv.gz")}
    assert len(index) == 22  # 24 images, the last study has no label row
    for i in range(len(index)):
        row = labels[index.metadata["study"][i]]
        raw = [math.nan if row[c] == "" else float(row[c]) for c in index.class_names]
        np.testing.assert_array_equal(index.raw_labels[i], raw)
    np.testing.assert_array_equal(index.labels, apply_uncertainty(index.raw_labels, "ignore"))
    assert sizes(index) == (8, 8, 6) and index.split_info["val"] == "release"
    assert set(index.metadata["view"].tolist()) == {"PA", "LATERAL"} and index.group_unit == "patient"
    assert index.metadata["patient"][0] == "10000000" and any("without a label row" in p for p in index.problems)


def test_mimic_cxr_plain_csv_and_errors(tmp_path: Path) -> None:
    root = fx.make_mimic_cxr(tmp_path, subjects=3)
    for path in root.glob("*.csv.gz"):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    assert len(load_dataset("mimic_cxr", root)) == 10
    rows = read_rows(root / "mimic-cxr-2.0.0-split.csv")
    rows[0]["split"] = "holdout"
    rewrite(root / "mimic-cxr-2.0.0-split.csv", rows)
    with pytest.raises(FmcacheError, match=r"split.csv line 2: split='holdout' is not one of train, validate"):
        load_dataset("mimic_cxr", root)
    rows = read_rows(root / "mimic-cxr-2.0.0-chexpert.csv")
    rows[0]["Edema"] = "2.0"
    rewrite(root / "mimic-cxr-2.0.0-chexpert.csv", rows)
    with pytest.raises(FmcacheError, match=r"chexpert.csv line 2: Edema='2.0' is not 1, 0, -1 or blank"):
        load_dataset("mimic_cxr", root)
    (root / "mimic-cxr-2.0.0-chexpert.csv").unlink()
    with pytest.raises(FmcacheError, match=r"mimic_cxr: mimic-cxr-2.0.0-chexpert.csv.gz not found"):
        load_dataset("mimic_cxr", root)


# ---------------------------------------------------------------------------------------------------------
# CMMD


def test_cmmd_breasts_views_and_metadata(roots: dict[str, Path]) -> None:
    index = load_dataset("cmmd", roots["cmmd"])
    # 4 patients × left breast × (CC, MLO) + patient 0's right breast; 6 files of unlabelled breasts skipped.
    assert len(index) == 10 and any("6 DICOM file(s) of breasts without a clinical row" in p for p in index.problems)
    rows = {(r[0], r[1]): r for r in fx.cmmd_rows(4)}
    for i in range(len(index)):
        patient, side = index.metadata["patient"][i], index.metadata["laterality"][i][0].upper()
        row = rows[(patient, side)]
        assert index.class_names[index.labels[i]] == row[5].lower() and index.raw_labels[i, 0] == row[5]
        assert index.metadata["age"][i] == float(row[2]) and index.metadata["abnormality"][i] == row[4]
        assert index.metadata["subtype"][i] == row[6]
        assert index.metadata["image_id"][i].startswith(f"{patient}/")
    assert sorted(index.metadata["view"].tolist()) == ["CC"] * 5 + ["MLO"] * 5
    assert len(set(index.groups().tolist())) == 4


def test_cmmd_semicolon_csv_export(tmp_path: Path) -> None:
    assert len(load_dataset("cmmd", fx.make_cmmd(tmp_path, patients=2, sheet="csv;"))) == 6


def test_cmmd_xlsx_without_openpyxl_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fx.make_cmmd(tmp_path, patients=2, sheet="xlsx")
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # import openpyxl now raises ImportError
    with pytest.raises(FmcacheError, match=r"needs openpyxl: pip install openpyxl, or save the sheet as "
                                           r"CMMD_clinicaldata_revision.csv"):  # fmt: skip
        load_dataset("cmmd", root)


def test_cmmd_xlsx_with_openpyxl(tmp_path: Path) -> None:
    pytest.importorskip("openpyxl")
    index = load_dataset("cmmd", fx.make_cmmd(tmp_path, patients=2, sheet="xlsx"))
    assert len(index) == 6 and index.metadata["age"].tolist()[:2] == [40.0, 40.0]


def test_cmmd_errors(tmp_path: Path) -> None:
    root = fx.make_cmmd(tmp_path, patients=2)
    path = root / "CMMD_clinicaldata_revision.csv"
    rows = read_rows(path)
    rewrite(path, [*rows, {**rows[1], "ID1": "D1-0099"}])
    with pytest.raises(FmcacheError, match=r"cmmd: 1 of 4 breasts .* have no DICOM file .*\(e.g. D1-0099 L\)"):
        load_dataset("cmmd", root)
    rows[0]["classification"] = "Suspicious"
    rewrite(path, rows)
    with pytest.raises(FmcacheError, match=r"line 2: classification='Suspicious' is not one of"):
        load_dataset("cmmd", root)
    rewrite(path, [*rows[1:], {**rows[1], "classification": "Benign"}])
    with pytest.raises(FmcacheError, match=r"D2-0002 L is on line 2 and line 4 with different labels"):
        load_dataset("cmmd", root)
    rewrite(path, rows[1:])
    (root / "manifest-1" / "CMMD").rename(root / "manifest-1" / "other")
    with pytest.raises(FmcacheError, match="cmmd: no CMMD/ folder"):
        load_dataset("cmmd", root)


# ---------------------------------------------------------------------------------------------------------
# VinDr-Mammo


def test_vindr_mammo_birads_rules(roots: dict[str, Path]) -> None:
    root = roots["vindr_mammo"]
    suspicious = load_dataset("vindr_mammo", root)
    abnormal = load_dataset("vindr_mammo", root, task="abnormal")
    birads = suspicious.metadata["birads"]
    assert suspicious.labels.tolist() == (birads >= 4).astype(int).tolist()
    assert abnormal.labels.tolist() == (birads >= 2).astype(int).tolist()
    assert suspicious.class_names == ("BI-RADS 1-3", "BI-RADS 4-5") and abnormal.class_names[0] == "BI-RADS 1"
    assert "BI-RADS 1-3 -> 0, 4-5 -> 1" in suspicious.split_info["task"]
    assert "BI-RADS 1-3 -> 0, 4-5 -> 1" in format_description(describe(suspicious))
    assert suspicious.raw_labels[0, 0] == f"BI-RADS {int(birads[0])}"
    assert set(suspicious.metadata["breast_density"].tolist()) == {"A", "B", "C", "D"}
    assert set(suspicious.metadata["laterality"].tolist()) == {"left", "right"}
    assert len(set(suspicious.groups().tolist())) == 5


def test_vindr_mammo_official_split_and_errors(tmp_path: Path) -> None:
    root = fx.make_vindr_mammo(tmp_path, studies=4)
    index = load_dataset("vindr_mammo", root, split="official", val_fraction=0.5)
    assert sizes(index) == (4, 4, 8)
    path = root / "breast-level_annotations.csv"
    rows = read_rows(path)
    rows[2]["breast_birads"] = "BI-RADS 0"
    rewrite(path, rows)
    with pytest.raises(FmcacheError, match=r"line 4: breast_birads='BI-RADS 0' is not BI-RADS 1..5"):
        load_dataset("vindr_mammo", root)
    with pytest.raises(FmcacheError, match="option task='benign' is not valid; choose one of suspicious, abnormal"):
        load_dataset("vindr_mammo", root, task="benign")
    rows[2]["breast_birads"] = "BI-RADS 2"
    rewrite(path, rows)
    (root / "images" / rows[0]["study_id"] / f"{rows[0]['image_id']}.dicom").unlink()
    with pytest.raises(FmcacheError, match=r"1 of 16 images listed in .*breast-level_annotations.csv are missing"):
        load_dataset("vindr_mammo", root)
