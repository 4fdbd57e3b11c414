"""Split modes: the seed's row-shuffle split (and val_ids.json), exported split files, grouped splits."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fmcache.cli import app
from fmcache.data import SPLITS, DatasetIndex, load_dataset, read_split_csv, write_split_csv
from fmcache.errors import FmcacheError
from tests.conftest import spec_kwargs
from tests.fixtures_data import (
    make_aptos,
    make_chexpert,
    make_csv,
    make_ddsm_lists,
    make_ddsm_tcia,
    make_imagefolder,
    make_isic,
)

LABEL_CSV = {"aptos2019": ("train.csv", "id_code"), "isic2019": ("ISIC_2019_Training_GroundTruth.csv", "image")}
HOLDOUT = {"aptos2019": 0.3, "isic2019": 0.2}
MAKERS = {"aptos2019": make_aptos, "isic2019": make_isic}


def csv_ids(root: Path, dataset: str) -> list[str]:
    """Image ids of the label CSV's rows, in file order."""
    name, column = LABEL_CSV[dataset]
    with open(root / name, newline="") as handle:
        return [row[column] for row in csv.DictReader(handle)]


def seed_membership(n: int, val_size: float) -> dict[str, list[int]]:
    """The seed's get_validation_ids + halving, written here independently of fmcache."""
    idxs = list(range(n))
    random.Random(42).shuffle(idxs)
    n_val = int(n * val_size)
    train, held = idxs[n_val:], idxs[:n_val]
    return {"train": train, "val": held[: int(len(held) / 2)], "test": held[int(len(held) / 2) :]}


def members(index: DatasetIndex) -> dict[str, set[str]]:
    return {s: {index.paths[i].stem for i in index.indices(s)} for s in SPLITS}


def expected_members(ids: list[str], rows: dict[str, list[int]]) -> dict[str, set[str]]:
    return {s: {ids[i] for i in rows[s]} for s in SPLITS}


# ---------------------------------------------------------------------------------------------------------
# The seed's split


@pytest.mark.parametrize("dataset", ["aptos2019", "isic2019"])
@pytest.mark.parametrize("n", [40, 57])
def test_seed_split_matches_the_seed(tmp_path: Path, dataset: str, n: int) -> None:
    root = MAKERS[dataset](tmp_path, n=n)
    ids = csv_ids(root, dataset)
    assert ids != sorted(ids), "the fixture's CSV rows must not be in canonical order, or row mapping is untested"
    index = load_dataset(dataset, root)  # seed is the default
    assert index.split_info["mode"] == "seed" and index.split_info["holdout"] == HOLDOUT[dataset]
    assert members(index) == expected_members(ids, seed_membership(n, HOLDOUT[dataset]))
    # The canonical order (sorted ids) is unchanged; only the split follows the seed.
    assert [p.stem for p in index.paths] == sorted(ids)


def test_seed_split_differs_from_random_and_both_are_cache_inputs(tmp_path: Path) -> None:
    root = make_aptos(tmp_path, n=40)
    seed, rand = load_dataset("aptos2019", root), load_dataset("aptos2019", root, split="random")
    assert seed.paths == rand.paths and not np.array_equal(seed.split, rand.split)
    assert seed.labels_fingerprint() != rand.labels_fingerprint()


def test_extract_key_covers_the_split_mode(tmp_path: Path) -> None:
    from fmcache.extract.plan import plan
    from fmcache.extract.spec import ExtractSpec

    root = make_aptos(tmp_path / "data", n=20)
    exported = write_split_csv(load_dataset("aptos2019", root), tmp_path / "split.csv")

    def key(split: str | None) -> str:
        options = {} if split is None else {"split": split}
        return plan(ExtractSpec(**spec_kwargs(root, tmp_path / "cache", dataset_options=options))).key

    keys = {s: key(s) for s in ("seed", "random", f"file:{exported}")}
    assert key(None) == keys["seed"], "the default is the seed split"
    assert len(set(keys.values())) == 3, keys


