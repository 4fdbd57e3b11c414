"""Chunk layout of the shards and the reader's one-layer reads: per-layer pooled chunks, old (256, L, D) shards still
read identically, and ``pooled()`` of one layer equals the old read-everything-then-select path."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fmcache.cache import reader as reader_module
from fmcache.cache.reader import CacheReader
from fmcache.cache.shards import LAYER_CHUNK_BYTES, ShardWriter, chunk_shape
from fmcache.files import atomic_write_json, sha256_file
from fmcache.frozen import features
from fmcache.frozen.features import FeatureSource, standardize_splits, train_stats

N, SHARD, LAYERS, WIDTH, TOKENS = 600, 256, 3, 40, 5
DIMS = [24, 40, 40]  # a narrower first stage, zero-padded to the widest, as hierarchical models store it
KEY = "f" * 64


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    split = rng.integers(0, 3, N).astype(np.int8)  # scattered over every shard, as the seeded shuffles make them
    split[:40] = 1  # and one contiguous run
    cls = rng.standard_normal((N, LAYERS, WIDTH)).astype(np.float16)
    cls[:, 0, DIMS[0] :] = 0
    return {
        "ids": np.arange(N, dtype=np.int64),
        "split": split,
        "labels": rng.integers(0, 4, N).astype(np.int64),
        "pooled/cls": cls,
        "pooled/mean": rng.standard_normal((N, LAYERS, WIDTH)).astype(np.float16),
        "pooled/paper": rng.standard_normal((N, WIDTH)).astype(np.float16),
        "tokens/layer_03": rng.standard_normal((N, TOKENS, WIDTH)).astype(np.float16),
    }


def _write_new(shard: Path, index: int, rows: dict[str, np.ndarray]) -> dict:
    writer = ShardWriter(shard.parent, index, len(rows["ids"]), {"key": KEY, "schema": 2, "shard": index}, None)
    for lo in range(0, len(rows["ids"]), 64):  # batch by batch, as extract appends
        writer.append({k: v[lo : lo + 64] for k, v in rows.items()})
    return writer.commit({})


def _write_old(shard: Path, index: int, rows: dict[str, np.ndarray]) -> dict:
    """A shard as fmcache wrote them before per-layer chunks: (min(n, 256), ...) rows, one sample per token chunk."""
    n = len(rows["ids"])
    with h5py.File(shard, "w", libver="latest") as fh:
        for name, value in rows.items():
            first = 1 if name.startswith("tokens/") else min(n, 256)
            fh.create_dataset(name, data=value, chunks=(first, *value.shape[1:]), fletcher32=True)
        fh.attrs.update({"key": KEY, "schema": 2, "shard": index, "n": n})
    return {"file": shard.name, "n": n, "size": shard.stat().st_size, "sha256": sha256_file(shard)}


def _cache(folder: Path, layout: str) -> Path:
    folder.mkdir(parents=True)
    data, entries = _arrays(), []
    for index, lo in enumerate(range(0, N, SHARD)):
        rows = {k: v[lo : lo + SHARD] for k, v in data.items()}
        write = _write_new if layout == "new" else _write_old
        entries.append({**write(folder / f"shard-{index:05d}.h5", index, rows), "index": index, "seconds": 0.0})
    manifest = {
        "schema": 2, "key": KEY, "status": "complete", "num_shards": len(entries), "shards": entries, "dtype": "fp16",
        "model": {"name": "synthetic", "num_layers": LAYERS, "layer_dims": DIMS, "pools": ["cls", "mean", "paper"],
                  "token_layers": [3], "token_shapes": {"3": [TOKENS, WIDTH]}, "pooled_kind": "cls", "paper_dim": WIDTH},
        "dataset": {"name": "synthetic", "fingerprint": "synthetic", "class_names": list("abcd"), "multilabel": False,
                    "metric": "accuracy"},
    }  # fmt: skip
    atomic_write_json(folder / "manifest.json", manifest)
    return folder


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layout")
    return {layout: _cache(root / layout, layout) for layout in ("new", "old")}


def _old_full_read(folder: Path, name: str, split: str, select: tuple = ()) -> np.ndarray:
    """The reader before this layout: every shard's whole array, masked, concatenated, then selected."""
    code = {"train": 0, "val": 1, "test": 2}[split]
    parts = []
    for path in sorted(folder.glob("shard-*.h5")):
        with h5py.File(path, "r") as fh:
            parts.append(fh[name][...][fh["split"][...] == code])
    return np.concatenate(parts)[(slice(None), *select)]


