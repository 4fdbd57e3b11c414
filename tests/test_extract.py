"""Stage one: `fmcache extract` writes a keyed, atomic, resumable, deterministic HDF5 cache."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import fmcache.extract.run as extract_mod
from fmcache.cache.lock import LOCK_NAME, CacheLock
from fmcache.cache.manifest import read_manifest
from fmcache.cache.reader import CacheReader
from fmcache.cli import app
from fmcache.data import load_image
from fmcache.errors import FmcacheError
from fmcache.extract.plan import plan
from fmcache.extract.run import run_extract
from fmcache.extract.spec import ExtractSpec
from fmcache.models import create_foundation
from tests.conftest import TINY_MODEL, TINY_OVERRIDES, TINY_SIZE, one_thread, quiet, spec_kwargs
from tests.fixtures_data import make_aptos

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")


# -- helpers -------------------------------------------------------------------------------------------------------


def spec(data_root: Path, cache_root: Path, **kw) -> ExtractSpec:
    return ExtractSpec(**spec_kwargs(data_root, cache_root, **kw))


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.h5"))


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".tmp-" in p.name)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by its full name."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_arrays(a: Path, b: Path) -> None:
    """Both caches hold the same shard files with equal arrays (bit for bit) in every dataset."""
    names_a, names_b = [p.name for p in shard_files(a)], [p.name for p in shard_files(b)]
    assert names_a == names_b and names_a
    for name in names_a:
        da, db = datasets(a / name), datasets(b / name)
        assert sorted(da) == sorted(db), name
        for key in da:
            assert da[key].dtype == db[key].dtype, (name, key)
            assert np.array_equal(da[key], db[key], equal_nan=True), f"{name}:{key} differs"


def assert_manifest_lists_only_complete_shards(folder: Path) -> dict:
    """Every shard the manifest lists is a finished file: it opens, its rows match the entry and the checksum."""
    manifest = read_manifest(folder)
    assert manifest is not None
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        assert path.is_file(), f"manifest lists {entry['file']}, which does not exist"
        with h5py.File(path, "r") as fh:
            assert fh.attrs["key"] == manifest["key"]
            assert int(fh.attrs["n"]) == entry["n"] == fh["ids"].shape[0] == fh["pooled/cls"].shape[0]
        assert sha256(path) == entry["sha256"]
    return manifest


def write_config(path: Path, data_root: Path, **kw) -> Path:
    """A YAML config with the same values as :func:`spec` (for CLI and torchrun runs)."""
    values = spec_kwargs(data_root, Path("unused"), **kw)
    values.pop("cache_root")
    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    path.write_text(yaml.safe_dump(values))
    return path


def subprocess_env() -> dict:
    # one intra-op thread like torchrun's workers; the in-process references run under one_thread() too
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, aptos_root) -> Path:
    """An uninterrupted single-process cache (random init, last-layer tokens) to compare other runs with."""
    root = tmp_path_factory.mktemp("reference")
    with one_thread():
        return run_extract(spec(aptos_root, root, tokens="last"), progress=False, log=quiet)


# -- 1. the cache equals the wrapper's output ----------------------------------------------------------------------


def test_cached_features_equal_the_foundation_wrapper(tiny_cache, tiny_weights, aptos_root):
    reader = CacheReader(tiny_cache)
    extractor = plan(spec(aptos_root, tiny_cache.parents[2], weights=tiny_weights, tokens="1,2", shard_size=16))
    assert extractor.folder == tiny_cache
    model = create_foundation(TINY_MODEL, weights=tiny_weights, img_size=TINY_SIZE, arch_overrides=TINY_OVERRIDES)
    assert reader.manifest["weights"]["source"] == "file"
    for split in SPLITS:
        ids = reader.ids(split)
        images = torch.stack([extractor.transform(load_image(extractor.index.paths[i])) for i in ids])
        with torch.no_grad():
            out = model(images)
        tol = {"rtol": 2e-3, "atol": 2e-3}  # fp16 storage
        np.testing.assert_allclose(reader.pooled(split, kind="paper"), out.pooled.numpy(), **tol)
        cls_all, mean_all = reader.pooled_all_layers(split, "cls"), reader.pooled_all_layers(split, "mean")
        for layer in (1, 2):
            want_cls, want_mean = out.pooled_cls[layer - 1].numpy(), out.pooled_mean[layer - 1].numpy()
            np.testing.assert_allclose(reader.pooled(split, layer, "cls"), want_cls, **tol)
            np.testing.assert_allclose(reader.pooled(split, layer, "mean"), want_mean, **tol)
            np.testing.assert_allclose(cls_all[layer - 1], want_cls, **tol)
            np.testing.assert_allclose(mean_all[layer - 1], want_mean, **tol)
            tokens = reader.tokens(split, layer)
            got = torch.stack([tokens[i][0] for i in range(len(tokens))]).numpy()
            assert got.shape == tuple(out.tokens[layer - 1].shape) == (len(ids), 1 + (TINY_SIZE // 14) ** 2, 384)
            np.testing.assert_allclose(got, out.tokens[layer - 1].numpy(), **tol)


def test_fp32_cache_matches_the_wrapper_closely(tmp_path, aptos_root, tiny_weights):
    folder = run_extract(
        spec(aptos_root, tmp_path, weights=tiny_weights, dtype="fp32", limit=3, tokens="last"),
        progress=False,
        log=quiet,
    )
    with h5py.File(shard_files(folder)[0], "r") as fh:
        assert fh["pooled/cls"].dtype == np.float32 and fh["tokens/layer_02"].dtype == np.float32
    reader = CacheReader(folder)
    extractor = plan(spec(aptos_root, tmp_path, weights=tiny_weights, dtype="fp32", limit=3, tokens="last"))
    model = create_foundation(TINY_MODEL, weights=tiny_weights, img_size=TINY_SIZE, arch_overrides=TINY_OVERRIDES)
    ids = reader.ids("train")
    assert list(ids) == list(extractor.index.indices("train")[:3])
    images = torch.stack([extractor.transform(load_image(extractor.index.paths[i])) for i in ids])
    with torch.no_grad():
        out = model(images)
    np.testing.assert_allclose(reader.pooled("train", 2, "cls"), out.pooled_cls[1].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reader.pooled("train", 1, "mean"), out.pooled_mean[0].numpy(), rtol=1e-5, atol=1e-5)


def test_random_init_is_reproducible_across_runs(tmp_path, aptos_root, reference):
    """--random-init is seeded, so a resumed or multi-process run rebuilds the same random model."""
    with one_thread():
        again = run_extract(spec(aptos_root, tmp_path, tokens="last", limit=2), progress=False, log=quiet)
    ref, new = CacheReader(reference), CacheReader(again)
    assert new.manifest["inputs"]["model"]["weights"] == {"source": "random", "seed": 0}
    ids_ref = ref.ids("val")
    rows = np.flatnonzero(np.isin(ids_ref, new.ids("val")))
    # other batches (limit) may move a bit; another random init would differ completely
    np.testing.assert_allclose(new.pooled("val", 2, "cls"), ref.pooled("val", 2, "cls")[rows], rtol=2e-3, atol=2e-3)


# -- 2. crash and resume -------------------------------------------------------------------------------------------

# Runs the real CLI with each shard append slowed down, so that a kill reliably lands in the middle of a shard.
SLOW_CLI = """
import time
import fmcache.cache.shards as shards
_append = shards.ShardWriter.append
def append(self, arrays):
    _append(self, arrays)
    time.sleep(0.3)