# ---------------------------------------------------------------------------------------------------------
# val_ids.json


@pytest.mark.parametrize("dataset", ["aptos2019", "isic2019"])
def test_val_ids_json_dict_and_list_are_honoured(tmp_path: Path, dataset: str) -> None:
    n = 40
    root = MAKERS[dataset](tmp_path, n=n)
    ids = csv_ids(root, dataset)
    shuffled = list(range(n))
    random.Random(5).shuffle(shuffled)  # not the seed's order: proves the file is read
    n_val = int(n * HOLDOUT[dataset])
    held, train = shuffled[:n_val], shuffled[n_val:]
    rows = {"train": train, "val": held[: n_val // 2], "test": held[n_val // 2 :]}
    assert expected_members(ids, rows) != expected_members(ids, seed_membership(n, HOLDOUT[dataset]))

    (root / "val_ids.json").write_text(json.dumps({"train_split": train, "val_split": held}))
    index = load_dataset(dataset, root)
    assert members(index) == expected_members(ids, rows)
    assert index.split_info["source"] == "val_ids.json" and len(index.split_info["val_ids_sha256"]) == 64

    (root / "val_ids.json").write_text(json.dumps(held))  # the seed's other form: held-out indices only
    listed = load_dataset(dataset, root)
    assert members(listed) == expected_members(ids, rows)
    assert listed.labels_fingerprint() != index.labels_fingerprint(), "the file's hash is part of the cache key"


def test_val_ids_json_of_other_size_is_ignored_like_the_seed(tmp_path: Path) -> None:
    root = make_aptos(tmp_path, n=40)
    (root / "val_ids.json").write_text(json.dumps(list(range(5))))  # 5 held out, the seed expects 12
    index = load_dataset("aptos2019", root)
    assert members(index) == expected_members(csv_ids(root, "aptos2019"), seed_membership(40, 0.3))
    assert any("val_ids.json ignored" in p for p in index.problems)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"cannot read .*val_ids.json"),
        ('{"val_split": []}', "lacks key.s. train_split"),
        ('{"train_split": [0], "val_split": "x"}', "val_split must be a list of integer row indices"),
        ("[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99]", "row index 99 is outside 0..39"),
        ("[0, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]", "repeat"),
        ('"held"', "expected a dict with train_split/val_split or a list"),
    ],
)
def test_bad_val_ids_json(tmp_path: Path, content: str, message: str) -> None:
    root = make_aptos(tmp_path, n=40)
    (root / "val_ids.json").write_text(content)
    with pytest.raises(FmcacheError, match=message):
        load_dataset("aptos2019", root)


def test_seed_split_refuses_repeated_rows(tmp_path: Path) -> None:
    root = make_isic(tmp_path, n=10)
    path = root / "ISIC_2019_Training_GroundTruth.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[3]]) + "\n")
    with pytest.raises(
        FmcacheError, match=r"appears on lines 4 and 12 .*remove the repeated row or pass --split random"
    ):
        load_dataset("isic2019", root)
    assert len(load_dataset("isic2019", root, split="random")) == 10


# ---------------------------------------------------------------------------------------------------------
# Modes per dataset


@pytest.mark.parametrize(
    ("dataset", "maker", "mode", "valid"),
    [
        ("aptos2019", make_aptos, "lesion", "seed, random or file:FILE.csv"),
        ("isic2019", make_isic, "patient", "seed, random, lesion or file:FILE.csv"),
        ("chexpert", make_chexpert, "random", "seed, patient or file:FILE.csv"),
        ("cbis_ddsm", make_ddsm_lists, "seed", "official, patient or file:FILE.csv"),
        ("csv", make_csv, "seed", "auto or file:FILE.csv"),
        ("imagefolder", make_imagefolder, "random", "auto or file:FILE.csv"),
    ],
)
def test_unknown_split_mode_is_one_line(tmp_path: Path, dataset: str, maker, mode: str, valid: str) -> None:
    root = maker(tmp_path / dataset)
    with pytest.raises(FmcacheError, match=rf"^{dataset}: split='{mode}' is not valid; choose one of {valid} ") as err:
        load_dataset(dataset, root, split=mode)
    assert "\n" not in str(err.value)


