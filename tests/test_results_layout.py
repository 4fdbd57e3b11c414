"""The results layout that ``fmcache report`` and ``fmcache grid`` rely on (``fmcache.results`` module doc)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmcache.errors import FmcacheError
from fmcache.protocols import names
from fmcache.results import (
    find_results,
    is_complete,
    result_folder,
    seed_summary,
    settings_hash,
    write_result,
)


def test_settings_hash_is_canonical_and_sensitive():
    a = {"lrs": [1e-3, 1e-4], "epochs": 5, "pool": ["cls"]}
    b = {"pool": ["cls"], "epochs": 5, "lrs": [1e-3, 1e-4]}
    assert settings_hash(a) == settings_hash(b)
    assert len(settings_hash(a)) == 64
    assert settings_hash(a) != settings_hash({**a, "epochs": 6})
    # numpy scalars hash like their Python values, so a setting read from an array names the same folder
    assert settings_hash({"epochs": np.int64(5)}) == settings_hash({"epochs": 5})


def test_result_folder_layout(tmp_path):
    settings = {"k": [10, 20]}
    folder = result_folder(tmp_path, "digits", "hf:org/model", "a" * 64, "knn", settings)
    assert folder == tmp_path / "digits" / "hf_org_model" / ("a" * 12) / f"knn-{settings_hash(settings)[:12]}"
    assert not folder.exists()  # only a name: the grid asks without writing
    with pytest.raises(FmcacheError, match="unknown protocol"):
        result_folder(tmp_path, "digits", "m", "k", "probe", settings)
    assert set(names()) >= {"knn", "probe_linear", "probe_deit", "probe_attentive", "cka", "finetune_linear"}


def _write(folder, **overrides):
    kwargs = dict(
        protocol="probe_linear", settings={"epochs": 1}, dataset="digits", model="m", cache_key="k" * 64,
        weights={"source": "x"}, metric="accuracy", timings={"train_seconds": 1.0},
        summary=seed_summary(1e-3, [0.5, 0.7], [0.4, 0.6], 2), details={"layers": {}},
        rows=[{"lr": 1e-3, "seed": 0, "test": 0.4}],
        predictions={"test_scores": np.zeros((2, 3, 4)), "seeds": np.array([0, 1])},
    )  # fmt: skip
    kwargs.update(overrides)
    return write_result(folder, **kwargs)


def test_write_result_then_find(tmp_path):
    folder = result_folder(tmp_path, "digits", "m", "k" * 64, "probe_linear", {"epochs": 1})
    assert not is_complete(folder)
    path = _write(folder)
    assert path == folder / "result.json" and is_complete(folder)
    doc = json.loads(path.read_text())
    for key in ("protocol", "settings", "settings_hash", "dataset", "model", "cache_key", "weights", "metric",
                "status", "fmcache_version", "written_at", "timings", "summary", "details"):  # fmt: skip
        assert key in doc, key
    assert doc["settings_hash"] == settings_hash({"epochs": 1})
    assert doc["summary"]["test_mean"] == pytest.approx(0.5)
    assert doc["summary"]["test_std"] == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert (folder / "result.csv").read_text().startswith("lr,seed,test")
    with np.load(folder / "predictions.npz") as npz:
        assert npz["test_scores"].dtype == np.float32 and npz["test_scores"].shape == (2, 3, 4)
    # an incomplete folder (no result.json) and a broken JSON are not results
    (tmp_path / "digits" / "m" / "x" / "knn-0").mkdir(parents=True)
    broken = tmp_path / "digits" / "m" / "y" / "knn-1"
    broken.mkdir(parents=True)
    (broken / "result.json").write_text("{")
    found = find_results(tmp_path)
    assert [r["folder"] for r in found] == [str(folder)]
    assert found[0]["protocol"] == "probe_linear"
    assert not is_complete(broken)


def test_find_results_on_empty_tree(tmp_path):
    assert find_results(tmp_path) == []
    assert find_results(tmp_path / "missing") == []