shards.ShardWriter.append = append
from fmcache.cli import main
main()
"""


def _cache_folder(cache_root: Path) -> Path | None:
    found = list(cache_root.glob("*/*/*/"))
    return found[0] if found else None


def _run_and_kill(args: list[str], cache_root: Path, ready, while_running=None) -> tuple[int, Path]:
    """Run the slowed CLI; once ``ready(folder, manifest)`` holds, call ``while_running`` and SIGKILL it.

    Every time it looks, it checks that the manifest lists only complete shard files.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *args],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"extract ended before the kill: {proc.communicate()}"
            assert time.monotonic() < deadline, "the run did not reach the kill point in time"
            folder = _cache_folder(cache_root)
            if folder is not None and (folder / "manifest.json").is_file():
                manifest = assert_manifest_lists_only_complete_shards(folder)
                if ready(folder, manifest, proc.pid):
                    break
            time.sleep(0.02)
        if while_running is not None:
            while_running()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()  # reaped: a zombie would still look alive to the stale-lock check
    assert proc.returncode == -signal.SIGKILL
    return proc.pid, folder


def _lock_pid(folder: Path) -> int | None:
    try:
        return json.loads((folder / LOCK_NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_cache(tmp_path, aptos_root, reference):
    config = write_config(tmp_path / "extract.yaml", aptos_root, tokens="last")
    cache_root = tmp_path / "cache"
    args = ["extract", "--config", str(config), "--cache-root", str(cache_root), "--quiet"]

    def second_writer_is_refused():
        with pytest.raises(FmcacheError, match="being written"):
            run_extract(spec(aptos_root, cache_root, tokens="last"), progress=False, log=quiet)

    # kill 1: in the middle of a shard, after at least one shard was finished
    pid, folder = _run_and_kill(
        args, cache_root, lambda f, m, pid: bool(m["shards"]) and bool(temp_files(f)), second_writer_is_refused
    )
    manifest = assert_manifest_lists_only_complete_shards(folder)
    assert manifest["status"] == "partial" and len(manifest["shards"]) < manifest["num_shards"] == 5
    assert temp_files(folder), "the kill should have left an orphan temporary shard"
    held = json.loads((folder / LOCK_NAME).read_text())
    assert held["pid"] == pid and held["host"] == socket.gethostname() and held["started"]
    with pytest.raises(FmcacheError, match="incomplete"):
        CacheReader(folder)

    # kill 2: a resumed run that took over the stale lock and finished one more shard
    done_before = len(manifest["shards"])
    pid2, _ = _run_and_kill(
        args,
        cache_root,
        lambda f, m, pid: _lock_pid(f) == pid and len(m["shards"]) > done_before and bool(temp_files(f)),
    )
    manifest = assert_manifest_lists_only_complete_shards(folder)
    assert done_before < len(manifest["shards"]) < 5

    done = subprocess.run(
        [sys.executable, "cli.py", *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(folder)
    assert f"stale lock from dead pid {pid2}" in done.stderr
    assert "unfinished shard file" in done.stderr
    assert not temp_files(folder) and not (folder / LOCK_NAME).exists()
    final = assert_manifest_lists_only_complete_shards(folder)
    assert final["status"] == "complete" and len(final["shards"]) == 5
    assert final["timings"]["images"] == 40 and all(s["seconds"] > 0 for s in final["shards"])

    # the resumed cache equals an uninterrupted run: every array bit for bit, and in fact every shard byte
    assert final["key"] == read_manifest(reference)["key"]
    assert_same_arrays(folder, reference)
    for path in shard_files(reference):
        assert sha256(path) == sha256(folder / path.name), f"{path.name} is not byte-identical"
    assert [s["sha256"] for s in final["shards"]] == [s["sha256"] for s in read_manifest(reference)["shards"]]


def test_resume_skips_finished_shards_and_removes_orphans(tmp_path, aptos_root, monkeypatch):
    """In-process version of the crash: a run fails in shard 2; the rerun only computes the missing shards."""
    real = extract_mod.Extractor._extract_shard

    def crash_on_third(self, shard, *args):
        if shard == 2:
            (self.folder / ".shard-00002.h5.tmp-999999").write_bytes(b"half a shard")
            (self.folder / ".manifest.json.tmp-999999").write_text("{")
            raise KeyboardInterrupt
        return real(self, shard, *args)

    monkeypatch.setattr(extract_mod.Extractor, "_extract_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_extract(spec(aptos_root, tmp_path), progress=False, log=quiet)
    monkeypatch.setattr(extract_mod.Extractor, "_extract_shard", real)
    extractor = plan(spec(aptos_root, tmp_path))
    assert [p.name for p in shard_files(extractor.folder)] == ["shard-00000.h5", "shard-00001.h5"]
    assert not (extractor.folder / LOCK_NAME).exists(), "the lock is released on an error"
    before = {p.name: p.stat().st_mtime_ns for p in shard_files(extractor.folder)}
    # as if killed between renaming shard 1 into place and rewriting the manifest
    manifest = read_manifest(extractor.folder)
    manifest["shards"] = manifest["shards"][:1]
    (extractor.folder / "manifest.json").write_text(json.dumps(manifest))

    computed = []
    monkeypatch.setattr(
        extract_mod.Extractor, "_extract_shard", lambda self, shard, *a: computed.append(shard) or real(self, shard, *a)
    )
    messages: list[str] = []
    run_extract(spec(aptos_root, tmp_path), progress=False, log=messages.append)
    assert computed == [2, 3, 4]
    assert any("removed 2 unfinished" in m for m in messages)
    assert {p.name: p.stat().st_mtime_ns for p in shard_files(extractor.folder)[:2]} == before
    assert not temp_files(extractor.folder)
    final = assert_manifest_lists_only_complete_shards(extractor.folder)
    assert final["status"] == "complete" and [s["index"] for s in final["shards"]] == [0, 1, 2, 3, 4]


# -- 3. lock -------------------------------------------------------------------------------------------------------


def test_second_writer_is_refused(tmp_path, aptos_root):
    extractor = plan(spec(aptos_root, tmp_path, limit=1))
    extractor.folder.mkdir(parents=True)
    with CacheLock(extractor.folder):
        with pytest.raises(FmcacheError, match="being written by pid") as err:
            run_extract(spec(aptos_root, tmp_path, limit=1), progress=False, log=quiet)
        assert (extractor.folder / LOCK_NAME).exists(), "a refused writer must not free the holder's lock"
    assert str(os.getpid()) in str(err.value) and LOCK_NAME in str(err.value)
    assert not shard_files(extractor.folder)


def test_stale_lock_is_reported_and_taken_over(tmp_path, aptos_root):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    extractor = plan(spec(aptos_root, tmp_path, limit=1))
    extractor.folder.mkdir(parents=True)
    record = {"pid": dead.pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00"}
    (extractor.folder / LOCK_NAME).write_text(json.dumps(record))
    messages: list[str] = []
    folder = run_extract(spec(aptos_root, tmp_path, limit=1), progress=False, log=messages.append)
    assert any(f"stale lock from dead pid {dead.pid}" in m for m in messages)
    assert CacheReader(folder).manifest["status"] == "complete"
    assert not (folder / LOCK_NAME).exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path, aptos_root):
    extractor = plan(spec(aptos_root, tmp_path, limit=1))
    extractor.folder.mkdir(parents=True)
    record = {"pid": 1, "host": "some-other-host", "started": "2024-01-01T00:00:00"}
    (extractor.folder / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(FmcacheError, match="being written by pid 1 on some-other-host"):
        run_extract(spec(aptos_root, tmp_path, limit=1), progress=False, log=quiet)


# -- 4. key --------------------------------------------------------------------------------------------------------


def test_key_changes_with_every_input_that_changes_the_numbers(tmp_path, tiny_weights):
    data = make_aptos(tmp_path / "data", n=20)
    other_weights = tmp_path / "other.pt"
    state = torch.load(tiny_weights, weights_only=True)
    state["norm.weight"] = state["norm.weight"] + 1
    torch.save(state, other_weights)

    def key(**kw) -> str:
        return plan(spec(data, tmp_path / "cache", **kw)).key

    base = key()
    assert key() == base, "the same inputs give the same key"
    # options that do not change the numbers or the layout leave the key alone
    assert key(workers=1) == base
    assert plan(spec(data, tmp_path / "elsewhere")).key == base
    variants = {
        "img_size": key(img_size=70),
        "resize": key(resize=80),
        "interpolation": key(interpolation="bicubic"),
        "norm": key(norm="model"),
        "weights file": key(weights=tiny_weights),
        "other weights file": key(weights=other_weights),
        "tokens last": key(tokens="last"),
        "tokens 1": key(tokens="1"),
        "dtype": key(dtype="fp32"),
        "limit": key(limit=5),
        "shard size": key(shard_size=16),
        "model": plan(spec(data, tmp_path / "cache", model="resnet50", img_size=64, arch_overrides={})).key,
        "arch overrides": key(arch_overrides={"depth": 1}),
    }
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants
    # the folder is cache/<dataset>/<model>/<key12>
    extractor = plan(spec(data, tmp_path / "cache"))
    assert extractor.folder == tmp_path / "cache" / "aptos2019" / TINY_MODEL / base[:12]

    # a copy of the weights file at another path is the same weights
    copy = tmp_path / "copy.pt"
    shutil.copy(tiny_weights, copy)
    assert key(weights=copy) == variants["weights file"]

    # touching or rewriting one image changes the dataset fingerprint
    image = extractor.index.paths[3]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = key()
    assert touched != base
    image.write_bytes(image.read_bytes() + b"\0")
    assert key() not in (base, touched)
    # so does a relabelled CSV (the cache stores labels)
    before = key()
    csv = data / "train.csv"
    lines = csv.read_text().splitlines()
    first = lines[1].split(",")
    lines[1] = f"{first[0]},{(int(first[1]) + 1) % 5}"
    csv.write_text("\n".join(lines) + "\n")
    assert key() != before


# -- 5. torchrun ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_gives_the_same_cache(tmp_path, aptos_root, reference):
    config = write_config(tmp_path / "extract.yaml", aptos_root, tokens="last")
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "fmcache", "extract"]
    cmd += ["--config", str(config), "--cache-root", str(tmp_path / "cache"), "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = _cache_folder(tmp_path / "cache")
    manifest = assert_manifest_lists_only_complete_shards(folder)
    assert manifest["status"] == "complete" and len(manifest["shards"]) == 5
    # rank 0 gathered every rank's shard timings into the manifest
    assert all(s["seconds"] > 0 for s in manifest["shards"])
    assert manifest["timings"]["images"] == 40
    assert not temp_files(folder) and not (folder / LOCK_NAME).exists()
    assert_same_arrays(folder, reference)
    for path in shard_files(reference):
        assert sha256(path) == sha256(folder / path.name), f"{path.name} is not byte-identical"


# -- 6. bad images -------------------------------------------------------------------------------------------------


@pytest.fixture
def corrupt_aptos(tmp_path, aptos_root) -> tuple[Path, int, Path]:
    """A copy of the APTOS fixture with garbage in the image of global sample 10 (shard 1 at shard size 8)."""
    root = tmp_path / "aptos"
    shutil.copytree(aptos_root, root)
    index = plan(spec(root, tmp_path / "unused")).index
    bad = index.paths[10]
    bad.write_bytes(b"this is not a PNG at all" * 10)
    return root, 10, bad


def test_corrupt_image_is_a_clear_error_and_no_shard_holds_it(tmp_path, corrupt_aptos):
    root, bad_id, bad = corrupt_aptos
    with pytest.raises(FmcacheError) as err:
        run_extract(spec(root, tmp_path / "cache"), progress=False, log=quiet)
    message = str(err.value)
    assert str(bad) in message and "--on-bad-image skip" in message and "\n" not in message
    folder = plan(spec(root, tmp_path / "cache")).folder
    assert [p.name for p in shard_files(folder)] == ["shard-00000.h5"]
    assert not temp_files(folder) and not (folder / LOCK_NAME).exists()
    for path in shard_files(folder):
        with h5py.File(path, "r") as fh:
            assert bad_id not in fh["ids"][...]
    assert read_manifest(folder)["status"] == "partial"

    # the CLI: exit code 2 and one line naming the file, no traceback
    config = write_config(tmp_path / "extract.yaml", root)
    result = CliRunner().invoke(
        app, ["extract", "--config", str(config), "--cache-root", str(tmp_path / "cache"), "--quiet"]
    )
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and bad.name in lines[0]
    assert "Traceback" not in result.output


def test_skip_policy_leaves_the_image_out_and_lists_it(tmp_path, corrupt_aptos):
    root, bad_id, bad = corrupt_aptos
    folder = run_extract(spec(root, tmp_path / "cache", on_bad_image="skip"), progress=False, log=quiet)
    reader = CacheReader(folder)
    all_ids = np.concatenate([reader.ids(s) for s in SPLITS])
    assert bad_id not in all_ids and len(all_ids) == 39
    skipped = reader.manifest["skipped"]
    assert len(skipped) == 1 and skipped[0]["id"] == bad_id and skipped[0]["path"] == str(bad)
    assert "cannot read image" in skipped[0]["reason"]
    assert reader.manifest["timings"]["images"] == 39
    result = CliRunner().invoke(app, ["info", str(folder)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and bad.name in result.output


# -- 7. unwritable cache root and full disk ------------------------------------------------------------------------


def test_unwritable_cache_root_is_a_clear_error(tmp_path, aptos_root):
    root = tmp_path / "readonly"
    root.mkdir()
    root.chmod(0o500)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (see the simulated variant)")
        with pytest.raises(FmcacheError, match="permission denied"):
            run_extract(spec(aptos_root, root, limit=1), progress=False, log=quiet)
        assert not list(root.rglob("*.h5")) and not list(root.rglob("manifest.json"))
    finally:
        root.chmod(0o700)


def test_unwritable_cache_root_simulated(tmp_path, aptos_root, monkeypatch):
    """The same check when running as root: the probe write fails with EACCES."""
    real = Path.write_bytes

    def denied(self, data):
        if self.name.startswith(".write-test"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(FmcacheError, match="permission denied; pass a writable --cache-root"):
        run_extract(spec(aptos_root, tmp_path, limit=1), progress=False, log=quiet)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.parametrize("fail_at_write", [1, 21])
def test_full_disk_is_a_clear_error_and_nothing_looks_valid(tmp_path, aptos_root, monkeypatch, fail_at_write):
    """ENOSPC at the first array write, or in the middle of shard 1 (after shard 0 was finished)."""
    writes = {"n": 0}
    real = h5py.Dataset.__setitem__

    def enospc(self, key, value):
        writes["n"] += 1
        if writes["n"] >= fail_at_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", enospc)
    with pytest.raises(FmcacheError, match="no space left on device"):
        run_extract(spec(aptos_root, tmp_path, tokens="last"), progress=False, log=quiet)
    folder = plan(spec(aptos_root, tmp_path, tokens="last")).folder
    # 9 datasets per batch (ids, split, labels, 2 fingerprints, 4 feature arrays) and 2 batches per shard: write 21
    # falls in shard 1's first batch
    if fail_at_write == 1:  # nothing finished: the run leaves no folder at all
        assert not folder.exists()
    else:
        assert [p.name for p in shard_files(folder)] == ["shard-00000.h5"]
        assert not temp_files(folder) and not (folder / LOCK_NAME).exists()
        manifest = assert_manifest_lists_only_complete_shards(folder)
        assert manifest["status"] == "partial"
        with pytest.raises(FmcacheError, match="incomplete"):
            CacheReader(folder)
    # once there is space again, the same command finishes the cache
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    run_extract(spec(aptos_root, tmp_path, tokens="last"), progress=False, log=quiet)
    assert CacheReader(folder).manifest["status"] == "complete"


# -- 8. limit, instant rerun, config -------------------------------------------------------------------------------


def test_limit_caches_the_first_n_of_each_split(tmp_path, aptos_root):
    assert not torch.are_deterministic_algorithms_enabled()
    folder = run_extract(spec(aptos_root, tmp_path, limit=2), progress=False, log=quiet)
    assert not torch.are_deterministic_algorithms_enabled(), "the caller's setting is restored"
    reader = CacheReader(folder)
    index = plan(spec(aptos_root, tmp_path, limit=2)).index
    for split in SPLITS:
        np.testing.assert_array_equal(reader.ids(split), index.indices(split)[:2])
    assert reader.manifest["dataset"]["split_counts"] == {"train": 2, "val": 2, "test": 2}
    assert reader.manifest["inputs"]["dataset"]["limit"] == 2


def test_rerun_of_a_complete_cache_returns_at_once(tiny_cache, tiny_weights, aptos_root, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_cache.iterdir()}

    def no_model(*args, **kwargs):
        raise AssertionError("a complete cache must not build the model")

    monkeypatch.setattr(extract_mod, "create_foundation", no_model)
    messages: list[str] = []
    again = spec(aptos_root, tiny_cache.parents[2], weights=tiny_weights, tokens="1,2", shard_size=16)
    start = time.perf_counter()
    assert run_extract(again, progress=False, log=messages.append) == tiny_cache
    assert time.perf_counter() - start < 5
    assert any("already complete" in m for m in messages)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_cache.iterdir()} == before


def test_config_file_with_flag_override(tmp_path, aptos_root):
    config = write_config(tmp_path / "extract.yaml", aptos_root, shard_size=16, tokens="none", limit=2)
    args = ["extract", "--config", str(config), "--cache-root", str(tmp_path / "cache"), "--quiet"]
    result = CliRunner().invoke(app, [*args, "--shard-size", "4", "--tokens", "last"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip().splitlines()[-1])
    manifest = CacheReader(folder).manifest
    assert manifest["shard_size"] == 4 and manifest["num_shards"] == 2
    assert manifest["model"]["token_layers"] == [2]
    assert manifest["inputs"]["dataset"]["limit"] == 2 and manifest["weights"]["source"] == "random"


def test_bad_options_are_clear_errors(tmp_path, aptos_root):
    for kw, pattern in [
        ({"dtype": "bf8"}, "unknown --dtype"),
        ({"norm": "imagenet"}, "unknown --norm"),
        ({"tokens": "0"}, "layer numbers start at 1"),
        ({"on_bad_image": "ignore"}, "unknown --on-bad-image"),
        ({"limit": 0}, "--limit must be an integer >= 1"),
        ({"weights": tmp_path / "missing.pt", "random_init": False}, "does not exist"),
    ]:
        with pytest.raises(FmcacheError, match=pattern):
            plan(spec(aptos_root, tmp_path, **kw))
    with pytest.raises(FmcacheError, match="asks for layer 3 but the model has 2 layers"):
        run_extract(spec(aptos_root, tmp_path, tokens="3", limit=1), progress=False, log=quiet)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--compression", "foo", "unknown --compression"),
        ("--device", "tpu", "unknown --device"),
        ("--workers", "-1", "--workers must be an integer >= 0"),
        ("--img-size", "0", "--img-size must be an integer >= 1"),
        ("--dtype", "bf16", "unknown --dtype"),
        ("--tokens", "x", "bad --tokens"),
    ],
)
def test_bad_extract_values_are_one_line_and_leave_nothing(tmp_path, aptos_root, flag, value, message):
    from typer.testing import CliRunner

    from fmcache.cli import app

    args = ["extract", "--dataset", "aptos2019", "--data-root", str(aptos_root), "--model", "dinov2_vits14"]
    args += ["--random-init", "--cache-root", str(tmp_path / "cache"), flag, value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("manifest.json"))


def test_failed_run_leaves_no_empty_cache_folder(tmp_path, aptos_root):
    spec = ExtractSpec(**spec_kwargs(aptos_root, tmp_path / "cache", tokens="9"))  # the tiny model has 2 layers
    with pytest.raises(FmcacheError, match="has 2 layers"):
        run_extract(spec, progress=False, log=quiet)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not (tmp_path / "cache" / "aptos2019").exists()


def test_yaml_values_of_the_wrong_type_are_clear_errors(tmp_path, aptos_root):
    from typer.testing import CliRunner

    from fmcache.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: aptos2019\ndata_root: {aptos_root}\nmodel: dinov2_vits14\nimg_size: abc\n")
    result = CliRunner().invoke(app, ["extract", "--config", str(config), "--random-init"])
    assert result.exit_code == 2 and "--img-size must be an integer" in result.output
