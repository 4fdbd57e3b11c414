"""``fmcache grid --executor slurm`` on a real Slurm cluster: the happy path and every way it can go wrong.

These tests need a running cluster (``scripts/slurm-up.sh``, which ``.ci/run`` starts) and skip only when ``sinfo``
does not answer. Nothing is mocked: jobs are submitted with sbatch, run by slurmd, cancelled with scancel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fmcache.cli import app
from fmcache.grid.config import GridOptions, load_grid
from fmcache.grid.jobs import expand
from fmcache.grid.lock import JobLock
from fmcache.grid.main import run_grid
from fmcache.grid.run import execute
from fmcache.grid.slurm_cli import squeue_states
from tests.test_grid import TINY


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not _slurm_answers(), reason="no Slurm cluster answers (sinfo); start one: scripts/slurm-up.sh"),
]
pytest.importorskip("submitit", reason="the slurm executor needs submitit (pip install submitit)")

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
KINDS = ("extract", "knn", "probe_linear", "cka")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder with the tiny grid's YAML, its prepared digits and the local executor's run (cache and results)."""
    root = tmp_path_factory.mktemp("slurm")
    (root / "grid.yaml").write_text(TINY)
    out = run_grid(root / "grid.yaml", GridOptions(), log=lambda _m: None)
    assert len(out["ran"]) == 4
    return root


@pytest.fixture(autouse=True)
def _cancel_leftovers(tmp_path: Path, base: Path):
    """Whatever a test leaves queued or running in Slurm is cancelled, so the next test finds the node free."""
    yield
    # submitit writes <logs>/<id>/<id>_submission.sh for every job it submitted
    ids = [p.name.split("_")[0] for p in [*tmp_path.rglob("*_submission.sh"), *base.rglob("*_submission.sh")]]
    active = [i for i, s in (squeue_states(ids) or {}).items() if s.active]
    if active:
        subprocess.run(["scancel", *active], check=False)


def _grid(*args) -> object:
    return runner.invoke(app, ["grid", *map(str, args)])


def _slurm_args(tmp_path: Path, base: Path, cache: str = "local") -> list[str]:
    """This test's own results folder; the module's complete cache (``local``) or a fresh one (``fresh``)."""
    cache_root = base / "out" / "cache" if cache == "local" else tmp_path / "cache"
    return [base / "grid.yaml", "--executor", "slurm", "--results", tmp_path / "results", "--cache-root", cache_root]


def _comparable(doc: object) -> object:
    """A result.json without what may differ between two runs of the same numbers: timings, dates, absolute paths."""
    if isinstance(doc, dict):
        return {
            k: _comparable(v)
            for k, v in doc.items()
            if "seconds" not in k and not k.endswith("_at") and k not in ("timings", "cache")
        }
    if isinstance(doc, list):
        return [_comparable(v) for v in doc]
    return doc


def _results(root: Path) -> dict[str, Path]:
    return {str(p.parent.relative_to(root)): p.parent for p in root.rglob("result.json")}


def _running_lines(*log_roots: Path) -> list[str]:
    """The ``running <job>`` lines every job's process prints once it holds the job's lock and starts the work."""
    lines = []
    for root in log_roots:
        for log in root.rglob("*_log.out"):
            lines += [line for line in log.read_text(errors="replace").splitlines() if line.startswith("running ")]
    return lines


