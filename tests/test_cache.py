"""The cache's on-disk format and the one reader API of stage two (CacheReader, TokenDataset, align)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fmcache.cache.info import format_info, list_caches
from fmcache.cache.reader import CacheReader, align
from fmcache.cli import app
from fmcache.data import load_dataset
from fmcache.errors import FmcacheError
from fmcache.extract.run import run_extract
from fmcache.extract.spec import ExtractSpec
from tests.conftest import TINY_MODEL, quiet, spec_kwargs
from tests.fixtures_data import make_aptos, make_chexpert, write_csv, write_image
from tests.tiny_models import TINY

SPLITS = ("train", "val", "test")
T_TOKENS = 1 + (56 // 14) ** 2  # CLS + 4x4 patches of the tiny dinov2 at 56 px


def copy_cache(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest / folder.name))


@pytest.fixture(scope="module")
def resnet_cache(tmp_path_factory, aptos_root) -> Path:
    """The first 3 samples per split of APTOS through a tiny resnet50 (no CLS token, 5 stages, no tokens)."""
    size, overrides, *_ = TINY["resnet50"]
    kw = spec_kwargs(aptos_root, tmp_path_factory.mktemp("resnet"), limit=3)
    kw.update(model="resnet50", img_size=size, arch_overrides=overrides)
    return run_extract(ExtractSpec(**kw), progress=False, log=quiet)


# -- format and round trip -----------------------------------------------------------------------------------------


def test_shards_hold_the_documented_arrays(tiny_cache):
    """Readable with plain h5py: ids, split, labels, pooled (n, L, D) fp16, tokens (n, T, D), key attributes."""
    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["num_shards"] == 3 and manifest["dtype"] == "fp16"
    assert [s["n"] for s in manifest["shards"]] == [16, 16, 8]
    seen = []
    for entry in manifest["shards"]:
        path = tiny_cache / entry["file"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        with h5py.File(path, "r") as fh:
            n = entry["n"]
            assert fh.attrs["key"] == manifest["key"] and int(fh.attrs["schema"]) == manifest["schema"]
            assert int(fh.attrs["n"]) == n
            assert fh["ids"].shape == (n,) and fh["ids"].dtype == np.int64
            assert fh["split"].shape == (n,) and fh["split"].dtype == np.int8
            assert fh["labels"].shape == (n,) and fh["labels"].dtype == np.int64
            for kind in ("cls", "mean"):
                assert fh[f"pooled/{kind}"].shape == (n, 2, 384) and fh[f"pooled/{kind}"].dtype == np.float16
            assert fh["pooled/paper"].shape == (n, 384) and fh["pooled/paper"].dtype == np.float16
            for layer in (1, 2):
                tokens = fh[f"tokens/layer_{layer:02d}"]
                assert tokens.shape == (n, T_TOKENS, 384) and tokens.dtype == np.float16
                assert tokens.chunks == (1, T_TOKENS, 384), "one sample per chunk for whole-sample reads"
                assert tokens.compression is None
            seen.append(fh["ids"][...])
    ids = np.concatenate(seen)
    np.testing.assert_array_equal(ids, np.arange(40))  # shards cover the canonical order in slices


def test_reader_returns_ids_splits_and_labels(tiny_cache, aptos_root):
    reader = CacheReader(tiny_cache)
    index = load_dataset("aptos2019", aptos_root)
    assert reader.dataset == "aptos2019" and reader.model == TINY_MODEL and not reader.multilabel
    assert reader.num_layers == 2 and reader.layer_dims == [384, 384] and reader.token_layers == [1, 2]
    assert reader.pools == ["cls", "mean", "paper"] and reader.class_names == list(index.class_names)
    for code, split in enumerate(SPLITS):
        ids = reader.ids(split)
        np.testing.assert_array_equal(ids, index.indices(split))
        np.testing.assert_array_equal(reader.labels(split), index.labels[ids])
        assert reader.labels(split).dtype == np.int64
        pooled = reader.pooled(split, "last", "cls")
        assert pooled.shape == (len(ids), 384) and pooled.dtype == np.float32
        np.testing.assert_array_equal(pooled, reader.pooled(split, 2, "cls"))
        np.testing.assert_array_equal(pooled, reader.pooled(split, -1, "cls"))
        np.testing.assert_array_equal(reader.pooled(split, kind="paper"), pooled)  # dinov2's paper feature is CLS
        assert np.all(reader._index[0][reader.rows(split)] == code)
    assert reader.manifest["dataset"]["split_counts"] == {"train": 28, "val": 6, "test": 6}


def test_multilabel_chexpert_keeps_nan_for_uncertain(tmp_path):
    root = make_chexpert(tmp_path / "data", n=40)
    kw = spec_kwargs(root, tmp_path / "cache", limit=5, tokens="last")
    kw.update(dataset="chexpert", dataset_options={"uncertain": "ignore"})  # a stage-two choice: the cache is U-Zeros
    folder = run_extract(ExtractSpec(**kw), progress=False, log=quiet)
    reader = CacheReader(folder, uncertain="ignore")
    index = load_dataset("chexpert", root, uncertain="ignore")
    assert reader.multilabel and reader.class_names == list(index.class_names)
    labels = []
    for split in SPLITS:
        ids = reader.ids(split)
        np.testing.assert_array_equal(ids, index.indices(split)[:5])
        got = reader.labels(split)
        assert got.dtype == np.float32 and got.shape == (len(ids), 14)
        np.testing.assert_array_equal(got, index.labels[ids])  # NaN compares equal here
        labels.append(got)
        dataset = reader.tokens(split, "last")
        tokens, label, sample = dataset[0]
        assert tokens.shape == (T_TOKENS, 384) and label.shape == (14,) and sample == ids[0]
    labels = np.concatenate(labels)
    assert np.isnan(labels).any() and np.isin(labels[~np.isnan(labels)], [0.0, 1.0]).all()
    with h5py.File(folder / "shard-00000.h5", "r") as fh:
        assert fh["labels"].dtype == np.float32 and fh["labels"].shape[1] == 14
    assert "multi-label" in format_info(folder)


def test_token_dataset_streams_in_a_dataloader_with_workers(tiny_cache):
    reader = CacheReader(tiny_cache)
    dataset = reader.tokens("train", 1)
    first = dataset[0]  # opens a handle in this process first: workers must open their own
    assert len(dataset) == 28 and first[0].dtype == torch.float32
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2, shuffle=False)
    tokens, labels, ids = [], [], []
    for batch_tokens, batch_labels, batch_ids in loader:
        tokens.append(batch_tokens)
        labels.append(batch_labels)
        ids.append(batch_ids)
    tokens, labels, ids = torch.cat(tokens), torch.cat(labels), torch.cat(ids)
    assert tokens.shape == (28, T_TOKENS, 384)
    np.testing.assert_array_equal(ids.numpy(), reader.ids("train"))
    np.testing.assert_array_equal(labels.numpy(), reader.labels("train"))
    want = {}
    for path in sorted(tiny_cache.glob("shard-*.h5")):
        with h5py.File(path, "r") as fh:
            for i, sample in enumerate(fh["ids"][...]):
                want[int(sample)] = fh["tokens/layer_01"][i].astype(np.float32)
    np.testing.assert_array_equal(tokens.numpy(), np.stack([want[int(i)] for i in ids]))


# -- info and ls ---------------------------------------------------------------------------------------------------


def test_info_and_ls_print_the_expected_fields(tiny_cache):
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(tiny_cache)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    manifest = CacheReader(tiny_cache).manifest
    for text in (
        "complete (3/3 shards)",
        manifest["key"][:12],
        TINY_MODEL,
        "vit_small_patch14_dinov2",
        "weights    file",
        manifest["weights"]["sha256"][:12],
        "tokens     layers [1, 2]",
        "56px",
        "aptos2019",
        "'train': 28",
        "single-label 5 classes",
        "fp16, 40 images",
        "s/image",
    ):
        assert text in result.output, text

    root = tiny_cache.parents[2]
    rows = list_caches(root)
    assert len(rows) == 1
    assert rows[0]["path"] == str(tiny_cache) and rows[0]["status"] == "complete" and rows[0]["images"] == 40
    result = runner.invoke(app, ["ls", "--cache-root", str(root)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for text in (str(tiny_cache), "aptos2019", TINY_MODEL, "file", "40", "complete"):
        assert text in result.output, text


def test_info_and_ls_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "not a cache" in result.output
    result = runner.invoke(app, ["ls", "--cache-root", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "does not exist" in result.output


# -- reader errors -------------------------------------------------------------------------------------------------


def test_reader_refuses_missing_and_incomplete_caches(tmp_path, tiny_cache):
    with pytest.raises(FmcacheError, match="no cache at"):
        CacheReader(tmp_path / "nope")
    with pytest.raises(FmcacheError, match=r"has no manifest\.json"):
        CacheReader(tmp_path)

    partial = copy_cache(tiny_cache, tmp_path / "partial")
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["status"], manifest["shards"] = "partial", manifest["shards"][:2]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    (partial / "shard-00002.h5").unlink()
    with pytest.raises(FmcacheError, match=r"incomplete \(2 of 3 shards\); rerun"):
        CacheReader(partial)
    assert len(CacheReader(partial, allow_partial=True).ids("train")) < 28

    lost = copy_cache(tiny_cache, tmp_path / "lost")
    (lost / "shard-00001.h5").unlink()
    with pytest.raises(FmcacheError, match=r"shard-00001\.h5 is damaged \(missing\); run `fmcache verify --repair"):
        CacheReader(lost)

    broken = copy_cache(tiny_cache, tmp_path / "broken")
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(FmcacheError, match="not valid JSON"):
        CacheReader(broken)


def test_reader_errors_name_the_valid_choices(tiny_cache, resnet_cache):
    reader = CacheReader(tiny_cache)
    for layer in (3, 0, "abc"):
        with pytest.raises(FmcacheError, match="layer"):
            reader.pooled("train", layer)
    with pytest.raises(FmcacheError, match=r"layers 1\.\.2; layer 3 does not exist"):
        reader.tokens("train", 3)
    with pytest.raises(FmcacheError, match="unknown split 'dev'"):
        reader.pooled("dev")
    with pytest.raises(FmcacheError, match="no per-layer form"):
        reader.pooled_all_layers("train", "paper")

    resnet = CacheReader(resnet_cache)
    assert resnet.num_layers == 5 and resnet.pools == ["mean", "paper"] and resnet.token_layers == []
    with pytest.raises(FmcacheError, match="no 'cls' pooled features; available: mean, paper"):
        resnet.pooled("train", "last", "cls")
    with pytest.raises(FmcacheError, match="holds tokens for layers none"):
        resnet.tokens("train", "last")
    # stages of different widths are stored zero-padded and read back at their true width
    dims = resnet.layer_dims
    assert len(set(dims)) > 1
    for layer, feats in enumerate(resnet.pooled_all_layers("val", "mean"), start=1):
        assert feats.shape == (3, dims[layer - 1])
        np.testing.assert_array_equal(feats, resnet.pooled("val", layer, "mean"))
    np.testing.assert_array_equal(resnet.pooled("val", kind="paper"), resnet.pooled("val", "last", "mean"))


def test_empty_split_is_a_clear_error(tmp_path):
    rng = np.random.RandomState(0)
    rows = []
    for i in range(6):
        write_image(tmp_path / "data" / "images" / f"{i}.png", rng)
        rows.append([f"images/{i}.png", ("a", "b")[i % 2], ("train", "test")[i % 2]])
    write_csv(tmp_path / "data" / "labels.csv", ("path", "label", "split"), rows)
    kw = spec_kwargs(tmp_path / "data", tmp_path / "cache", tokens="last", allow_empty_split=True)
    kw.update(dataset="csv")
    reader = CacheReader(run_extract(ExtractSpec(**kw), progress=False, log=quiet))
    assert len(reader.ids("train")) == 3
    for read in (reader.ids, reader.pooled, lambda s: reader.tokens(s, "last")):
        with pytest.raises(FmcacheError, match=r"split 'val' of cache .* is empty"):
            read("val")


def test_align_matches_ids_across_models(tiny_cache, resnet_cache, tmp_path):
    a, b = CacheReader(tiny_cache), CacheReader(resnet_cache)
    for split in SPLITS:
        pos_a, pos_b = align(a, b, split)
        assert len(pos_a) == len(pos_b) == 3
        np.testing.assert_array_equal(a.ids(split)[pos_a], b.ids(split)[pos_b])
        np.testing.assert_array_equal(a.labels(split)[pos_a], b.labels(split)[pos_b])
        # the aligned rows index the pooled arrays directly
        assert a.pooled(split)[pos_a].shape == (3, 384) and b.pooled(split, kind="mean")[pos_b].shape[0] == 3

    other = copy_cache(resnet_cache, tmp_path)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["dataset"]["fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FmcacheError, match="different datasets"):
        align(a, CacheReader(other), "train")


def test_a_shard_whose_images_were_all_skipped_reads_as_empty(tmp_path):
    root = make_aptos(tmp_path / "data", n=24)
    kw = spec_kwargs(root, tmp_path / "cache", tokens="last", on_bad_image="skip")
    index = load_dataset("aptos2019", root)
    for i in range(8, 16):  # all of shard 1
        index.paths[i].write_bytes(b"junk")
    reader = CacheReader(run_extract(ExtractSpec(**kw), progress=False, log=quiet))
    assert [s["n"] for s in reader.manifest["shards"]] == [8, 0, 8]
    assert len(reader.manifest["skipped"]) == 8
    ids = np.concatenate([reader.ids(s) for s in SPLITS])
    np.testing.assert_array_equal(np.sort(ids), [*range(8), *range(16, 24)])
    train = reader.tokens("train", "last")
    assert len(train) == len(reader.ids("train")) and train[0][0].shape == (T_TOKENS, 384)