def test_new_shards_chunk_pooled_datasets_one_layer_at_a_time(caches):
    with h5py.File(caches["new"] / "shard-00000.h5", "r") as fh:
        for kind in ("cls", "mean"):
            assert fh[f"pooled/{kind}"].chunks == (SHARD, 1, WIDTH)
        assert fh["tokens/layer_03"].chunks == (1, TOKENS, WIDTH), "one sample per chunk for shuffled reads"
        assert fh["pooled/paper"].chunks == (SHARD, WIDTH) and fh["labels"].chunks == (SHARD,)
        assert all(fh[name].fletcher32 for name in ("pooled/cls", "tokens/layer_03", "ids"))
    assert CacheReader(caches["new"]).layer_chunked("cls") and not CacheReader(caches["old"]).layer_chunked("cls")
    # at paper shapes a chunk is one layer of a few hundred rows, 512 KiB: ViT-L (1,024-d), ViT-S, ViT-g, fp32
    assert chunk_shape("pooled/cls", (24, 1024), 2, 1024) == (256, 1, 1024)
    for dims, itemsize in (((12, 384), 2), ((40, 1536), 2), ((24, 1024), 4)):
        rows, *_ = chunk = chunk_shape("pooled/mean", dims, itemsize, 4096)
        assert chunk[1:] == (1, dims[1]) and LAYER_CHUNK_BYTES // 2 < rows * dims[1] * itemsize <= LAYER_CHUNK_BYTES
    assert chunk_shape("pooled/cls", (24, 1024), 2, 100) == (100, 1, 1024)  # a small shard: one chunk per layer
    # views: all K views of one layer per chunk (read together); one view per token chunk (read one at a time)
    assert chunk_shape("views/pooled/cls", (10, 24, 1024), 2, 1024) == (25, 10, 1, 1024)
    assert chunk_shape("views/tokens/layer_12", (10, 257, 1024), 2, 1024) == (1, 1, 257, 1024)


@pytest.mark.parametrize("layout", ["new", "old"])
def test_one_layer_reads_equal_the_old_full_read(caches, layout, monkeypatch):
    reader = CacheReader(caches[layout])
    for split in ("train", "val", "test"):
        for layer, dim in enumerate(DIMS, start=1):
            for kind in ("cls", "mean"):
                want = _old_full_read(caches["old"], f"pooled/{kind}", split, (layer - 1, slice(0, dim)))
                got = reader.pooled(split, layer, kind)
                assert got.dtype == np.float32 and got.flags.c_contiguous
                np.testing.assert_array_equal(got, want.astype(np.float32))
        np.testing.assert_array_equal(
            reader.pooled(split, kind="paper"), _old_full_read(caches["old"], "pooled/paper", split)
        )
        np.testing.assert_array_equal(reader.labels(split), _old_full_read(caches["old"], "labels", split))
        stack = reader.pooled_stack(split, "cls")
        np.testing.assert_array_equal(stack, _old_full_read(caches["old"], "pooled/cls", split))
        for layer, feats in enumerate(reader.pooled_all_layers(split, "mean"), start=1):
            np.testing.assert_array_equal(feats, reader.pooled(split, layer, "mean"))
        tokens = _old_full_read(caches["old"], "tokens/layer_03", split)
        np.testing.assert_array_equal(reader._gather("tokens/layer_03", split), tokens)
        # wide rows (token maps) are read run by run straight into the output instead of one masked span
        monkeypatch.setattr(reader_module, "_SPAN_BYTES", 0)
        np.testing.assert_array_equal(reader._gather("tokens/layer_03", split), tokens)
        want = _old_full_read(caches["old"], "pooled/cls", split, (1, slice(0, DIMS[1])))
        np.testing.assert_array_equal(reader.pooled(split, 2, "cls"), want.astype(np.float32))
        monkeypatch.undo()