def test_tiny_grid_on_slurm_equals_local_and_reruns_nothing(tmp_path: Path, base: Path):
    start = time.perf_counter()
    first = _grid(*_slurm_args(tmp_path, base, cache="fresh"))
    assert first.exit_code == 0, first.output
    assert "4 job(s): 4 ran, 0 already done" in first.output, first.output
    assert len(re.findall(r"^submitted .* as Slurm job \d+$", first.output, re.M)) == 4
    # this cluster has no GPU gres: --gpus-per-job defaults to 0 and says so
    assert "jobs ask for none (--gpus-per-job 0)" in first.output
    # submitit's sacct calls (and their doubled warnings) are gone: the grid asks squeue itself
    assert "sacct" not in first.output and "accounting storage is disabled" not in first.output
    logs = tmp_path / "results" / "grid_logs"
    for log in [*logs.rglob("*_log.out"), *logs.rglob("*_log.err")]:
        text = log.read_text(errors="replace")
        assert "[bold" not in text and "[/]" not in text and "\x1b[" not in text, f"markup in {log}"
    assert sorted(line.split()[1].split("/")[0] for line in _running_lines(logs)) == sorted(KINDS)
    print(f"slurm tiny grid: {time.perf_counter() - start:.1f} s")

    again = _grid(*_slurm_args(tmp_path, base, cache="fresh"))
    assert again.exit_code == 0 and "4 job(s): 0 ran, 4 already done" in again.output, again.output
    assert "submitted" not in again.output

    local, slurm = _results(base / "out" / "results"), _results(tmp_path / "results")
    assert set(local) == set(slurm) and len(local) == 3  # same cache key and settings hash: same folders
    for name in local:
        a, b = (json.loads((d / "result.json").read_text()) for d in (local[name], slurm[name]))
        assert _comparable(a) == _comparable(b), name
        if (local[name] / "predictions.npz").exists():
            with np.load(local[name] / "predictions.npz") as pa, np.load(slurm[name] / "predictions.npz") as pb:
                assert set(pa.files) == set(pb.files)
                for key in pa.files:
                    np.testing.assert_array_equal(pa[key], pb[key], err_msg=f"{name}: {key}")


def _wait_until_ended(slurm_id: str, timeout: float = 30) -> str:
    """The job's final state, once Slurm no longer runs or holds it."""
    deadline = time.monotonic() + timeout
    while True:
        state = (squeue_states([slurm_id]) or {}).get(slurm_id)
        if state is not None and not state.active:
            return state.state
        assert time.monotonic() < deadline, f"Slurm job {slurm_id} still {state}"
        time.sleep(0.2)


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output, result.output
    return errors[0]


def test_rejected_sbatch_is_one_line_naming_the_fix(tmp_path: Path, base: Path):
    args = _slurm_args(tmp_path, base, cache="fresh")
    gres = _grid(*args, "--gpus-per-job", "1")
    assert len(gres.output.strip().splitlines()) == 1, gres.output
    line = _one_error_line(gres)
    assert "sbatch refused extract/imagefolder/resnet50: Invalid generic resource (gres) specification" in line
    assert "pass --gpus-per-job 0" in line
    partition = _grid(*args, "--slurm-partition", "nosuch", "--gpus-per-job", "0")
    assert len(partition.output.strip().splitlines()) == 1, partition.output
    line = _one_error_line(partition)
    assert "invalid partition specified: nosuch" in line and "pass --slurm-partition NAME; partitions here:" in line
    assert not list((tmp_path / "results").rglob("*.slurm"))  # nothing left submitted


