"""``fmcache grid``: YAML → jobs, skipping finished work, resuming after a kill, the executors and bad input."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fmcache.cli import app
from fmcache.grid.config import GridOptions, load_grid
from fmcache.grid.jobs import expand
from fmcache.grid.main import run_grid
from fmcache.results import find_results

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

TINY = """
results: out/results
cache_root: out/cache
models:
  - {name: resnet50, random_init: true, img_size: 32}
datasets:
  - {name: imagefolder, root: data/digits, prepare: digits, per_class: 8}
extract: {batch_size: 32, workers: 0, shard_size: 40}
protocols:
  knn: {ks: [3, 5], layer: all}
  probe_linear: {lrs: [1.0e-2], seeds: 2, epochs: 2}
  cka: {layers: all}
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(TINY)
    return path


def _grid(*args: str):
    return runner.invoke(app, ["grid", *map(str, args)])


def test_grid_runs_then_does_nothing_then_reports(tiny: Path, tmp_path: Path):
    dry = _grid(tiny, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "4 job(s), 0 done, 4 to run" in dry.output and not (tmp_path / "data").exists()
    first = _grid(tiny)
    assert first.exit_code == 0, first.output
    assert "4 job(s): 4 ran, 0 already done" in first.output
    results = tmp_path / "out" / "results"  # relative to the YAML's folder
    assert {d["protocol"] for d in find_results(results)} == {"knn", "probe_linear", "cka"}
    second = _grid(tiny)
    assert second.exit_code == 0 and "4 job(s): 0 ran, 4 already done" in second.output, second.output
    dry = _grid(tiny, "--dry-run")
    assert "4 done, 0 to run" in dry.output
    # the estimate comes from the recorded timings once runs exist
    assert "estimated cost of the 0 job(s)" in dry.output
    # --results / --cache-root override the YAML; --only keeps a kind plus the extract it needs
    other = _grid(tiny, "--results", tmp_path / "r2", "--cache-root", tmp_path / "out" / "cache", "--only", "knn")
    assert other.exit_code == 0 and "2 job(s): 1 ran, 1 already done" in other.output, other.output
    report = runner.invoke(app, ["report", str(results), "--out", str(tmp_path / "report"), "--resamples", "50"])
    assert report.exit_code == 0, report.output
    for name in ("report.md", "report.html", "report.tex", "table1_frozen.csv", "fig2_knn.csv", "fig3_time.csv"):
        assert (tmp_path / "report" / name).is_file(), name


def test_expand_jobs_and_dependencies(tmp_path: Path):
    path = tmp_path / "g.yaml"
    extra = (
        "  finetune_linear:\n    - {freeze: none}\n    - {freeze: 2, models: [resnet50]}\n  probe_deit: {layer: last}\n"
    )
    path.write_text(
        TINY.replace("models:\n", "models:\n  - {name: timm:vit_tiny_patch16_224, random_init: true}\n") + extra
    )
    grid = load_grid(path)
    jobs = expand(grid)
    kinds = [j.kind for j in jobs]
    assert kinds.count("extract") == 2 and kinds.count("finetune_linear") == 3 and kinds.count("probe_deit") == 2
    by_id = {j.id: j for j in jobs}
    assert by_id["knn/imagefolder/resnet50"].deps == ["extract/imagefolder/resnet50"]
    assert all(not j.deps for j in jobs if j.kind.startswith("finetune"))
    assert kinds.index("finetune_linear") > max(i for i, k in enumerate(kinds) if k != "finetune_linear")
    assert grid.results == tmp_path / "out" / "results"


def _one_line_exit_2(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output


# (id, how the tiny grid's YAML changes, extra command-line arguments, what the one error line names)
BAD_GRIDS = [
    ("unknown-top-key", lambda y: y + "epochs: 3\n", (), ("unknown key(s) epochs", "valid: cache_root, datasets")),
    (
        "unknown-protocol-option",
        lambda y: y.replace("knn: {ks: [3, 5], layer: all}", "knn: {ks: [3], k_max: 9}"),
        (),
        ("k_max in protocols.knn", "temperature"),
    ),
    ("unknown-protocol", lambda y: y.replace("knn:", "knnn:"), (), ("knnn", "probe_linear")),
    (
        "missing-root",
        lambda y: y.replace("root: data/digits, prepare: digits, per_class: 8", "root: nowhere"),
        (),
        ("root", "nowhere", "does not exist"),
    ),
    (
        "slurm-option-the-grid-sets",
        lambda y: y,
        ("--executor", "slurm", "--slurm-option", "dependency=afterok:1"),
        ("the grid sets --dependency itself",),
    ),
    ("slurm-option-without-key", lambda y: y, ("--executor", "slurm", "--slurm-option", "=16G"), ("give KEY=VALUE",)),
]


@pytest.mark.parametrize(("change", "args", "needles"), [case[1:] for case in BAD_GRIDS], ids=[c[0] for c in BAD_GRIDS])
def test_bad_input_is_one_line(tmp_path: Path, change, args, needles):
    bad = tmp_path / "bad.yaml"
    bad.write_text(change(TINY))
    _one_line_exit_2(_grid(bad, *args), *needles)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()  # refused before any job or data


def test_slurm_without_submitit_is_one_line(tiny: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    _one_line_exit_2(_grid(tiny, "--executor", "slurm"), "pip install submitit")
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_kill_midway_then_rerun_completes_only_the_rest(tiny: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fmcache", "grid", str(tiny)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    results = tmp_path / "out" / "results"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(results.rglob("result.json")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-grid: the extract and the first protocol are done
    proc.wait()
    finished = len(find_results(results))
    assert 1 <= finished < 3
    rerun = _grid(tiny)
    assert rerun.exit_code == 0, rerun.output
    ran, done = map(int, re.search(r"4 job\(s\): (\d+) ran, (\d+) already done", rerun.output).groups())
    # the extract and every run whose ledger entry was written are skipped; only the rest runs
    assert ran + done == 4 and done >= max(1, finished) and ran <= 4 - finished
    assert len(find_results(results)) == 3


@pytest.mark.slow
def test_local_jobs_subprocesses(tiny: Path, tmp_path: Path):
    result = _grid(tiny, "--jobs", "2", "--logs", tmp_path / "logs")
    assert result.exit_code == 0, result.output
    assert len(find_results(tmp_path / "out" / "results")) == 3
    assert len(list((tmp_path / "logs").glob("*.log"))) == 4  # one log per job


@pytest.mark.slow
def test_demo_grid_end_to_end(demo_grid_run):
    """configs/demo_grid.yaml as shipped: every job runs once, a rerun runs none, and the report fills its tables."""
    config, answer, messages = demo_grid_run
    assert len(answer["ran"]) == 16 and not answer["skipped"], messages[-5:]
    assert "16 job(s): 0 ran, 16 already done" in _grid(config).output
    folder = config.parent.parent
    report = runner.invoke(app, ["report", str(folder / "results"), "--out", str(folder / "report")])
    assert report.exit_code == 0, report.output
    md = (folder / "report" / "report.md").read_text()
    table1 = md.split("## Table 1", 1)[1].split("\n## ", 1)[0]
    assert "imagefolder (accuracy) linear" in table1 and "resnet50" in table1
    figures = {p.name for p in (folder / "report" / "figures").iterdir()}
    assert "fig4_freeze_imagefolder.png" in figures and "fig8_cka_models_imagefolder.png" in figures


def test_job_lock_skips_waits_for_and_recovers_from_another_grid(tiny: Path, tmp_path: Path):
    """A job whose lock another grid holds is skipped (and named with its pid and host), waited for with --wait, and
    a lock left by a dead process is taken over."""
    import json
    import socket
    import threading

    from fmcache.grid.lock import JobLock
    from fmcache.grid.run import ledger_path

    knn = next(j for j in expand(load_grid(tiny)) if j.kind == "knn")
    lock = JobLock(knn)
    lock.path.parent.mkdir(parents=True)
    lock.acquire()
    messages: list[str] = []
    out = run_grid(tiny, GridOptions(), log=messages.append)
    lock.release()
    holder = f"running in another grid (pid {os.getpid()}, host {socket.gethostname()})"
    assert out["elsewhere"] == {knn.id: holder} and knn.id not in out["ran"] and len(out["ran"]) == 3, messages
    assert f"  skipped: {holder}; pass --wait to wait for it" in messages
    assert any(m.startswith("4 job(s): 3 ran, 0 already done, 0 failed, 0 not started, 1 running in another grid")
               for m in messages), messages  # fmt: skip

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    messages.clear()
    out = run_grid(tiny, GridOptions(), log=messages.append)
    assert out["ran"] == [knn.id] and any(f"stale lock from dead pid {dead.pid}" in m for m in messages), messages
    assert not lock.path.exists()

    ledger_path(knn).unlink()  # undone again; this time the holder lets go while the grid waits
    lock = JobLock(knn)
    lock.acquire()
    threading.Timer(1.5, lock.release).start()
    messages.clear()
    out = run_grid(tiny, GridOptions(wait=True), log=messages.append)
    assert out["ran"] == [knn.id], messages
    assert f"  waiting for {knn.id}: {holder}" in messages


@pytest.mark.slow
def test_two_local_grids_at_once_never_run_a_job_twice(tiny: Path, tmp_path: Path):
    """Two grids on one results folder started together (one of them with --jobs 2): each job runs once."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = [["--wait", "--jobs", "2", "--logs", str(tmp_path / "logs")], ["--wait"]]
    procs = [subprocess.Popen([sys.executable, "-m", "fmcache", "grid", str(tiny), *extra], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for extra in commands]  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    ran = 0
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out
        counts = re.search(r"4 job\(s\): (\d+) ran, (\d+) already done, 0 failed, 0 not started;", out)
        assert counts, out
        ran += int(counts.group(1))
    assert ran == 4, outs  # together they ran every job once
    assert len(find_results(tmp_path / "out" / "results")) == 3
