"""Dataset layer: official layouts, labels, splits, errors, image reading, transforms (CPU, offline, fast)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fmcache.data import (
    DATASETS,
    SPLITS,
    ImageDataset,
    build_transform,
    dataset_metric,
    dataset_names,
    dataset_norm,
    default_metric,
    default_resize,
    describe,
    format_description,
    load_dataset,
    load_image,
    train_augmentation,
    train_augmentation_spec,
)
from fmcache.errors import FmcacheError
from tests.fixtures_data import (
    CHEXPERT_OBSERVATIONS,
    make_aptos,
    make_chexpert,
    make_csv,
    make_ddsm_lists,
    make_ddsm_tcia,
    make_imagefolder,
    make_isic,
    write_csv,
    write_dicom,
    write_image,
)

REPO = Path(__file__).resolve().parents[1]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def rewrite_rows(path: Path, rows: list[dict[str, str]]) -> None:
    write_csv(path, list(rows[0]), [list(r.values()) for r in rows])


def split_sizes(index) -> tuple[int, ...]:
    return tuple(len(index.indices(s)) for s in SPLITS)


# ---------------------------------------------------------------------------------------------------------
# Shared read-only fixtures (generated once per module)


@pytest.fixture(scope="module")
def aptos_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_aptos(tmp_path_factory.mktemp("aptos"), n=40)


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chexpert(tmp_path_factory.mktemp("chexpert"), n=40)


@pytest.fixture(scope="module")
def tcia_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ddsm_tcia(tmp_path_factory.mktemp("tcia"), n=12)


# ---------------------------------------------------------------------------------------------------------
# Registry and options


def test_registry_names_and_norms() -> None:
    from fmcache.data.registry import EXTERNAL_DATASETS

    paper = ["aptos2019", "cbis_ddsm", "isic2019", "chexpert"]
    assert dataset_names() == [*paper, *EXTERNAL_DATASETS, "csv", "imagefolder"]
    assert dataset_norm("aptos2019") == ((0.415, 0.221, 0.073), (0.275, 0.150, 0.081))
    assert dataset_norm("cbis_ddsm") == ((0.286,) * 3, (0.267,) * 3)
    assert dataset_norm("chexpert") == ((0.503,) * 3, (0.292,) * 3)
    assert dataset_norm("csv") is None and dataset_norm("imagefolder") is None


@pytest.mark.parametrize("name", ["aptos2019", "cbis_ddsm", "isic2019", "chexpert", "csv", "imagefolder"])
def test_yaml_config_matches_registry(name: str) -> None:
    config = yaml.safe_load((REPO / "configs" / "datasets" / f"{name}.yaml").read_text())
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in DATASETS[name].option_defaults().items()}
    assert config["name"] == name
    assert config["options"] == defaults
    norm = dataset_norm(name)
    assert config["norm"] == (None if norm is None else {"mean": list(norm[0]), "std": list(norm[1])})
    assert config["metric"] == dataset_metric(name)
    assert config["img_size"] == 224 and config["resize"] == default_resize(224) == 256


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(FmcacheError, match="unknown dataset 'mnist'; choose one of aptos2019, cbis_ddsm"):
        load_dataset("mnist", tmp_path)


def test_unknown_option_and_bad_values(aptos_root: Path) -> None:
    with pytest.raises(
        FmcacheError, match=r"unknown option\(s\) bogus for dataset aptos2019; valid options: split, seed"
    ):
        load_dataset("aptos2019", aptos_root, bogus=1)
    with pytest.raises(FmcacheError, match="fractions must be three non-negative numbers"):
        load_dataset("aptos2019", aptos_root, fractions=[0.5, 0.2, 0.2])
    with pytest.raises(FmcacheError, match="split seed must be a non-negative integer"):
        load_dataset("aptos2019", aptos_root, seed="x")
    # None means "default", so unset CLI flags can pass straight through.
    assert load_dataset("aptos2019", aptos_root, seed=None).split_info["seed"] == 42


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FmcacheError, match=r"data root .*nope does not exist"):
        load_dataset("aptos2019", tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------------
# APTOS


def test_aptos_labels_order_and_split(aptos_root: Path) -> None:
    index = load_dataset("aptos2019", aptos_root)
    rows = {r["id_code"]: int(r["diagnosis"]) for r in read_rows(aptos_root / "train.csv")}
    ids = [p.stem for p in index.paths]
    assert ids == sorted(rows)
    assert index.labels.dtype == np.int64 and index.split.dtype == np.int8
    assert index.labels.tolist() == [rows[i] for i in ids]
    assert index.class_names[0] == "No DR" and not index.multilabel
    # The default is the seed's split: int(40 * 0.3) = 12 held out, halved into val and test.
    assert split_sizes(index) == (28, 6, 6)
    assert index.split_info == {
        "mode": "seed",
        "holdout": 0.3,
        "seed": 42,
        "source": "random.Random(42).shuffle of the CSV rows",
        "order": "id_code",
    }
    random = load_dataset("aptos2019", aptos_root, split="random")
    assert split_sizes(random) == (28, 6, 6)
    assert random.split_info == {"mode": "random", "seed": 42, "fractions": [0.7, 0.15, 0.15], "order": "id_code"}
    json.dumps(index.split_info), json.dumps(index.options)
    assert default_metric(index) == "qwk"


def test_split_is_deterministic_and_ignores_global_rng(aptos_root: Path) -> None:
    first = load_dataset("aptos2019", aptos_root)
    np.random.seed(1234)
    np.random.rand(17)
    torch.manual_seed(99)
    torch.rand(5)
    second = load_dataset("aptos2019", aptos_root)
    assert np.array_equal(first.split, second.split) and first.paths == second.paths
    for mode in ("seed", "random"):
        base = load_dataset("aptos2019", aptos_root, split=mode)
        other = load_dataset("aptos2019", aptos_root, split=mode, seed=7)
        assert not np.array_equal(base.split, other.split)
        assert split_sizes(other) == split_sizes(base)


def test_aptos_errors(tmp_path: Path) -> None:
    root = make_aptos(tmp_path / "aptos", n=10)
    rows = read_rows(root / "train.csv")
    rows[3]["diagnosis"] = "7"
    rewrite_rows(root / "train.csv", rows)
    with pytest.raises(FmcacheError, match=r"train.csv line 5: diagnosis='7' is not a class"):
        load_dataset("aptos2019", root)
    rows[3]["diagnosis"] = "2"
    rewrite_rows(root / "train.csv", rows)
    (root / "train_images" / f"{rows[0]['id_code']}.png").unlink()
    with pytest.raises(FmcacheError, match=r"1 of 10 images listed in .*train.csv are missing \(e.g. .*\.png\)"):
        load_dataset("aptos2019", root)
    (root / "train.csv").unlink()
    with pytest.raises(FmcacheError, match=r"aptos2019: .*train.csv not found"):
        load_dataset("aptos2019", root)


def test_aptos_duplicate_rows(tmp_path: Path) -> None:
    root = make_aptos(tmp_path, n=10)
    rows = read_rows(root / "train.csv")
    rewrite_rows(root / "train.csv", [*rows, rows[0]])
    # The seed split is defined over CSV rows: a repeated row would be a second sample there, so it is refused.
    with pytest.raises(FmcacheError, match=r"appears on lines 2 and 12 of .*train.csv; the seed split is defined"):
        load_dataset("aptos2019", root)
    index = load_dataset("aptos2019", root, split="random")
    assert len(index) == 10 and any("merged 1 duplicate" in p for p in index.problems)
    rewrite_rows(root / "train.csv", [*rows, {**rows[0], "diagnosis": str((int(rows[0]["diagnosis"]) + 1) % 5)}])
    with pytest.raises(FmcacheError, match="appears on lines 2 and 12 with different labels"):
        load_dataset("aptos2019", root, split="random")


def test_wrong_layout_hints(tmp_path: Path) -> None:
    isic = make_isic(tmp_path / "data" / "isic", n=8)
    with pytest.raises(FmcacheError, match="looks like isic2019 data: use --dataset isic2019"):
        load_dataset("aptos2019", isic)
    with pytest.raises(FmcacheError, match=r"the isic2019 files seem to be in .*isic: pass --data-root"):
        load_dataset("isic2019", tmp_path / "data")
    with pytest.raises(FmcacheError, match=r"imagefolder: .* looks like isic2019 data"):
        load_dataset("imagefolder", isic)


# ---------------------------------------------------------------------------------------------------------
# ISIC


def test_isic_argmax(tmp_path: Path) -> None:
    root = make_isic(tmp_path, n=24)
    index = load_dataset("isic2019", root)
    rows = {r["image"]: r for r in read_rows(root / "ISIC_2019_Training_GroundTruth.csv")}
    for path, label in zip(index.paths, index.labels, strict=True):
        assert rows[path.stem][index.class_names[label]] == "1.0"
    assert index.class_names == ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    assert split_sizes(index) == (20, 2, 2)  # seed split: int(24 * 0.2) = 4 held out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"UNK": "1.0"}, r"line \d+ \(ISIC_\d+\): UNK is set"),
        ({c: "0.0" for c in ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")}, "no class set among MEL"),
        ({"MEL": "1.0", "NV": "1.0", "BCC": "1.0"}, "(2|3) classes set among MEL"),
        ({"DF": "0.5"}, r"line \d+: DF='0.5' is not 0 or 1"),
    ],
)
def test_isic_bad_rows(tmp_path: Path, change: dict[str, str], message: str) -> None:
    root = make_isic(tmp_path, n=8)
    path = root / "ISIC_2019_Training_GroundTruth.csv"
    rows = read_rows(path)
    rows[2].update(change)
    rewrite_rows(path, rows)
    with pytest.raises(FmcacheError, match=message):
        load_dataset("isic2019", root)


# ---------------------------------------------------------------------------------------------------------
# CBIS-DDSM, seed lists


def test_ddsm_lists_labels_and_splits(tmp_path: Path) -> None:
    root = make_ddsm_lists(tmp_path, n=30)
    index = load_dataset("cbis_ddsm", root)
    assert index.options == {"layout": "lists"} and index.split_info["mode"] == "lists"
    for path, label in zip(index.paths, index.labels, strict=True):
        assert label == (0 if path.name.startswith("normal_") else 1)
    for code, split in enumerate(SPLITS):
        listed = (root / "ddsm_raw_image_lists" / f"{split}.txt").read_text().split()
        assert sorted(index.paths[i].name for i in index.indices(split)) == sorted(listed), code
    assert [p.name for p in index.paths] == sorted(p.name for p in index.paths)


def test_ddsm_lists_path_forms(tmp_path: Path) -> None:
    root = make_ddsm_lists(tmp_path, n=9)
    lists = root / "ddsm_raw_image_lists"
    write_image(lists / "imgs" / "benign_900.jpg", np.random.RandomState(0), gray=True)
    absolute = write_image(tmp_path / "elsewhere" / "cancer_901.jpg", np.random.RandomState(1), gray=True)
    with open(lists / "train.txt", "a") as handle:
        handle.write(f"imgs/benign_900.jpg\n\n{absolute}\n")
    index = load_dataset("cbis_ddsm", root, layout="lists")
    assert lists / "imgs" / "benign_900.jpg" in index.paths and absolute in index.paths
    assert len(index) == 11


def test_ddsm_lists_errors(tmp_path: Path) -> None:
    root = make_ddsm_lists(tmp_path, n=9)
    lists = root / "ddsm_raw_image_lists"
    with open(lists / "val.txt", "a") as handle:
        handle.write("weird_001.jpg\n")
    with pytest.raises(FmcacheError, match=r"val.txt line \d+: cannot tell the label of 'weird_001.jpg'"):
        load_dataset("cbis_ddsm", root)
    (lists / "val.txt").unlink()
    with pytest.raises(FmcacheError, match=r"val.txt not found; the lists layout needs"):
        load_dataset("cbis_ddsm", root)
    write_csv(root / "mass_case_description_train_set.csv", ["pathology"], [["BENIGN"]])
    with pytest.raises(FmcacheError, match="holds both ddsm_raw_image_lists/ and TCIA"):
        load_dataset("cbis_ddsm", root)


def test_ddsm_no_layout(tmp_path: Path) -> None:
    with pytest.raises(FmcacheError, match="cbis_ddsm: found neither ddsm_raw_image_lists/"):
        load_dataset("cbis_ddsm", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# CBIS-DDSM, TCIA release


def case_number(path: Path, root: Path) -> int:
    case = path.relative_to(root / "CBIS-DDSM").parts[0]
    return int(case.split("_P_")[1].split("_")[0])


def test_tcia_resolves_mismatched_folders_and_merges_rows(tcia_root: Path) -> None:
    index = load_dataset("cbis_ddsm", tcia_root)
    assert index.options == {"layout": "tcia", "ambiguous": "error"}
    assert len(index) == 12  # 18 CSV rows, 12 full mammograms
    assert all("full mammogram images" in str(p) for p in index.paths)  # never the ROI/cropped folders
    cases = [case_number(p, tcia_root) for p in index.paths]
    assert index.labels.tolist() == [int(i % 4 < 2) for i in cases]  # malignant if any abnormality row is
    official_test = np.array([i >= 6 for i in cases])
    assert np.array_equal(index.split == 2, official_test)
    assert split_sizes(index) == (5, 1, 6)  # 10% of the 6 train images (rounded) moved to val
    assert any("merged 6 abnormality rows" in p for p in index.problems)
    assert index.split_info["mode"] == "official+val" and index.split_info["val_fraction"] == 0.1


def _copy_tcia(tcia_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "tcia"
    shutil.copytree(tcia_root, root)
    return root


def _case_folder(root: Path, i: int) -> Path:
    return next(p for p in (root / "CBIS-DDSM").iterdir() if f"_P_{i:05d}_" in p.name and not p.name.endswith("_1"))


def _csv_path_of_case(root: Path, i: int) -> str:
    rows = read_rows(root / "mass_case_description_train_set.csv")
    return next(r["image file path"] for r in rows if f"_P_{i:05d}_" in r["image file path"])


def test_tcia_ambiguous_rows(tcia_root: Path, tmp_path: Path) -> None:
    root = _copy_tcia(tcia_root, tmp_path)
    folder = _case_folder(root, 0)
    write_dicom(folder / "other-series" / "1-1.dcm", np.zeros((8, 8)))
    with pytest.raises(FmcacheError, match=r"1 of 18 CSV rows stay ambiguous: 2 .dcm files under .*P_00000"):
        load_dataset("cbis_ddsm", root)
    index = load_dataset("cbis_ddsm", root, ambiguous="skip")
    assert len(index) == 11 and any("skipped 1 ambiguous" in p for p in index.problems)
    assert index.options["ambiguous"] == "skip"


def test_tcia_exact_tail_and_series_uid_disambiguate(tcia_root: Path, tmp_path: Path) -> None:
    root = _copy_tcia(tcia_root, tmp_path)
    # Case 0: a file exactly at the CSV's path wins over the other DICOM in the folder.
    csv_path = _csv_path_of_case(root, 0)
    exact = write_dicom(root / "CBIS-DDSM" / csv_path, np.zeros((8, 8)))
    # Case 2: the DICOM whose SeriesInstanceUID matches the CSV's series component wins.
    series = _csv_path_of_case(root, 2).split("/")[-2]
    folder = _case_folder(root, 2)
    write_dicom(folder / "a" / "1-1.dcm", np.zeros((8, 8)))
    matching = write_dicom(folder / "b" / "1-1.dcm", np.zeros((8, 8)), series_uid=series)
    index = load_dataset("cbis_ddsm", root)
    assert exact in index.paths and matching in index.paths and len(index) == 12


def test_tcia_missing_case_folder_and_csv(tcia_root: Path, tmp_path: Path) -> None:
    root = _copy_tcia(tcia_root, tmp_path)
    shutil.rmtree(_case_folder(root, 4))
    with pytest.raises(
        FmcacheError, match=r"1 of 18 CSV rows point at files not found .*case folder Mass-Training_P_00004"
    ):
        load_dataset("cbis_ddsm", root)
    (root / "calc_case_description_test_set.csv").unlink()
    with pytest.raises(
        FmcacheError, match=r"calc_case_description_test_set\.csv not found; the TCIA layout needs both"
    ):
        load_dataset("cbis_ddsm", root, layout="tcia")


def test_tcia_merges_mass_and_calc_copies_of_one_mammogram(tcia_root: Path, tmp_path: Path) -> None:
    root = _copy_tcia(tcia_root, tmp_path)
    # Case 0 is Mass-Training_P_00000_LEFT_CC (malignant); add the same view to the calc test set as benign.
    case = "Calc-Test_P_00000_LEFT_CC"
    write_dicom(root / "CBIS-DDSM" / case / "s" / "1-1.dcm", np.zeros((8, 8)))
    path = root / "calc_case_description_test_set.csv"
    rows = read_rows(path)
    rewrite_rows(path, [*rows, {**rows[0], "pathology": "BENIGN", "image file path": f"{case}/1.2/1.3/000000.dcm"}])
    index = load_dataset("cbis_ddsm", root)
    assert len(index) == 12
    (position,) = [k for k, p in enumerate(index.paths) if "P_00000_LEFT_CC" in str(p)]
    assert index.labels[position] == 1 and index.split[position] == 2  # malignant if any; test wins
    assert "Calc-Test_P_00000" in str(index.paths[position])  # the copy that sorts first is kept
    assert any("merged 1 mammograms present in both" in p for p in index.problems)
    assert any("1 of them were train in one set and test in the other" in p for p in index.problems)


def test_tcia_bad_pathology(tcia_root: Path, tmp_path: Path) -> None:
    root = _copy_tcia(tcia_root, tmp_path)
    path = root / "mass_case_description_test_set.csv"
    rows = read_rows(path)
    rows[1]["pathology"] = "UNKNOWN"
    rewrite_rows(path, rows)
    with pytest.raises(FmcacheError, match=r"mass_case_description_test_set.csv line 3: pathology='UNKNOWN'"):
        load_dataset("cbis_ddsm", root)


def test_tcia_under_root_without_cbis_folder(tcia_root: Path, tmp_path: Path) -> None:
    root = _copy_tcia(tcia_root, tmp_path)
    for case in (root / "CBIS-DDSM").iterdir():
        case.rename(root / case.name)
    (root / "CBIS-DDSM").rmdir()
    assert len(load_dataset("cbis_ddsm", root)) == 12


# ---------------------------------------------------------------------------------------------------------
# CheXpert


def _set_chexpert_cells(root: Path, cells_by_position: dict[int, dict[str, str]]) -> list[str]:
    """Blank the observations of the rows at these sorted positions, then set the given cells."""
    path = root / "CheXpert-v1.0-small" / "train.csv"
    rows = sorted(read_rows(path), key=lambda r: r["Path"])
    for position, cells in cells_by_position.items():
        rows[position].update(dict.fromkeys(CHEXPERT_OBSERVATIONS, ""), **cells)
    rewrite_rows(path, rows)
    return [r["Path"] for r in rows]


POLICY_ROWS = {
    0: {},  # all blank
    1: {"Cardiomegaly": "-1.0", "Edema": "1.0"},
    2: {"Cardiomegaly": "-1.0", "Edema": "0.0"},
    3: {"No Finding": "1.0", "Edema": "0.0"},
}
NF, CARD, EDEMA = (CHEXPERT_OBSERVATIONS.index(c) for c in ("No Finding", "Cardiomegaly", "Edema"))
NAN = np.nan
# Expected (No Finding, Cardiomegaly, Edema) for POLICY_ROWS under each policy; other columns are 0.
EXPECTED = {
    "zeros": [(1, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 0)],
    "ones": [(0, 0, 0), (0, 1, 1), (0, 1, 0), (1, 0, 0)],
    "ignore": [(0, 0, 0), (0, NAN, 1), (0, NAN, 0), (1, 0, 0)],
}


@pytest.mark.parametrize("policy", ["zeros", "ones", "ignore"])
def test_chexpert_uncertainty_policies(tmp_path: Path, policy: str) -> None:
    root = make_chexpert(tmp_path, n=30)
    _set_chexpert_cells(root, POLICY_ROWS)
    index = load_dataset("chexpert", root, uncertain=policy)
    assert index.multilabel and index.labels.dtype == np.float32 and index.labels.shape == (30, 14)
    got = index.labels[:4][:, [NF, CARD, EDEMA]]
    np.testing.assert_array_equal(got, np.array(EXPECTED[policy], dtype=np.float32))
    others = np.delete(index.labels[:4], [NF, CARD, EDEMA], axis=1)
    assert np.all(others == 0)
    assert index.options == {"uncertain": policy}
    assert default_metric(index) == "mean_auc"


def test_chexpert_zeros_never_leaves_an_all_zero_row(chexpert_root: Path) -> None:
    labels = load_dataset("chexpert", chexpert_root).labels
    assert not np.isnan(labels).any() and np.all(labels.sum(axis=1) >= 1)
    ignore = load_dataset("chexpert", chexpert_root, uncertain="ignore").labels
    assert np.isnan(ignore).any()


def test_chexpert_seed_split(chexpert_root: Path) -> None:
    index = load_dataset("chexpert", chexpert_root)
    rel = [index.relative(p) for p in index.paths]
    assert rel == sorted(rel) and all(r.startswith("train/patient") for r in rel)
    # int(0.2*40)+15 = 23 held out: first 11 val, next 12 test, rest train.
    assert index.split.tolist() == [1] * 11 + [2] * 12 + [0] * 17
    assert index.split_info == {"mode": "seed", "valid": "report", "order": "Path"}
    assert any("valid.csv (6 images) is not used" in p for p in index.problems)


def test_chexpert_patient_split(chexpert_root: Path) -> None:
    index = load_dataset("chexpert", chexpert_root, split="patient")
    patient = [p.parts[-3] for p in index.paths]
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not {patient[i] for i in index.indices(a)} & {patient[i] for i in index.indices(b)}
    assert split_sizes(index) == (32, 4, 4)  # 20 patients → 16/2/2, two views each
    assert index.split_info["seed"] == 42 and index.split_info["mode"] == "patient"


def test_chexpert_root_forms_and_valid_as_test(chexpert_root: Path) -> None:
    parent = load_dataset("chexpert", chexpert_root)
    inner = load_dataset("chexpert", chexpert_root / "CheXpert-v1.0-small")
    assert parent.paths == inner.paths and parent.fingerprint() == inner.fingerprint()
    assert parent.root == chexpert_root / "CheXpert-v1.0-small"
    with_valid = load_dataset("chexpert", chexpert_root, valid="test")
    assert split_sizes(with_valid) == (17, 23, 6)
    assert all(with_valid.relative(with_valid.paths[i]).startswith("valid/") for i in with_valid.indices("test"))


def test_chexpert_errors(tmp_path: Path) -> None:
    root = make_chexpert(tmp_path / "c", n=12)
    with pytest.raises(FmcacheError, match=r"too few for the seed split"):
        load_dataset("chexpert", root)
    with pytest.raises(FmcacheError, match=r"option uncertain='maybe' is not valid; choose one of zeros, ones"):
        load_dataset("chexpert", root, uncertain="maybe")
    path = root / "CheXpert-v1.0-small" / "train.csv"
    rows = read_rows(path)
    rows[4]["Edema"] = "2.0"
    rewrite_rows(path, rows)
    with pytest.raises(FmcacheError, match=r"train.csv line 6: Edema='2.0' is not 1, 0, -1 or blank"):
        load_dataset("chexpert", root, split="patient")
    with pytest.raises(FmcacheError, match=r"chexpert: no train.csv in"):
        load_dataset("chexpert", tmp_path / "c" / "CheXpert-v1.0-small" / "train")


# ---------------------------------------------------------------------------------------------------------
# Generic csv and imagefolder


def test_csv_single_label(tmp_path: Path) -> None:
    root = make_csv(tmp_path, n=30)
    index = load_dataset("csv", root)
    assert index.class_names == ("benign", "malignant", "normal")
    rows = {r["path"]: r["label"] for r in read_rows(root / "labels.csv")}
    assert [index.class_names[k] for k in index.labels] == [rows[index.relative(p)] for p in index.paths]
    assert split_sizes(index) == (24, 3, 3)
    assert default_metric(index) == "accuracy"


def test_csv_integer_labels_and_split_column(tmp_path: Path) -> None:
    root = make_csv(tmp_path, n=6)
    rows = read_rows(root / "labels.csv")
    for i, row in enumerate(rows):
        row.update(label=str(2 * (i % 2)), split=SPLITS[i % 3])
    rewrite_rows(root / "labels.csv", rows)
    index = load_dataset("csv", root)
    assert index.class_names == ("0", "1", "2") and set(index.labels.tolist()) == {0, 2}
    assert any("integer class(es) 1 have no samples" in p for p in index.problems)
    assert index.split.tolist() == [i % 3 for i in range(6)] and index.split_info["mode"] == "column"
    rows[1]["split"] = "training"
    rewrite_rows(root / "labels.csv", rows)
    with pytest.raises(FmcacheError, match=r"labels.csv line 3: split='training' is not one of train, val, test"):
        load_dataset("csv", root)


def test_csv_multilabel(tmp_path: Path) -> None:
    root = make_csv(tmp_path, n=20, multilabel=True)
    index = load_dataset("csv", root, label_columns="a,b,c")
    assert index.multilabel and index.class_names == ("a", "b", "c")
    rows = {r["path"]: r for r in read_rows(root / "labels.csv")}
    for path, labels in zip(index.paths, index.labels, strict=True):
        row = rows[index.relative(path)]
        for column, value in zip("abc", labels, strict=True):
            assert (np.isnan(value) and row[column] == "") or value == float(row[column])
    assert default_metric(index) == "mean_auc"
    with pytest.raises(FmcacheError, match=r"lacks column\(s\) 'd'"):
        load_dataset("csv", root, label_columns=["a", "d"])


def test_csv_errors(tmp_path: Path) -> None:
    root = make_csv(tmp_path, n=6)
    with pytest.raises(FmcacheError, match=r"csv: .*other.csv not found"):
        load_dataset("csv", root, csv="other.csv")
    with pytest.raises(FmcacheError, match=r"lacks column\(s\) 'label'"):
        load_dataset("csv", make_csv(tmp_path / "m", n=6, multilabel=True))  # multi-label needs label_columns
    rows = read_rows(root / "labels.csv")
    rewrite_rows(root / "labels.csv", [*rows, {"path": "images/missing.png", "label": "benign"}])
    with pytest.raises(FmcacheError, match=r"1 of 7 images listed in .*labels.csv are missing"):
        load_dataset("csv", root)


def test_imagefolder_flat_and_split_folders(tmp_path: Path) -> None:
    flat = load_dataset("imagefolder", make_imagefolder(tmp_path / "flat", n=30))
    assert flat.class_names == ("benign", "malignant", "normal")
    assert np.bincount(flat.labels).tolist() == [10, 10, 10]
    assert all(flat.class_names[k] == p.parent.name for p, k in zip(flat.paths, flat.labels, strict=True))
    assert split_sizes(flat) == (24, 3, 3)
    split = load_dataset("imagefolder", make_imagefolder(tmp_path / "split", n=30, splits=True))
    assert split.split_info["mode"] == "folders"
    assert all(SPLITS[c] == split.relative(p).split("/")[0] for p, c in zip(split.paths, split.split, strict=True))


def test_imagefolder_errors(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "a", n=6, splits=True)
    shutil.rmtree(root / "val")
    with pytest.raises(FmcacheError, match=r"has split folders but lacks val/"):
        load_dataset("imagefolder", root)
    single = tmp_path / "b"
    write_image(single / "only" / "x.png", np.random.RandomState(0))
    with pytest.raises(FmcacheError, match=r"single class folder \('only'\)"):
        load_dataset("imagefolder", single)
    with pytest.raises(FmcacheError, match="looks like aptos2019 data; use --dataset aptos2019"):
        load_dataset("imagefolder", make_aptos(tmp_path / "c", n=5))


# ---------------------------------------------------------------------------------------------------------
# DatasetIndex methods, describe


def test_indices_subset_and_describe(aptos_root: Path) -> None:
    index = load_dataset("aptos2019", aptos_root)
    with pytest.raises(FmcacheError, match="unknown split 'training'; choose one of train, val, test"):
        index.indices("training")
    small = index.subset(4)
    assert split_sizes(small) == (4, 4, 4)
    for split in SPLITS:
        kept = [index.paths[i] for i in index.indices(split)[:4]]
        assert [small.paths[i] for i in small.indices(split)] == kept
    assert small.split_info["subset_limit"] == 4 and small.fingerprint() != index.fingerprint()
    assert len(index.subset(100)) == len(index)
    with pytest.raises(FmcacheError, match="subset limit must be a positive integer"):
        index.subset(0)
    desc = describe(index)
    json.dumps(desc)
    assert desc["num_images"] == 40 and desc["splits"]["total"]["n"] == 40
    for split in (*SPLITS, "total"):
        counts = desc["splits"][split]["classes"]
        assert sum(counts.values()) == desc["splits"][split]["n"]
    assert desc["splits"]["total"]["classes"]["Mild"] == int(np.sum(index.labels == 1))
    text = format_description(desc)
    assert "aptos2019" in text and "Proliferative DR" in text


def test_describe_multilabel(chexpert_root: Path) -> None:
    index = load_dataset("chexpert", chexpert_root, uncertain="ignore")
    desc = describe(index)
    json.dumps(desc)
    for split in (*SPLITS, "total"):
        for counts in desc["splits"][split]["labels"].values():
            assert counts["positive"] + counts["negative"] + counts["unknown"] == desc["splits"][split]["n"]
    edema = desc["splits"]["total"]["labels"]["Edema"]
    assert edema["unknown"] == int(np.isnan(index.labels[:, EDEMA]).sum())
    assert "Support Devices" in format_description(desc)


def test_fingerprint_tracks_files(tmp_path: Path) -> None:
    root = make_aptos(tmp_path, n=8)
    index = load_dataset("aptos2019", root)
    first = index.fingerprint()
    assert len(first) == 64 and load_dataset("aptos2019", root).fingerprint() == first
    target = index.paths[3]
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = index.fingerprint()
    assert touched != first
    target.write_bytes(target.read_bytes() + b"\0")
    assert index.fingerprint() not in (first, touched)
    target.unlink()
    with pytest.raises(FmcacheError, match="cannot fingerprint dataset aptos2019"):
        index.fingerprint()


def test_labels_fingerprint_tracks_options(chexpert_root: Path) -> None:
    zeros = load_dataset("chexpert", chexpert_root)
    ones = load_dataset("chexpert", chexpert_root, uncertain="ones")
    assert zeros.fingerprint() == ones.fingerprint()
    assert zeros.labels_fingerprint() != ones.labels_fingerprint()


# ---------------------------------------------------------------------------------------------------------
# Images


def test_load_image_png_jpg_gray_and_16bit(tmp_path: Path) -> None:
    rng = np.random.RandomState(0)
    rgb = load_image(write_image(tmp_path / "a.png", rng))
    assert rgb.mode == "RGB" and rgb.size == (32, 32)
    gray = np.asarray(load_image(write_image(tmp_path / "b.jpg", rng, gray=True)))
    assert gray.shape == (32, 32, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").mode == "RGB"
    wide = (np.arange(64 * 64).reshape(64, 64) + 1000).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = np.asarray(load_image(tmp_path / "wide.png"))[..., 0]
    assert out.min() == 0 and out.max() == 255 and np.all(np.diff(out[:, 0].astype(int)) >= 0)


def test_load_image_dicom(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))  # 8×64, 0..4032
    mono2 = np.asarray(load_image(write_dicom(tmp_path / "m2.dcm", ramp)))
    assert mono2.shape == (8, 64, 3) and mono2[0, 0, 0] == 0 and mono2[0, -1, 0] == 255
    mono1 = np.asarray(load_image(write_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1")))
    assert np.array_equal(mono1, 255 - mono2)
    windowed = np.asarray(load_image(write_dicom(tmp_path / "w.dcm", ramp, window=(2000, 400))))[0, :, 0]
    assert np.all(windowed[ramp[0] <= 1800] == 0) and np.all(windowed[ramp[0] >= 2200] == 255)
    rescaled = np.asarray(load_image(write_dicom(tmp_path / "r.dcm", ramp, rescale=(-1.0, 0.0))))[0, :, 0]
    assert rescaled[0] == 255 and rescaled[-1] == 0  # slope -1 reverses intensities
    from pydicom.data import get_testdata_file

    ct = load_image(get_testdata_file("CT_small.dcm"))
    assert ct.mode == "RGB" and ct.size == (128, 128)


def test_load_image_corrupt_and_missing(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    with pytest.raises(FmcacheError, match=r"cannot read image .*bad.png: .*; re-download the file"):
        load_image(tmp_path / "bad.png")
    good = write_image(tmp_path / "good.png", np.random.RandomState(0), size=64)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FmcacheError, match=r"cannot read image .*cut.png"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 50)
    with pytest.raises(FmcacheError, match=r"cannot read image .*bad.dcm"):
        load_image(tmp_path / "bad.dcm")
    with pytest.raises(FmcacheError, match=r"cannot read image .*absent.jpg: file not found"):
        load_image(tmp_path / "absent.jpg")


# ---------------------------------------------------------------------------------------------------------
# Transforms and the torch Dataset


def test_build_transform() -> None:
    transform, spec = build_transform()
    out = transform(Image.new("RGB", (50, 40), (124, 116, 104)))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert out.abs().max() < 0.02  # ImageNet mean colour normalises to ~0
    assert spec["resize"] == [256, 256] and spec["crop"] == 224 and spec["interpolation"] == "bilinear"
    assert json.loads(json.dumps(spec)) == spec
    assert build_transform(img_size=448)[1]["resize"] == [512, 512]
    _, gray = build_transform(112, resize=128, mean=[0.5], std=[0.25], interpolation="bicubic")
    assert gray["mean"] == [0.5] * 3 and gray["resize"] == [128, 128]
    with pytest.raises(FmcacheError, match=r"resize \(100\) must be at least img_size \(224\)"):
        build_transform(224, resize=100)
    with pytest.raises(FmcacheError, match="unknown interpolation 'cubic'; choose one of nearest, bilinear"):
        build_transform(interpolation="cubic")
    with pytest.raises(FmcacheError, match="std > 0"):
        build_transform(std=(0.2, 0.0, 0.2))


def test_train_augmentation() -> None:
    augment = train_augmentation(64, *dataset_norm("aptos2019"))
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (80, 90, 3), dtype=np.uint8))
    torch.manual_seed(0)
    first = augment(image)
    torch.manual_seed(0)
    assert first.shape == (3, 64, 64) and torch.equal(first, augment(image))
    spec = train_augmentation_spec(64)
    assert spec["crop_scale"] == [0.8, 1.2]  # the seed's, torchvision's full-image fallback included


def test_image_dataset(aptos_root: Path) -> None:
    index = load_dataset("aptos2019", aptos_root)
    transform, _ = build_transform(32, resize=36, mean=dataset_norm("aptos2019")[0], std=dataset_norm("aptos2019")[1])
    dataset = ImageDataset(index, index.indices("val"), transform)
    assert len(dataset) == 6
    tensor, global_index = dataset[2]
    assert tensor.shape == (3, 32, 32) and global_index == int(index.indices("val")[2])
    batch, ids = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch.shape == (4, 3, 32, 32) and ids.tolist() == index.indices("val")[:4].tolist()
    with pytest.raises(ValueError, match="indices must lie in"):
        ImageDataset(index, np.array([40]), transform)