def test_rejection_midway_cancels_what_this_run_submitted(tmp_path: Path, base: Path):
    """The second sbatch is refused (its partition went inactive after the first): the first job is cancelled."""
    host = socket.gethostname().split(".")[0]
    made = subprocess.run(["scontrol", "create", "PartitionName=fmtest", f"Nodes={host}", "State=UP"],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot create a test partition here: {made.stderr.strip()}")
    try:

        def log(message: str) -> None:
            if message.startswith("submitted extract/"):  # between the first sbatch and the second
                subprocess.run(["scontrol", "update", "PartitionName=fmtest", "State=INACTIVE"], check=True)

        options = GridOptions(executor="slurm", results=tmp_path / "results", cache_root=tmp_path / "cache",
                              slurm_partition="fmtest", gpus_per_job=0)  # fmt: skip
        from fmcache.errors import FmcacheError

        with pytest.raises(FmcacheError) as err:
            run_grid(base / "grid.yaml", options, log=log)
        message = str(err.value)
        assert "sbatch refused knn/imagefolder/resnet50" in message and "partition" in message, message
        assert "pass --slurm-partition NAME; partitions here:" in message
        found = re.search(r"cancelled the 1 job\(s\) this run had submitted: extract/imagefolder/resnet50 "
                          r"\(Slurm job (\d+)\)", message)  # fmt: skip
        assert found, message
        assert _wait_until_ended(found.group(1)) == "CANCELLED"
    finally:
        subprocess.run(["scontrol", "delete", "PartitionName=fmtest"], capture_output=True, check=False)


def test_a_job_slurm_would_never_start_is_cancelled_and_reported(tmp_path: Path, base: Path):
    """More CPUs than the node has: accepted by sbatch, then PENDING (PartitionConfig) forever; the grid ends."""
    result = _grid(*_slurm_args(tmp_path, base, cache="fresh"), "--gpus-per-job", "0", "--slurm-option",
                   "cpus-per-task=512")  # fmt: skip
    line = _one_error_line(result)
    assert "extract/imagefolder/resnet50: Slurm would never start it (pending, reason PartitionConfig)" in line, line
    assert "knn/imagefolder/resnet50: not started: extract/imagefolder/resnet50 failed" in result.output
    ids = re.findall(r"^submitted \S+ as Slurm job (\d+)$", result.output, re.M)
    assert len(ids) == 4 and not [i for i, s in (squeue_states(ids) or {}).items() if s.active], result.output


def test_failing_job_reports_its_exception_and_stderr_log(tmp_path: Path, base: Path):
    bad = tmp_path / "bad.yaml"  # the module's data (so the module's complete cache), knn on a layer that is not there
    bad.write_text(TINY.replace("knn: {ks: [3, 5], layer: all}", "knn: {ks: [3, 5], layer: 99}").replace(
        "root: data/digits", f"root: {base / 'data' / 'digits'}"))  # fmt: skip
    result = _grid(bad, "--executor", "slurm", "--results", tmp_path / "results", "--cache-root",
                   base / "out" / "cache", "--only", "knn")  # fmt: skip
    line = _one_error_line(result)
    assert "knn/imagefolder/resnet50: FmcacheError: cache" in line and "layer 99 does not exist" in line, line
    stderr = re.search(r"\(stderr: (\S+_0_log\.err)\)", line)
    assert stderr and Path(stderr.group(1)).is_file(), line
    assert "layer 99 does not exist" in Path(stderr.group(1)).read_text()
    assert "2 job(s): 0 ran, 1 already done, 1 failed, 0 not started" in result.output


def test_cancelled_extract_ends_the_grid_in_bounded_time(tmp_path: Path, base: Path):
    """scancel on the running extract: Slurm cancels its readers, the grid says so and ends (no accounting here)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # an extract of a few seconds could finish between squeue's RUNNING and the scancel: this one takes minutes
    slow = tmp_path / "slow.yaml"
    slow.write_text(TINY.replace("img_size: 32", "img_size: 224").replace("per_class: 8", "per_class: 40"))
    args = [slow, "--executor", "slurm", "--results", tmp_path / "results", "--cache-root", tmp_path / "cache"]
    cmd = [sys.executable, "-m", "fmcache", "grid", *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ledger = tmp_path / "results" / ".grid"
    deadline = time.monotonic() + 120
    extract_id = None
    while time.monotonic() < deadline and extract_id is None:
        for marker in ledger.glob("*.slurm") if ledger.is_dir() else []:
            doc = json.loads(marker.read_text())
            state = (squeue_states([doc["slurm_job_id"]]) or {}).get(doc["slurm_job_id"])
            if doc["job"].startswith("extract/") and state is not None and state.state == "RUNNING":
                extract_id = doc["slurm_job_id"]
        time.sleep(0.1)
    assert extract_id, "the extract never ran"
    subprocess.run(["scancel", extract_id], check=True)
    cancelled_at = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    took = time.monotonic() - cancelled_at
    assert proc.returncode == 2, out
    assert "failed extract/imagefolder/resnet50: cancelled while it ran" in out, out
    for reader in ("knn", "probe_linear", "cka"):
        assert f"{reader}/imagefolder/resnet50: not started: extract/imagefolder/resnet50 was cancelled" in out, out
    assert "4 job(s): 0 ran, 0 already done, 1 failed, 3 not started" in out, out
    print(f"grid ended {took:.1f} s after scancel")
    # Slurm holds none of the readers any more (cancelled, not pending forever)
    ids = re.findall(r"^submitted \S+ as Slurm job (\d+)$", out, re.M)
    assert len(ids) == 4 and not [i for i, s in (squeue_states(ids) or {}).items() if s.active], out


def test_a_job_held_by_another_grid_is_skipped_or_waited_for_on_the_node(tmp_path: Path, base: Path):
    """The extract's lock held here (another grid running it): without --wait the Slurm grid skips it and says who
    holds it; with --wait its extract job waits on the node for the lock, then finds the work done."""
    args = _slurm_args(tmp_path, base, cache="fresh")
    jobs = expand(load_grid(base / "grid.yaml", tmp_path / "results", tmp_path / "cache"))
    extract = next(j for j in jobs if j.kind == "extract")
    lock = JobLock(extract)
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    try:
        skipped = _grid(*args)
        line = _one_error_line(skipped)
        holder = f"running in another grid (pid {os.getpid()}, host {socket.gethostname()})"
        assert f"skipped extract/imagefolder/resnet50: {holder}; pass --wait to wait for it" in skipped.output
        assert "not started: extract/imagefolder/resnet50 is " + holder in line, line

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-m", "fmcache", "grid", *map(str, args), "--wait", "--only", "knn"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        logs = tmp_path / "results" / "grid_logs"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
            "waiting for extract/" in p.read_text(errors="replace") for p in logs.rglob("*_log.out")
        ):
            time.sleep(0.2)
        assert time.monotonic() < deadline, "the extract job never waited for the lock"
        execute(extract, log=lambda _m: None)  # "the other grid" does the work, then lets go
    finally:
        lock.release()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "done extract/imagefolder/resnet50 by another grid" in out, out
    assert "2 job(s): 1 ran, 1 already done" in out, out
    assert [line.split()[1] for line in _running_lines(logs)] == ["knn/imagefolder/resnet50"]


def test_two_slurm_grids_at_once_never_run_a_job_twice(tmp_path: Path, base: Path):
    """Two grids on one results folder, started together: each job runs once, whoever submitted it."""
    args = [*_slurm_args(tmp_path, base), "--wait", "--only", "knn,probe_linear"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "fmcache", "grid", *map(str, args)]
    procs = []
    for i in range(2):
        logs = ["--logs", str(tmp_path / f"logs{i}")]
        procs.append(
            subprocess.Popen([*cmd, *logs], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out
    running = _running_lines(tmp_path / "logs0", tmp_path / "logs1")
    assert sorted(line.split()[1].split("/")[0] for line in running) == ["knn", "probe_linear"], running
    assert len(_results(tmp_path / "results")) == 2


def test_stale_lock_of_a_finished_slurm_job_is_taken_over(tmp_path: Path, base: Path):
    """A lock left by a Slurm job on another node that no longer runs is stale: the next grid takes it over."""
    done = subprocess.run(["sbatch", "--parsable", "-t", "1", "-o", "/dev/null", "--wrap", "true"], capture_output=True, text=True,
                          check=True)  # fmt: skip
    slurm_id = done.stdout.strip().split(";")[0]
    _wait_until_ended(slurm_id)
    jobs = expand(load_grid(base / "grid.yaml", tmp_path / "results", base / "out" / "cache"))
    knn = next(j for j in jobs if j.kind == "knn")
    lock = JobLock(knn)
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    lock.path.write_text(json.dumps({"pid": 1, "host": "another-node", "started": "2026-01-01T00:00:00",
                                     "job": knn.id, "slurm_job_id": slurm_id, "token": "x"}))  # fmt: skip
    assert lock.holder() is None
    messages: list[str] = []
    out = run_grid(base / "grid.yaml", GridOptions(results=tmp_path / "results", cache_root=base / "out" / "cache",
                                                    only="knn"), log=messages.append)  # fmt: skip
    assert out["ran"] == ["knn/imagefolder/resnet50"], messages
    assert any("removed a stale lock" in m for m in messages), messages