def test_patient_split_needs_the_tcia_layout(tmp_path: Path) -> None:
    with pytest.raises(FmcacheError, match="split='patient' needs the TCIA layout"):
        load_dataset("cbis_ddsm", make_ddsm_lists(tmp_path), split="patient")


# ---------------------------------------------------------------------------------------------------------
# Export and file: round trip


def _roots(tmp_path: Path) -> list[tuple[str, Path, dict]]:
    return [
        ("aptos2019", make_aptos(tmp_path / "aptos", n=20), {}),
        ("isic2019", make_isic(tmp_path / "isic", n=24, metadata=True), {"split": "lesion"}),
        ("cbis_ddsm", make_ddsm_lists(tmp_path / "lists", n=12), {}),
        ("cbis_ddsm", make_ddsm_tcia(tmp_path / "tcia", n=14, per_patient=3), {"split": "patient"}),
        ("chexpert", make_chexpert(tmp_path / "chexpert", n=40), {"uncertain": "ignore"}),
        ("csv", make_csv(tmp_path / "csv", n=12, multilabel=True), {"label_columns": "a,b,c"}),
        ("imagefolder", make_imagefolder(tmp_path / "folder", n=12), {}),
    ]


def test_export_then_file_gives_the_identical_index(tmp_path: Path) -> None:
    for dataset, root, options in _roots(tmp_path):
        index = load_dataset(dataset, root, **options)
        out = write_split_csv(index, tmp_path / f"{dataset}-{root.name}.csv")
        with open(out, newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == ["id", "path", "split", "label"] and len(rows) == len(index) + 1
        assert [int(r[0]) for r in rows[1:]] == list(range(len(index)))
        assert {r[2] for r in rows[1:]} <= set(SPLITS)
        if index.multilabel:
            assert all(len(r[3].split(";")) == index.num_classes for r in rows[1:])
            assert any(";;" in r[3] or r[3].startswith(";") for r in rows[1:]), "NaN labels are written blank"
        again = load_dataset(dataset, root, **{**options, "split": f"file:{out}"})
        assert again.paths == index.paths, dataset
        assert np.array_equal(again.split, index.split), dataset
        assert np.array_equal(again.labels, index.labels, equal_nan=True), dataset
        assert again.split_info["mode"] == "file" and again.split_info["file"] == out.name
        assert again.split_info.get("task") == index.split_info.get("task")


def test_file_split_can_move_samples(tmp_path: Path) -> None:
    root = make_aptos(tmp_path, n=20)
    index = load_dataset("aptos2019", root)
    out = write_split_csv(index, tmp_path / "split.csv")
    lines = out.read_text().splitlines()
    cells = lines[1].split(",")
    cells[2] = "test" if cells[2] != "test" else "train"
    lines[1] = ",".join(cells)
    out.write_text("\n".join(lines) + "\n")
    moved = load_dataset("aptos2019", root, split=f"file:{out}")
    assert moved.split[0] == SPLITS.index(cells[2]) and np.array_equal(moved.split[1:], index.split[1:])


def _edit(out: Path, row: int, column: int, value: str | None) -> None:
    """Set one cell (value) or drop the row (None) of a split file."""
    with open(out, newline="") as handle:
        rows = list(csv.reader(handle))
    if value is None:
        del rows[row]
    else:
        rows[row][column] = value
    with open(out, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.mark.parametrize(
    ("row", "column", "value", "message"),
    [
        (0, 3, "labels", r"columns are id,path,split,labels, expected exactly id,path,split,label"),
        (2, 1, "train_images/nope.png", r"line 3: path 'train_images/nope.png' is not a sample of aptos2019"),
        (2, None, None, r"lacks 1 of 10 samples \(e.g. train_images/.*\.png\); export the split"),
        (2, 2, "training", r"line 3: split 'training' is not one of train, val, test"),
        (2, 3, "9", r"line 3: label '9' of 'train_images/.*' disagrees with the dataset"),
        (2, 3, "x", r"line 3: label 'x' is not a class index"),
        (2, 0, "7", r"line 3: id '7' for 'train_images/.*', but that sample is id 1"),
    ],
)
def test_bad_split_files_are_refused(tmp_path: Path, row: int, column, value, message: str) -> None:
    root = make_aptos(tmp_path, n=10)
    out = write_split_csv(load_dataset("aptos2019", root), tmp_path / "split.csv")
    _edit(out, row, column or 0, value)
    with pytest.raises(FmcacheError, match=message) as err:
        load_dataset("aptos2019", root, split=f"file:{out}")
    assert "\n" not in str(err.value)


def test_split_file_other_refusals(tmp_path: Path) -> None:
    root = make_aptos(tmp_path, n=10)
    index = load_dataset("aptos2019", root)
    out = write_split_csv(index, tmp_path / "split.csv")
    lines = out.read_text().splitlines()
    out.write_text("\n".join([*lines, lines[4]]) + "\n")
    with pytest.raises(FmcacheError, match=r"line 12: path .* is listed twice"):
        read_split_csv(out, index)
    with pytest.raises(FmcacheError, match=r"cannot read split file .*missing.csv"):
        load_dataset("aptos2019", root, split=f"file:{tmp_path / 'missing.csv'}")
    with pytest.raises(FmcacheError, match="split='file:' needs a file name"):
        load_dataset("aptos2019", root, split="file:")
    with pytest.raises(FmcacheError, match=r"folder .*nowhere does not exist"):
        write_split_csv(index, tmp_path / "nowhere" / "split.csv")
    # labels made under other options disagree: a CheXpert split exported with U-Ones is not valid for U-Zeros
    chex = make_chexpert(tmp_path / "chex", n=40)
    ones = write_split_csv(load_dataset("chexpert", chex, uncertain="ones"), tmp_path / "ones.csv")
    with pytest.raises(FmcacheError, match="disagrees with the dataset"):
        load_dataset("chexpert", chex, uncertain="zeros", split=f"file:{ones}")


def test_cli_export_split(tmp_path: Path) -> None:
    root = make_aptos(tmp_path / "aptos", n=20)
    out = tmp_path / "split.csv"
    runner = CliRunner()
    args = ["datasets", "--dataset", "aptos2019", "--data-root", str(root), "--export-split", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "written to" in result.output and out.is_file()
    index = load_dataset("aptos2019", root)
    assert out.read_text() == Path(write_split_csv(index, tmp_path / "again.csv")).read_text()
    result = runner.invoke(
        app, ["datasets", "--dataset", "aptos2019", "--data-root", str(root), "--split", f"file:{out}", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["split_info"]["mode"] == "file"
    result = runner.invoke(app, ["datasets", "--dataset", "aptos2019", "--data-root", str(root), "--split", "lesion"])
    assert result.exit_code == 2 and "split='lesion' is not valid" in result.output


# ---------------------------------------------------------------------------------------------------------
# Grouped splits


def _groups(index: DatasetIndex, group_of) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for path, code in zip(index.paths, index.split, strict=True):
        out.setdefault(group_of(path), set()).add(int(code))
    return out


def test_isic_lesion_split_keeps_each_lesion_in_one_split(tmp_path: Path) -> None:
    root = make_isic(tmp_path, n=60, metadata=True)
    index = load_dataset("isic2019", root, split="lesion")
    with open(root / "ISIC_2019_Training_Metadata.csv", newline="") as handle:
        lesion = {r["image"]: r["lesion_id"] for r in csv.DictReader(handle)}
    groups = _groups(index, lambda p: lesion[p.stem] or p.stem)
    assert all(len(codes) == 1 for codes in groups.values()), groups
    assert sum(1 for v in lesion.values() if v) > len({v for v in lesion.values() if v}), "fixture shares lesions"
    info = index.split_info
    assert info["mode"] == "lesion" and info["images_without_lesion_id"] == 12
    assert info["lesions"] == len({v for v in lesion.values() if v})
    # fractions apply to groups: 80/10/10 of (lesions + images without lesion_id)
    n_groups = info["lesions"] + info["images_without_lesion_id"]
    val_groups = {g for g, codes in groups.items() if codes == {1}}
    assert len(val_groups) == int(n_groups * 0.1 + 0.5)
    # the seed split does put some lesion in two splits on this fixture: the grouped split is needed
    seed = load_dataset("isic2019", root)
    assert any(len(c) > 1 for c in _groups(seed, lambda p: lesion[p.stem] or p.stem).values())


def test_isic_lesion_split_needs_metadata(tmp_path: Path) -> None:
    root = make_isic(tmp_path, n=10)
    with pytest.raises(FmcacheError, match=r"--split lesion needs .*ISIC_2019_Training_Metadata\.csv"):
        load_dataset("isic2019", root, split="lesion")
    root = make_isic(tmp_path / "meta", n=10, metadata=True)
    meta = root / "ISIC_2019_Training_Metadata.csv"
    meta.write_text("\n".join(meta.read_text().splitlines()[:-2]) + "\n")
    index = load_dataset("isic2019", root, split="lesion")
    assert any("does not list 2 image(s)" in p for p in index.problems)


def _patient(path: Path) -> str:
    case = next(part for part in path.parts if part.startswith(("Mass-", "Calc-")))
    return "P_" + case.split("_P_")[1].split("_")[0]


def test_ddsm_patient_split_keeps_each_patient_in_one_split(tmp_path: Path) -> None:
    # 28 cases, 3 views per patient: cases 0-13 are official train, so patient 4 (cases 12, 13, 14) crosses.
    root = make_ddsm_tcia(tmp_path, n=28, per_patient=3)
    official = load_dataset("cbis_ddsm", root)
    assert official.split_info["mode"] == "official+val"
    assert any(len(codes) > 1 for codes in _groups(official, _patient).values()), "the default leaks patients"
    index = load_dataset("cbis_ddsm", root, split="patient", val_fraction=0.25)
    groups = _groups(index, _patient)
    assert all(len(codes) == 1 for codes in groups.values()), groups
    assert groups["P_00004"] == {2}, "a patient with any official test image goes to test"
    assert index.split_info["mode"] == "patient" and index.split_info["patients_moved_to_test"] == 1
    assert any("1 patient(s) had images in both" in p and "2 image(s) moved" in p for p in index.problems)
    # every official test image stays in test; val is a quarter of the 4 pure-train patients
    assert np.all(index.split[official.split == 2] == 2)
    assert sum(codes == {1} for codes in groups.values()) == 1
    assert index.paths == official.paths and np.array_equal(index.labels, official.labels)


def test_ddsm_task_is_named(tmp_path: Path) -> None:
    tcia = load_dataset("cbis_ddsm", make_ddsm_tcia(tmp_path / "tcia", n=12))
    lists = load_dataset("cbis_ddsm", make_ddsm_lists(tmp_path / "lists", n=12))
    assert tcia.split_info["task"].startswith("benign vs malignant") and "not the paper's" in tcia.split_info["task"]
    assert lists.split_info["task"].startswith("normal vs abnormal")
    assert tcia.class_names == ("benign", "malignant") and lists.class_names == ("normal", "abnormal")


def test_copied_tree_keeps_its_split(tmp_path: Path) -> None:
    # A split file is relative to the root: it applies to a moved copy of the same data.
    root = make_aptos(tmp_path / "a", n=12)
    out = write_split_csv(load_dataset("aptos2019", root, split="random"), tmp_path / "split.csv")
    copy = Path(shutil.copytree(root, tmp_path / "b"))
    moved = load_dataset("aptos2019", copy, split=f"file:{out}")
    assert np.array_equal(moved.split, load_dataset("aptos2019", root, split="random").split)
