"""Cache integrity: damaged shards are found, named and repaired; problems surface as one line when they happen."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

import fmcache.extract.run as extract_mod
from fmcache.cache.lock import LOCK_NAME, CacheLock
from fmcache.cache.manifest import MANIFEST, read_manifest
from fmcache.cache.reader import CacheReader
from fmcache.cache.verify import DAMAGED_DIR, verify_cache
from fmcache.cli import app
from fmcache.errors import FmcacheError
from fmcache.extract.plan import plan
from fmcache.extract.run import run_extract
from fmcache.extract.spec import ExtractSpec
from tests.conftest import one_thread, quiet, spec_kwargs
from tests.fixtures_data import make_aptos, make_csv

REPO = Path(__file__).resolve().parents[1]
ESC = "\x1b"


def spec(data_root: Path, cache_root: Path, **kw) -> ExtractSpec:
    return ExtractSpec(**spec_kwargs(data_root, cache_root, **kw))


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.glob("shard-*.h5"))}


# -- damage, done the way disks, quotas and stray scripts do it -------------------------------------------------------


def truncate(folder: Path) -> str:
    path = folder / "shard-00001.h5"
    os.truncate(path, path.stat().st_size // 2)
    return path.name


def delete(folder: Path) -> str:
    (folder / "shard-00003.h5").unlink()
    return "shard-00003.h5"


def flip(folder: Path) -> str:
    """One flipped bit inside the ``ids`` data of shard 2: same size, opens fine, every reader reads it."""
    path = folder / "shard-00002.h5"
    with h5py.File(path, "r") as fh:
        offset = fh["ids"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 3] ^= 0x10
    path.write_bytes(bytes(data))
    return path.name


DAMAGE = {"truncated": truncate, "deleted": delete, "bit-flipped": flip}


@pytest.fixture(scope="module")
def good(tmp_path_factory, aptos_root) -> Path:
    """An undamaged cache: 40 APTOS images in 5 shards of 8, last-layer tokens; never modified by the tests."""
    with one_thread():
        return run_extract(spec(aptos_root, tmp_path_factory.mktemp("good"), tokens="last"), progress=False, log=quiet)


def copy_of(good: Path, dest: Path) -> Path:
    """The same cache under another cache root (same <dataset>/<model>/<key12> path, so `extract` finds it)."""
    shutil.copytree(good.parents[2], dest)
    return dest / good.relative_to(good.parents[2])


# -- verify names each damaged shard --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_names_the_damaged_shard(good, tmp_path, kind):
    folder = copy_of(good, tmp_path / "cache")
    name = DAMAGE[kind](folder)
    result = cli("verify", folder)
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and name in lines[0] and f"fmcache verify --repair {folder}" in lines[0], result.output
    bad = [c for c in verify_cache(folder).checks if c.state == "damaged"]
    assert [c.file for c in bad] == [name]
    assert cli("verify", good).exit_code == 0


def test_verify_names_every_damaged_shard_at_once(good, tmp_path):
    folder = copy_of(good, tmp_path / "cache")
    names = [damage(folder) for damage in DAMAGE.values()]
    result = cli("verify", folder)
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert all(n in line for n in names) and "3 damaged shard(s)" in line
    assert "has 71" in line or "bytes, the manifest says" in line  # truncated: the sizes
    assert "sha256 mismatch" in line and "is missing" in line


# -- stage two and info: one line, exit 2 / damaged ------------------------------------------------------------------


@pytest.mark.parametrize("kind", DAMAGE)
def test_knn_probe_and_info_give_one_line(good, tmp_path, kind):
    folder = copy_of(good, tmp_path / "cache")
    name = DAMAGE[kind](folder)
    for args in (
        ("knn", folder, "--k", "3", "--no-plots", "--out", tmp_path / "r"),
        ("probe", folder, "--lrs", "1e-3", "--seeds", "1", "--epochs", "1", "--no-plots", "--out", tmp_path / "r"),
    ):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        (line,) = error_lines(result.output)
        assert name in line and f"fmcache verify --repair {folder}" in line and "fmcache extract" in line
    info = cli("info", folder)
    assert info.exit_code == 0, info.output
    if kind == "bit-flipped":  # same size: info stays a stat per shard; verify and the readers catch it
        assert "status     complete" in info.output
    else:
        assert "status     damaged" in info.output and name in info.output
        assert "damaged" in cli("ls", "--cache-root", tmp_path / "cache").output


# -- repair + rerun is bit-identical ---------------------------------------------------------------------------------


def test_repair_then_rerun_gives_the_undamaged_cache(good, tmp_path, aptos_root):
    folder = copy_of(good, tmp_path / "cache")
    names = sorted(damage(folder) for damage in DAMAGE.values())
    result = cli("verify", "--repair", folder)
    assert result.exit_code == 0, result.output
    assert "moved 2 damaged shard file(s)" in result.output and "recompute 3 shard(s)" in result.output
    # set aside, never looking like a shard; the manifest drops them and says partial
    aside = sorted(p.name for p in (folder / DAMAGED_DIR).iterdir())
    assert aside == ["shard-00001.h5.damaged", "shard-00002.h5.damaged"]
    assert not list(folder.rglob("*.h5")) or all(p.parent == folder for p in folder.rglob("*.h5"))
    manifest = read_manifest(folder)
    assert manifest["status"] == "partial" and sorted(s["file"] for s in manifest["shards"]) == [
        n for n in ["shard-00000.h5", "shard-00004.h5"]
    ]
    assert not (folder / LOCK_NAME).exists()
    with pytest.raises(FmcacheError, match="incomplete"):
        CacheReader(folder)
    assert cli("verify", folder).exit_code == 0  # partial is not damaged

    messages: list[str] = []
    with one_thread():
        again = run_extract(spec(aptos_root, tmp_path / "cache", tokens="last"), progress=False, log=messages.append)
    assert again == folder
    assert shard_hashes(folder) == shard_hashes(good), f"recomputed {names} differ from the undamaged run"
    fields = ("file", "index", "n", "size", "sha256")
    strip = lambda m: [{k: s[k] for k in fields} for s in m["shards"]]  # noqa: E731
    assert strip(read_manifest(folder)) == strip(read_manifest(good))
    assert read_manifest(folder)["status"] == "complete"
    assert cli("verify", folder).exit_code == 0


@pytest.mark.parametrize("kind", ["truncated", "deleted"])
def test_extract_checks_a_complete_cache_and_recomputes_the_damage(good, tmp_path, aptos_root, kind):
    folder = copy_of(good, tmp_path / "cache")
    name = DAMAGE[kind](folder)
    messages: list[str] = []
    with one_thread():
        run_extract(spec(aptos_root, tmp_path / "cache", tokens="last"), progress=False, log=messages.append)
    assert not any("already complete" in m for m in messages)
    assert any(name in m and "recomputing" in m for m in messages), messages
    assert shard_hashes(folder) == shard_hashes(good)


def test_extract_verify_hashes_every_shard(good, tmp_path, aptos_root):
    folder = copy_of(good, tmp_path / "cache")
    name = flip(folder)
    messages: list[str] = []
    with one_thread():
        run_extract(spec(aptos_root, tmp_path / "cache", tokens="last"), progress=False, log=messages.append)
    assert any("already complete" in m for m in messages), "the cheap check does not hash"
    messages.clear()
    with one_thread():
        run_extract(
            spec(aptos_root, tmp_path / "cache", tokens="last", verify=True), progress=False, log=messages.append
        )
    assert any(name in m and "sha256 mismatch" in m for m in messages), messages
    assert shard_hashes(folder) == shard_hashes(good)
    assert [p.name for p in (folder / DAMAGED_DIR).iterdir()] == [f"{name}.damaged"]


def test_an_unreadable_manifest_is_rebuilt_by_extract(good, tmp_path, aptos_root):
    folder = copy_of(good, tmp_path / "cache")
    (folder / MANIFEST).write_text("{ not json")
    result = cli("verify", folder)
    assert result.exit_code == 2 and "rebuilds the manifest" in error_lines(result.output)[0]
    with one_thread():
        run_extract(spec(aptos_root, tmp_path / "cache", tokens="last"), progress=False, log=quiet)
    assert read_manifest(folder)["status"] == "complete" and shard_hashes(folder) == shard_hashes(good)
    assert cli("verify", folder).exit_code == 0


# -- empty split -----------------------------------------------------------------------------------------------------


@pytest.fixture
def no_val(tmp_path) -> Path:
    """A csv dataset whose split column names only train and test."""
    root = make_csv(tmp_path / "csv", n=12)
    header, *rows = (root / "labels.csv").read_text().splitlines()
    split = ("train", "train", "test")
    lines = [header + ",split"] + [f"{r},{split[i % 3]}" for i, r in enumerate(rows)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_empty_split_is_refused_before_any_work(tmp_path, no_val, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("an empty split must be refused before the model is built")

    monkeypatch.setattr(extract_mod, "create_foundation", no_model)
    with pytest.raises(FmcacheError) as err:
        run_extract(spec(no_val, tmp_path / "cache", dataset="csv"), progress=False, log=quiet)
    message = str(err.value)
    assert "empty val split (train 8, val 0, test 4)" in message and "--allow-empty-split" in message
    assert not (tmp_path / "cache").exists()

    args = ["extract", "--dataset", "csv", "--data-root", no_val, "--model", "dinov2_vits14", "--random-init"]
    result = cli(*args, "--img-size", "56", "--cache-root", tmp_path / "cache", "--quiet")
    assert result.exit_code == 2 and len(error_lines(result.output)) == 1 and "val 0" in result.output

    warned = cli("datasets", "--dataset", "csv", "--data-root", no_val)
    assert warned.exit_code == 0 and "warning:" in warned.output and "empty val split" in warned.output


def test_allow_empty_split_extracts(tmp_path, no_val):
    folder = run_extract(
        spec(no_val, tmp_path / "cache", dataset="csv", allow_empty_split=True, limit=2), progress=False, log=quiet
    )
    assert read_manifest(folder)["dataset"]["split_counts"] == {"train": 2, "val": 0, "test": 2}


# -- skipped images --------------------------------------------------------------------------------------------------


def test_skip_ends_with_one_summary_line_and_info_lists_all(tmp_path, aptos_root):
    root = tmp_path / "aptos"
    shutil.copytree(aptos_root, root)
    paths = plan(spec(root, tmp_path / "unused")).index.paths
    bad = [paths[i] for i in (1, 5, 9, 20, 33)]
    for path in bad:
        path.write_bytes(b"not an image")
    messages: list[str] = []
    folder = run_extract(spec(root, tmp_path / "cache", on_bad_image="skip"), progress=False, log=messages.append)
    lines = [m for m in messages if "skipped" in m]
    assert len(lines) == 1, messages
    line = lines[0]
    assert "skipped 5 bad image(s)" in line and "and 2 more" in line
    assert all(str(p) in line for p in bad[:3]) and str(bad[3]) not in line
    info = cli("info", folder)
    assert all(str(p) in info.output for p in bad)

    # the CLI prints the same line, also when the cache is already complete
    args = ["extract", "--dataset", "aptos2019", "--data-root", root, "--model", "dinov2_vits14", "--random-init"]
    result = cli(
        *args,
        "--img-size",
        "56",
        "--cache-root",
        tmp_path / "cache2",
        "--on-bad-image",
        "skip",
        "--quiet",
        "--limit",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert len([x for x in result.output.splitlines() if "skipped" in x]) == 1


# -- escape codes ----------------------------------------------------------------------------------------------------


def test_error_lines_never_hold_escape_codes(tmp_path, aptos_root, monkeypatch):
    import fmcache.weightfiles as weights_mod

    def coloured(*args, **kwargs):
        raise pickle.UnpicklingError(
            "\x1b[1mWeights only load failed.\x1b[0m Unsupported global: \x1b[31mGLOBAL builtins.print\x1b[0m\nmore"
        )

    monkeypatch.setattr(weights_mod.torch, "load", coloured)
    weights = tmp_path / "evil.pt"
    weights.write_bytes(b"\x80\x04 pickle")
    args = ["extract", "--dataset", "aptos2019", "--data-root", aptos_root, "--model", "dinov2_vits14"]
    result = cli(*args, "--weights", weights, "--img-size", "56", "--limit", "1", "--cache-root", tmp_path / "c")
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert "Weights only load failed" in line and ESC not in result.output

    # any FmcacheError, whatever built it: one plain line
    import fmcache.cache.info as info_mod

    def broken(folder):
        raise FmcacheError("\x1b[31mred\x1b[0m text\nsecond line")

    monkeypatch.setattr(info_mod, "format_info", broken)
    result = cli("info", tmp_path)
    assert result.exit_code == 2 and error_lines(result.output) == ["error: red text second line"]


# -- two extracts starting at the same instant on a new folder ------------------------------------------------------


def test_simultaneous_start_on_a_new_folder_keeps_the_winner_intact(tmp_path, aptos_root, monkeypatch):
    """Both runs find no folder; the refused one gets to the lock only once the winner is inside its first shard,
    with its manifest, lock and temporary shard on disk, and must leave all of them alone. Repeated."""
    winner_in_shard, loser_done = threading.Event(), threading.Event()
    arrived = threading.Barrier(2)
    seen: list[set[str]] = []
    real_shard_writer, real_mkdir = extract_mod.ShardWriter, extract_mod.ensure_writable_dir

    class Paused(real_shard_writer):
        def __init__(self, folder, *args, **kwargs):
            super().__init__(folder, *args, **kwargs)
            winner_in_shard.set()
            assert loser_done.wait(60), "the refused run never finished"
            seen.append({p.name for p in folder.iterdir()})

    def mkdir_then_line_up(path: Path) -> Path:
        out = real_mkdir(path)
        # both runs have seen a missing folder by now; the second to arrive waits for the winner's first shard
        if arrived.wait(60) == 1:
            assert winner_in_shard.wait(60)
        return out

    monkeypatch.setattr(extract_mod, "ShardWriter", Paused)
    monkeypatch.setattr(extract_mod, "ensure_writable_dir", mkdir_then_line_up)

    def one(name: str, root: Path, outcome: dict) -> None:
        try:
            outcome[name] = run_extract(spec(aptos_root, root, limit=1), progress=False, log=quiet)
        except FmcacheError as exc:
            outcome[name] = exc
            loser_done.set()

    for attempt in range(4):
        winner_in_shard.clear(), loser_done.clear(), arrived.reset()
        root, outcome = tmp_path / f"cache{attempt}", {}
        threads = [threading.Thread(target=one, args=(n, root, outcome)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        (folder,) = [v for v in outcome.values() if isinstance(v, Path)]
        (refused,) = [v for v in outcome.values() if isinstance(v, FmcacheError)]
        assert "being written by pid" in str(refused)
        assert {LOCK_NAME, MANIFEST} <= seen[-1], f"the refused run removed the winner's lock or manifest: {seen[-1]}"
        assert any(".tmp-" in n for n in seen[-1]), "the refused run removed the winner's shard in progress"
        assert read_manifest(folder)["status"] == "complete" and not (folder / LOCK_NAME).exists()
        assert not verify_cache(folder).damaged


@pytest.mark.slow
def test_simultaneous_extract_processes_on_a_new_folder(tmp_path, aptos_root):
    """Two real processes, started together, several times: exactly one cache, complete and verified."""
    config = tmp_path / "c.yaml"
    values = {k: str(v) if isinstance(v, Path) else v for k, v in spec_kwargs(aptos_root, tmp_path).items()}
    values.pop("cache_root")
    config.write_text(json.dumps({**values, "limit": 1}))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for attempt in range(3):
        root = tmp_path / f"cache{attempt}"
        cmd = [sys.executable, "-m", "fmcache", "extract", "--config", str(config), "--cache-root", str(root)]
        procs = [
            subprocess.Popen([*cmd, "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        results = [(p.wait(180), p.stdout.read().decode(), p.stderr.read().decode()) for p in procs]
        assert all(rc in (0, 2) for rc, _, _ in results), results
        assert any(rc == 0 for rc, _, _ in results), results
        for rc, _, err in results:
            if rc == 2:
                assert "being written by pid" in err and ESC not in err
        (folder,) = [p.parent for p in root.rglob(MANIFEST)]
        assert read_manifest(folder)["status"] == "complete" and not (folder / LOCK_NAME).exists()
        assert not verify_cache(folder).damaged


# -- the lock never removes a live holder's file --------------------------------------------------------------------


def test_lock_release_and_stale_break_spare_a_live_lock(tmp_path):
    first = CacheLock(tmp_path).acquire()
    other = CacheLock(tmp_path)
    other.held = True  # as if it had believed it held the lock: release must still leave first's file alone
    other.release()
    assert (tmp_path / LOCK_NAME).exists()
    # a run that read a stale record and meanwhile lost the race puts the live lock back
    other._break_stale({"pid": 999999, "host": "x", "started": "?"})
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == first.token
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()


# -- content fingerprint ---------------------------------------------------------------------------------------------


def test_content_fingerprint_catches_in_place_edits_that_keep_size_and_mtime(tmp_path):
    root = make_aptos(tmp_path / "data", n=12)
    key = lambda **kw: plan(spec(root, tmp_path / "c", **kw)).key  # noqa: E731
    stat_key, content_key = key(), key(fingerprint="content")
    assert stat_key != content_key
    image = plan(spec(root, tmp_path / "c")).index.paths[0]
    st = image.stat()
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # an edit that keeps the size; the mtime is put back
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key() == stat_key, "the default fingerprint cannot see this edit"
    assert key(fingerprint="content") != content_key
    # and a touch that changes nothing but the mtime keeps the content key
    edited = key(fingerprint="content")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert key() != stat_key and key(fingerprint="content") == edited
    with pytest.raises(FmcacheError, match="unknown --fingerprint"):
        spec(root, tmp_path / "c", fingerprint="bytes")


def test_one_line_strips_every_kind_of_escape_sequence():
    from fmcache.cache.messages import one_line

    text = "\x1b[1;31mbold red\x1b[0m and\x1b]0;title\x07 a \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\\nnext"
    assert one_line(text) == "bold red and a link next"
