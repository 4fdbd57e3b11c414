"""Raw annotations and metadata in the cache; the label policy is stage two's (issue #28, section 1).

One CheXpert cache serves U-Zeros, U-Ones and U-Ignore without touching a byte of it; a cache made before 0.4 reads
as it always did, its policy reported as fixed at extraction; every result names its label policy and its bootstrap
unit, and its predictions carry each sample's unit and metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fmcache.cache.annotations import ANNOTATIONS
from fmcache.cache.manifest import MANIFEST
from fmcache.cache.reader import CacheReader
from fmcache.data.registry import load_dataset
from fmcache.errors import FmcacheError
from fmcache.extract.run import run_extract
from fmcache.extract.spec import ExtractSpec
from fmcache.labels import apply_uncertainty
from fmcache.results import PREDICTIONS, RESULT_JSON
from tests.conftest import knn, probe, quiet, spec_kwargs
from tests.fixtures_data import make_chexpert, make_csv, make_imagefolder, write_csv

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def chexpert_cache(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, cache folder): the tiny dinov2 over a CheXpert fixture, extracted once with the default policy."""
    base = tmp_path_factory.mktemp("chexpert_policies")
    root = make_chexpert(base / "data", n=60)
    folder = run_extract(
        ExtractSpec(**spec_kwargs(root, base / "cache", dataset="chexpert")), progress=False, log=quiet
    )
    return root, folder


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_uncertainty_policies_match_the_definitions() -> None:
    names = ("Atelectasis", "No Finding", "Edema")
    raw = np.array([[1, np.nan, -1], [-1, np.nan, np.nan], [0, 0, -1], [np.nan, np.nan, np.nan]], dtype=np.float32)
    zeros = apply_uncertainty(raw, "zeros", names)
    ones = apply_uncertainty(raw, "ones", names)
    ignore = apply_uncertainty(raw, "ignore", names)
    # U-Zeros: -1 and blank are 0, and a row left all zero is No Finding (the seed's rule)
    np.testing.assert_array_equal(zeros, [[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(ones, [[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(ignore, [[1, 0, np.nan], [np.nan, 0, 0], [0, 0, np.nan], [0, 0, 0]])
    with pytest.raises(FmcacheError, match="unknown --uncertain 'maybe'"):
        apply_uncertainty(raw, "maybe", names)


def test_the_cache_keeps_raw_annotations_and_the_loaders_policy_is_reproduced(chexpert_cache) -> None:
    root, folder = chexpert_cache
    manifest = json.loads((folder / MANIFEST).read_text())
    facts = manifest["annotations"]
    assert facts["label_policy"] == "uncertainty" and facts["group_unit"] and len(facts["raw_label_names"]) == 14
    assert {"sex", "age", "view"} <= set(facts["metadata"])
    for policy in ("zeros", "ones", "ignore"):
        index = load_dataset("chexpert", root, uncertain=policy)
        reader = CacheReader(folder, uncertain=policy)
        for split in SPLITS:
            # the loader applying the policy at stage one and the reader applying it to the cached raw annotations
            # give the same labels, sample for sample
            np.testing.assert_array_equal(reader.labels(split), index.labels[reader.ids(split)])
            np.testing.assert_array_equal(reader.groups(split), index.groups()[reader.ids(split)])
    # the default reads the stored labels, which are the seed's U-Zeros
    default = CacheReader(folder)
    np.testing.assert_array_equal(default.labels("test"), CacheReader(folder, uncertain="zeros").labels("test"))
    assert default.label_policy == {"uncertain": "zeros", "applied": "stage two"}


def test_extract_with_another_policy_finds_the_same_cache(chexpert_cache, tmp_path: Path) -> None:
    """--uncertain at extraction is a stage-two choice: same key, same folder, a note says where it belongs."""
    root, folder = chexpert_cache
    lines: list[str] = []
    kw = spec_kwargs(root, folder.parents[2], dataset="chexpert", dataset_options={"uncertain": "ones"})
    again = run_extract(ExtractSpec(**kw), progress=False, log=lines.append)
    assert again == folder
    assert any("--uncertain ones is a stage-two choice" in line for line in lines)


def test_three_policies_from_one_cache_leave_it_untouched_and_give_three_results(chexpert_cache, tmp_path) -> None:
    _, folder = chexpert_cache
    before = _hashes(folder)
    results = {p: knn(folder, out=tmp_path / "r", ks=(5,), uncertain=p) for p in ("zeros", "ones", "ignore")}
    assert _hashes(folder) == before  # same files, same bytes
    folders = {p: Path(r["folder"]) for p, r in results.items()}
    assert len(set(folders.values())) == 3
    scored = {}
    for policy, path in folders.items():
        doc = json.loads((path / RESULT_JSON).read_text())
        assert doc["settings"]["uncertain"] == policy
        assert doc["label_policy"] == {"uncertain": policy, "applied": "stage two"}
        assert doc["group_unit"] == CacheReader(folder).group_unit
        with np.load(path / PREDICTIONS) as npz:
            scored[policy] = npz["test_labels"]
            assert npz["test_groups"].shape == npz["test_ids"].shape
            assert {"test_meta__sex", "test_meta__view"} <= set(npz.files)
    assert not np.array_equal(scored["zeros"], scored["ones"], equal_nan=True)
    assert np.isnan(scored["ignore"]).any() and not np.isnan(scored["ones"]).any()
    # a probe takes the policy the same way
    head = probe(folder, out=tmp_path / "r", lrs=(1e-3,), seeds=1, epochs=2, batch_size=16, uncertain="ones")
    assert json.loads((Path(head["folder"]) / RESULT_JSON).read_text())["label_policy"]["uncertain"] == "ones"
    assert _hashes(folder) == before


def test_a_cache_made_before_annotations_reads_unchanged(chexpert_cache, tmp_path: Path) -> None:
    """No annotations entry: the stored labels, the policy fixed at extraction, and a clear refusal of another."""
    import shutil

    _, folder = chexpert_cache
    old = tmp_path / "old" / folder.name
    shutil.copytree(folder, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["annotations"]
    manifest["inputs"]["dataset"]["options"] = {"uncertain": "ones"}  # what 0.3 keyed and stored
    (old / MANIFEST).write_text(json.dumps(manifest))
    (old / ANNOTATIONS).unlink()
    reader = CacheReader(old)
    stored = CacheReader(folder).labels("test")
    np.testing.assert_array_equal(reader.labels("test"), stored)
    assert reader.label_policy == {"uncertain": "ones", "applied": "fixed at extraction"}
    assert reader.groups("test") is None and reader.metadata("test") == {}
    assert CacheReader(old, uncertain="ones").uncertain is None  # what it stores: nothing to apply
    with pytest.raises(FmcacheError, match="labels are fixed at extraction"):
        CacheReader(old, uncertain="ignore")
    result = knn(old, out=tmp_path / "r", ks=(5,))
    doc = json.loads((Path(result["folder"]) / RESULT_JSON).read_text())
    assert doc["label_policy"]["applied"] == "fixed at extraction" and doc["group_unit"] is None


def test_a_dataset_without_a_policy_refuses_one(tiny_cache: Path) -> None:
    with pytest.raises(FmcacheError, match="has no uncertain labels"):
        CacheReader(tiny_cache, uncertain="ones")


def test_a_changed_annotations_file_is_named(chexpert_cache, tmp_path: Path) -> None:
    import shutil

    _, folder = chexpert_cache
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    (copy / ANNOTATIONS).write_bytes(b"not the file")
    with pytest.raises(FmcacheError, match="does not match the sha256"):
        CacheReader(copy, uncertain="ones").labels("test")


def test_user_metadata_from_a_csv_and_an_imagefolder(tmp_path: Path) -> None:
    csv_root = make_csv(tmp_path / "csv", n=12)
    rows = [line.split(",") for line in (csv_root / "labels.csv").read_text().splitlines()[1:]]
    header = ("path", "label", "patient_id", "sex", "age")
    write_csv(
        csv_root / "labels.csv", header, [[*r, f"p{i // 3}", "FM"[i % 2], str(30 + i)] for i, r in enumerate(rows)]
    )
    index = load_dataset("csv", csv_root)
    assert index.group_unit == "patient_id" and index.metadata["age"].dtype == np.float64
    assert list(index.groups()[:3]) == ["patient_id:p0"] * 3 and set(index.metadata["sex"]) == {"F", "M"}

    folder_root = make_imagefolder(tmp_path / "folder", n=9)
    images = sorted(p.relative_to(folder_root).as_posix() for p in folder_root.rglob("*.png"))
    write_csv(
        folder_root / "metadata.csv",
        ("path", "patient", "site"),
        [[p, f"q{i % 2}", "x"] for i, p in enumerate(images[:-1])],
    )
    index = load_dataset("imagefolder", folder_root)
    assert index.group_unit == "patient" and index.groups()[-1].startswith("image:")  # the unlisted image
    assert any("no row for 1 image" in p for p in index.problems)
    assert not any("ignored" in p for p in index.problems)  # metadata.csv is not a stray file


def test_verify_names_a_changed_annotations_file_and_a_rerun_restores_it(chexpert_cache, tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from fmcache.cli import app

    root, folder = chexpert_cache
    copy_root = tmp_path / "cache"
    copy = copy_root / folder.relative_to(folder.parents[2])
    shutil.copytree(folder, copy)
    good = (copy / ANNOTATIONS).read_bytes()
    (copy / ANNOTATIONS).write_bytes(b"not the file")
    answer = CliRunner().invoke(app, ["verify", str(copy)])
    assert answer.exit_code == 2 and "annotations.npz does not match the sha256" in answer.output
    again = run_extract(ExtractSpec(**spec_kwargs(root, copy_root, dataset="chexpert")), progress=False, log=quiet)
    assert again == copy and (copy / ANNOTATIONS).read_bytes() == good  # only the annotations were written again
    assert CliRunner().invoke(app, ["verify", str(copy)]).exit_code == 0
