"""Cached augmented views (issue 13): extract --views K, the views/ group, reader, probe and knn."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fmcache.extract.run as extract_mod
from fmcache.cache.info import format_info
from fmcache.cache.key import SCHEMA_VERSION
from fmcache.cache.manifest import read_manifest
from fmcache.cache.reader import CacheReader
from fmcache.cache.verify import verify_cache
from fmcache.cli import app
from fmcache.data import load_image
from fmcache.data.transforms import draw_view, train_augmentation, view_seed
from fmcache.errors import FmcacheError
from fmcache.extract.plan import plan
from fmcache.extract.run import run_extract
from fmcache.extract.spec import ExtractSpec
from fmcache.models import create_foundation
from tests.conftest import TINY_MODEL, TINY_OVERRIDES, TINY_SIZE, one_thread, quiet, spec_kwargs
from tests.test_extract import (
    REPO,
    _run_and_kill,
    assert_manifest_lists_only_complete_shards,
    assert_same_arrays,
    sha256,
    shard_files,
    subprocess_env,
    temp_files,
    write_config,
)

K = 2


def spec(data_root: Path, cache_root: Path, **kw) -> ExtractSpec:
    return ExtractSpec(**spec_kwargs(data_root, cache_root, **kw))


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory, aptos_root, tiny_weights) -> Path:
    """The APTOS fixture with K=2 views per train image, last-layer tokens (tiny dinov2 from ``tiny_weights``)."""
    root = tmp_path_factory.mktemp("views_cache")
    with one_thread():
        return run_extract(
            spec(aptos_root, root, weights=tiny_weights, views=K, tokens="last"), progress=False, log=quiet
        )


@pytest.fixture(scope="module")
def plain_cache(tmp_path_factory, aptos_root, tiny_weights) -> Path:
    """The same extraction without views."""
    root = tmp_path_factory.mktemp("plain_cache")
    with one_thread():
        return run_extract(spec(aptos_root, root, weights=tiny_weights, tokens="last"), progress=False, log=quiet)


# -- the seeded view -------------------------------------------------------------------------------------------------


def test_a_view_depends_only_on_sample_view_and_seed(aptos_root):
    from fmcache.data import load_dataset

    image = load_image(load_dataset("aptos2019", aptos_root).paths[0])
    augment = train_augmentation(TINY_SIZE)
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    a = draw_view(augment, image, view_seed(5, 1, 0))
    assert torch.equal(torch.rand(3), before), "drawing a view must not move the global RNG"
    assert torch.equal(a, draw_view(augment, image, view_seed(5, 1, 0)))
    for other in (view_seed(5, 0, 0), view_seed(6, 1, 0), view_seed(5, 1, 1)):
        assert not torch.equal(a, draw_view(augment, image, other))


# -- the views/ group ------------------------------------------------------------------------------------------------


def test_views_hold_the_model_on_seeded_augmented_train_images(views_cache, tiny_weights, aptos_root):
    reader = CacheReader(views_cache)
    assert reader.views_k == K and reader.manifest["schema"] == SCHEMA_VERSION == 2
    assert reader.manifest["inputs"]["views"]["k"] == K
    extractor = plan(spec(aptos_root, views_cache.parents[2], weights=tiny_weights, views=K, tokens="last"))
    assert extractor.folder == views_cache
    model = create_foundation(TINY_MODEL, weights=tiny_weights, img_size=TINY_SIZE, arch_overrides=TINY_OVERRIDES)
    ids = reader.ids("train")
    augment = extractor.augment
    images = torch.stack(
        [draw_view(augment, load_image(extractor.index.paths[i]), view_seed(i, v, 0)) for i in ids for v in range(K)]
    )
    with torch.no_grad():
        out = model(images)
    tol = {"rtol": 2e-3, "atol": 2e-3}
    got = reader.views_pooled("last", "cls")
    assert got.shape == (len(ids), K, 384)
    np.testing.assert_allclose(got.reshape(-1, 384), out.pooled_cls[-1].numpy(), **tol)
    np.testing.assert_allclose(reader.views_pooled(1, "mean").reshape(-1, 384), out.pooled_mean[0].numpy(), **tol)
    np.testing.assert_allclose(reader.views_pooled(kind="paper").reshape(-1, 384), out.pooled.numpy(), **tol)
    # views differ from each other and from the center crop
    assert not np.allclose(got[:, 0], got[:, 1]) and not np.allclose(got[:, 0], reader.pooled("train"))
    # only train rows have views; every shard's group lists exactly its train ids
    for path in shard_files(views_cache):
        with h5py.File(path, "r") as fh:
            train = fh["split"][...] == 0
            assert np.array_equal(fh["views/ids"][...], fh["ids"][...][train])
            assert fh["views/tokens/layer_02"].shape == (int(train.sum()), K, 1 + (TINY_SIZE // 14) ** 2, 384)
            assert fh["views/pooled/cls"].shape == (int(train.sum()), K, 2, 384)


def test_center_crops_are_the_same_with_and_without_views(views_cache, plain_cache):
    """Views are forwarded apart from the center batches, so the center-crop arrays do not change at all."""
    for path in shard_files(plain_cache):
        with h5py.File(path, "r") as a, h5py.File(views_cache / path.name, "r") as b:
            assert "views" not in a
            for name in ("ids", "split", "labels", "pooled/cls", "pooled/mean", "pooled/paper", "tokens/layer_02"):
                assert np.array_equal(a[name][...], b[name][...]), name


def test_views_are_part_of_the_key(aptos_root, tmp_path):
    keys = {k: plan(spec(aptos_root, tmp_path, views=k)).key for k in (0, 1, 2)}
    assert len(set(keys.values())) == 3


def test_shard_without_train_rows_still_holds_every_views_dataset(tmp_path, aptos_root):
    # shard size 1: most shards hold a single val or test image and no train row
    folder = run_extract(spec(aptos_root, tmp_path, views=1, shard_size=1, limit=2), progress=False, log=quiet)
    assert not verify_cache(folder).damaged
    empty = 0
    for path in shard_files(folder):
        with h5py.File(path, "r") as fh:
            if not (fh["split"][...] == 0).any():
                empty += 1
                assert fh["views/ids"].shape == (0,) and fh["views/pooled/cls"].shape == (0, 1, 2, 384)
    assert empty == 4
    assert CacheReader(folder).views_pooled().shape == (2, 1, 384)


def test_resume_after_a_crash_is_bit_identical(tmp_path, aptos_root, views_cache, tiny_weights, monkeypatch):
    real = extract_mod.Extractor._extract_shard

    def crash_on_third(self, shard, *args):
        if shard == 2:
            raise KeyboardInterrupt
        return real(self, shard, *args)

    kw = {"weights": tiny_weights, "views": K, "tokens": "last"}
    monkeypatch.setattr(extract_mod.Extractor, "_extract_shard", crash_on_third)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        run_extract(spec(aptos_root, tmp_path, **kw), progress=False, log=quiet)
    monkeypatch.setattr(extract_mod.Extractor, "_extract_shard", real)
    with one_thread():
        folder = run_extract(spec(aptos_root, tmp_path, **kw), progress=False, log=quiet)
    assert_same_arrays(folder, views_cache)
    for path in shard_files(views_cache):
        assert sha256(path) == sha256(folder / path.name), path.name


# -- integrity, info, old caches, bad input ------------------------------------------------------------------------


def test_verify_knows_the_views_datasets(views_cache, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(views_cache, folder)
    with h5py.File(folder / "shard-00000.h5", "a") as fh:
        del fh["views/pooled/mean"]
    with h5py.File(folder / "shard-00001.h5", "a") as fh:
        ids = fh["views/ids"][...]
        del fh["views/ids"]
        fh["views/ids"] = ids[::-1].copy()
    # the manifest sizes no longer match either; check the layout problems directly
    manifest = read_manifest(folder)
    for entry in manifest["shards"]:
        entry.pop("size")
    report = verify_cache(folder, full=False, manifest=manifest)
    problems = {c.file: c.problem for c in report.damaged}
    assert "lacks dataset views/pooled/mean" in problems["shard-00000.h5"]
    assert "views/ids does not list" in problems["shard-00001.h5"]


def test_info_shows_views_and_their_bytes(views_cache, plain_cache):
    text = format_info(views_cache)
    assert f"views      {K} per train image (28 images; val/test: center crop only)" in text
    line = next(t for t in text.splitlines() if t.strip().startswith("views"))
    assert "tokens/layer_02" in line and line.endswith(("KB", "MB"))
    assert "views      none" in format_info(plain_cache)


def test_an_old_schema_1_cache_still_reads(plain_cache, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(plain_cache, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema"] = 1
    manifest["inputs"].pop("views")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    reader = CacheReader(folder)
    assert reader.views_k == 0 and reader.pooled("train").shape == (28, 384)
    with pytest.raises(FmcacheError, match=r"has no augmented views.*--views K"):
        reader.views_pooled()
    assert not verify_cache(folder).damaged


@pytest.mark.parametrize(("value", "message"), [("-1", "--views must be an integer >= 0"), ("abc", "--views must be")])
def test_bad_views_values_are_one_line_and_leave_nothing(tmp_path, aptos_root, value, message):
    args = ["extract", "--dataset", "aptos2019", "--data-root", str(aptos_root), "--model", "dinov2_vits14"]
    args += ["--random-init", "--cache-root", str(tmp_path / "cache"), "--views", value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()


# -- kill -9 and torchrun (slow) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_views_reference(tmp_path_factory, aptos_root) -> Path:
    root = tmp_path_factory.mktemp("views_reference")
    with one_thread():
        return run_extract(spec(aptos_root, root, views=K, tokens="last"), progress=False, log=quiet)


@pytest.mark.slow
def test_kill_9_then_rerun_with_views_gives_the_same_cache(tmp_path, aptos_root, random_views_reference):
    config = write_config(tmp_path / "extract.yaml", aptos_root, tokens="last", views=K)
    cache_root = tmp_path / "cache"
    args = ["extract", "--config", str(config), "--cache-root", str(cache_root), "--quiet"]
    _, folder = _run_and_kill(args, cache_root, lambda f, m, pid: bool(m["shards"]) and bool(temp_files(f)))
    assert read_manifest(folder)["status"] == "partial"
    done = subprocess.run(
        [sys.executable, "cli.py", *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    final = assert_manifest_lists_only_complete_shards(folder)
    assert final["status"] == "complete" and final["key"] == read_manifest(random_views_reference)["key"]
    assert_same_arrays(folder, random_views_reference)
    for path in shard_files(random_views_reference):
        assert sha256(path) == sha256(folder / path.name), f"{path.name} is not byte-identical"


@pytest.mark.slow
def test_torchrun_two_processes_with_views_gives_the_same_cache(tmp_path, aptos_root, random_views_reference):
    config = write_config(tmp_path / "extract.yaml", aptos_root, tokens="last", views=K)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "fmcache", "extract"]
    cmd += ["--config", str(config), "--cache-root", str(tmp_path / "cache"), "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = next((tmp_path / "cache").glob("*/*/*/"))
    assert_same_arrays(folder, random_views_reference)
    for path in shard_files(random_views_reference):
        assert sha256(path) == sha256(folder / path.name), f"{path.name} is not byte-identical"


# -- stage two: probe trains on views, knn ignores them ---------------------------------------------------------------

# z-scored features (fmcache's option): on these tiny random features the raw ones train to a constant val metric
PROBE = {"lrs": [1e-3, 1e-2], "seeds": 2, "epochs": 4, "batch_size": 8, "plots": False, "standardize": True}


def _probe(folder: Path, tmp_path: Path, **kw) -> dict:
    from tests.conftest import probe

    return probe(CacheReader(folder), tmp_path / "results", **PROBE, **kw)


def _numbers(result: dict) -> list:
    return [(r["lr"], r["seed"], r["best_epoch"], r["val"], r["test"]) for r in result["rows"]]


def test_views_off_gives_exactly_the_numbers_of_a_cache_without_views(views_cache, plain_cache, tmp_path):
    plain = _probe(plain_cache, tmp_path / "a")
    off = _probe(views_cache, tmp_path / "b", views="off")
    assert plain["views"] == off["views"] == {"used": False, "k": 0}
    assert _numbers(off) == _numbers(plain)
    curves = [plain["layers"][2]["curves"], off["layers"][2]["curves"]]
    assert all(np.array_equal(curves[0][lr], curves[1][lr]) for lr in curves[0])
    on = _probe(views_cache, tmp_path / "c")  # the default when the cache has views
    assert on["views"] == {"used": True, "k": K} and on["layers"][2]["settings"]["views"] == K
    assert _numbers(on) != _numbers(off)


def test_identical_views_train_exactly_as_the_center_crops():
    """With K copies of the center features, the views path reproduces the plain grid bit for bit."""
    from fmcache.frozen.linear import train_linear_grid

    rng = np.random.default_rng(0)
    x = {s: rng.normal(size=(n, 6)).astype(np.float32) for s, n in (("train", 30), ("val", 10), ("test", 10))}
    y = {s: rng.integers(0, 3, len(v)) for s, v in x.items()}
    kw = {"lrs": [1e-3, 1e-2], "seeds": [0, 3], "num_classes": 3, "metric": "accuracy", "epochs": 3, "batch_size": 7}
    args = (x["train"], y["train"], x["val"], y["val"], x["test"], y["test"])
    plain = train_linear_grid(*args, **kw)
    copies = train_linear_grid(*args, train_views=np.repeat(x["train"][:, None], 3, axis=1), **kw)
    assert plain.per_lr == copies.per_lr
    assert copies.settings["views"] == 3 and plain.settings["views"] == 0
    with pytest.raises(FmcacheError, match="train views must be"):
        train_linear_grid(*args, train_views=np.zeros((29, 3, 6)), **kw)


def test_view_choice_is_seeded_per_head_seed_and_epoch():
    from fmcache.frozen.views import epoch_views

    a = epoch_views(0, 1, 1000, 10)
    assert torch.equal(a, epoch_views(0, 1, 1000, 10)) and int(a.min()) == 0 and int(a.max()) == 9
    assert not torch.equal(a, epoch_views(0, 2, 1000, 10)) and not torch.equal(a, epoch_views(1, 0, 1000, 10))


def test_cli_probe_views_and_knn_note(views_cache, plain_cache, tmp_path):
    args = ["--lrs", "1e-3", "--seeds", "1", "--epochs", "2", "--batch-size", "8", "--no-plots", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, ["probe", str(views_cache), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"one of {K} cached augmented views per sample per epoch" in result.output
    result = CliRunner().invoke(app, ["probe", str(plain_cache), *args, "--views", "on"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "has no augmented views" in result.output and "--views K" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["probe", str(views_cache), *args, "--views", "maybe"])
    assert result.exit_code == 2 and "unknown --views 'maybe'" in result.output
    result = CliRunner().invoke(
        app, ["knn", str(views_cache), "--k", "5", "--no-plots", "--out", str(tmp_path)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "ignores the cache's 2 augmented views" in " ".join(result.output.split())
    saved = json.loads(next(p for p in tmp_path.rglob("result.json") if p.parent.name.startswith("knn-")).read_text())
    assert "center crops" in saved["details"]["views"]


def test_view_tokens_stream_every_view_of_every_train_sample(views_cache, plain_cache):
    reader = CacheReader(views_cache)
    data = reader.view_tokens("last")
    stacked = reader._gather_views("tokens/layer_02")
    assert len(data) == len(reader.ids("train")) * K and stacked.shape[:2] == (len(reader.ids("train")), K)
    for j in (0, 1, 5, len(data) - 1):
        tokens, label, sample = data[j]
        i, v = divmod(j, K)
        assert np.array_equal(tokens.numpy(), stacked[i, v].astype(np.float32))
        assert sample == reader.ids("train")[i] and int(label) == reader.labels("train")[i]
    with pytest.raises(FmcacheError, match="has no augmented views"):
        CacheReader(plain_cache).view_tokens("last")