def test_token_batches_equal_stacked_items(caches):
    dataset = CacheReader(caches["new"]).tokens("val", 3)
    picks = [5, 0, len(dataset) - 1, 17]
    tokens, labels, ids = dataset[picks]  # what a DataLoader with batch_size=None passes for an index list
    items = [dataset[i] for i in picks]
    assert torch.equal(tokens, torch.stack([t for t, _, _ in items])) and tokens.dtype == torch.float32
    assert labels.tolist() == [int(y) for _, y, _ in items] and ids.tolist() == [i for _, _, i in items]
    loader = torch.utils.data.DataLoader(dataset, sampler=[picks, [1, 2]], batch_size=None, num_workers=0)
    assert torch.equal(next(iter(loader))[0], tokens)


def test_feature_source_holds_one_layer_of_a_per_layer_cache(caches):
    new, old = CacheReader(caches["new"]), CacheReader(caches["old"])
    source = FeatureSource(new, [1, 2, 3], ["cls"])
    assert not source.keep
    for layer in (1, 2, 3):
        np.testing.assert_array_equal(
            source.get("train", layer), FeatureSource(old, [1, 2, 3], ["cls"]).get("train", layer)
        )
    assert not source._stacks


def test_blockwise_standardisation_matches_numpy(monkeypatch):
    rng = np.random.default_rng(1)
    train, test = (rng.standard_normal((n, 7)).astype(np.float32) * 3 + 1 for n in (50, 9))
    train[:, 2] = 4.0  # a constant feature stays constant
    x64 = train.astype(np.float64)
    mean, std = x64.mean(axis=0), x64.std(axis=0)
    std[std < 1e-12] = 1.0
    got_mean, got_std = train_stats(train)
    np.testing.assert_array_equal(got_mean, mean)  # one block: bit-identical to numpy
    np.testing.assert_array_equal(got_std, std)
    (tr, _), (te, _) = standardize_splits([(train, None), (test, None)])
    np.testing.assert_array_equal(te, ((test - mean) / std).astype(np.float32))
    monkeypatch.setattr(features, "_BLOCK_ROWS", 8)  # many blocks: the same up to float64 rounding
    blocked_mean, blocked_std = train_stats(train)
    np.testing.assert_allclose(blocked_mean, mean, rtol=1e-13)
    np.testing.assert_allclose(blocked_std, std, rtol=1e-13)
    (tr_blocked, _), _ = standardize_splits([(train, None), (test, None)])
    np.testing.assert_allclose(tr_blocked, tr, rtol=1e-6, atol=1e-6)


def _rchar() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux /proc/self/io to count bytes read")
def test_one_layer_reads_only_that_layers_bytes(tmp_path):
    """8 layers × 2,048 rows × 256-d fp16 (8 MiB): one layer is 1 MiB of it."""
    n, layers, dim = 2048, 8, 256
    values = np.random.default_rng(0).standard_normal((n, layers, dim)).astype(np.float16)
    rows = {"ids": np.arange(n), "split": np.zeros(n, np.int8), "labels": np.zeros(n, np.int64), "pooled/cls": values}
    read = {}
    for layout, write in (("new", _write_new), ("old", _write_old)):
        folder = tmp_path / layout
        folder.mkdir()
        entry = {**write(folder / "shard-00000.h5", 0, rows), "index": 0, "seconds": 0.0}
        manifest = {
            "schema": 2, "key": KEY, "status": "complete", "num_shards": 1, "shards": [entry], "dtype": "fp16",
            "model": {"name": "synthetic", "num_layers": layers, "layer_dims": [dim] * layers, "pools": ["cls"],
                      "token_layers": []},
            "dataset": {"name": "synthetic", "fingerprint": "synthetic", "class_names": ["a"], "multilabel": False},
        }  # fmt: skip
        atomic_write_json(folder / "manifest.json", manifest)
        reader = CacheReader(folder)
        reader.labels("train")  # the index and labels first: only the layer's read is counted
        before = _rchar()
        got = reader.pooled("train", 5, "cls")
        read[layout] = _rchar() - before
        np.testing.assert_array_equal(got, values[:, 4].astype(np.float32))
    layer_bytes = n * dim * 2
    assert read["new"] < 1.25 * layer_bytes, read  # the layer's chunks and a little metadata
    assert read["old"] >= layers * layer_bytes, read  # chunks of every layer
