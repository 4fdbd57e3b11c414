"""What killed runs leave behind: checkpoint temporaries (``.<name>.tmp-<pid>-<thread>@<host>``), removed by the rerun
only when their writer is dead on this host; and a killed token-head run's rerun says that it resumed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fmcache.cli import app
from fmcache.files import remove_stale_temporaries
from fmcache.frozen.run_tokens import checkpoint_path
from fmcache.training import save_checkpoint

HOST = socket.gethostname()


def _killed_writer(target: Path) -> Path:
    """A process that dies (SIGKILL) in the middle of writing ``target`` atomically, as a killed run does: the
    temporary it leaves, named by its real (now dead) pid, thread and host."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fmcache.files import atomic_write_with

        def write(fh):
            fh.write(b"half a checkpoint" * 1000)
            fh.flush()
            print("writing", flush=True)
            time.sleep(600)

        atomic_write_with(Path({str(target)!r}), write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (tmp,) = target.parent.glob(f".{target.name}.tmp-{proc.pid}-*")
    assert tmp.name.endswith(f"@{HOST}")
    return tmp


def _others(target: Path) -> list[Path]:
    """Temporaries the rerun must keep: a live writer here (this process), one on another host, an old-style name."""
    names = [f".{target.name}.tmp-{os.getpid()}-1@{HOST}", f".{target.name}.tmp-1-1@some-other-node",
             f".{target.name}.tmp-999999"]  # fmt: skip
    for name in names:
        (target.parent / name).write_bytes(b"x")
    return [target.parent / name for name in names]


def test_remove_stale_temporaries_only_of_dead_writers_here(tmp_path: Path):
    target = tmp_path / "last.pt"
    dead = _killed_writer(target)
    keep = _others(target)
    (tmp_path / ".other.pt.tmp-1-1@x").write_bytes(b"x")  # another file's temporary is not this target's
    assert remove_stale_temporaries(target) == [dead]
    assert not dead.exists() and all(p.exists() for p in keep)


def test_a_checkpoint_write_clears_its_dead_writers_temporaries(tmp_path: Path):
    """Fine-tuning's ``last.pt`` and the token heads' checkpoints are written by save_checkpoint: the rerun's first
    checkpoint removes what the killed run left (10–100 MB here, far more for a DeiT-B grid)."""
    target = tmp_path / "run" / "last.pt"
    target.parent.mkdir()
    dead = _killed_writer(target)
    keep = _others(target)
    save_checkpoint(target, {"epoch": 1, "w": torch.zeros(3)}, {"lr": 0.1})
    assert target.is_file() and not dead.exists() and all(p.exists() for p in keep)


@pytest.mark.slow
def test_killed_token_head_rerun_says_it_resumed_and_leaves_no_temporary(tiny_cache, tmp_path: Path):
    args = ["probe", str(tiny_cache), "--head", "attentive", "--layer", "2", "--lrs", "1e-3,1e-2", "--seeds", "2",
            "--epochs", "8", "--batch-size", "8", "--no-plots", "--device", "cpu", "--out", str(tmp_path / "res")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fmcache", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    ckpts: list[Path] = []
    while not ckpts and time.time() < deadline and proc.poll() is None:
        ckpts = list((tmp_path / "res").rglob("checkpoints/probe_attentive_layer02.pt"))
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; give it more epochs"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (ckpt,) = ckpts
    assert ckpt == checkpoint_path(ckpt.parents[1], "attentive", 2)
    dead = _killed_writer(ckpt)  # as if the kill had landed while the checkpoint was being written
    epoch = torch.load(ckpt, weights_only=True)["state"]["epoch"]
    rerun = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert rerun.exit_code == 0, rerun.output
    assert f"resumed probe_attentive layer 2 after epoch {epoch} of 8" in rerun.output, rerun.output
    assert not dead.exists()
    assert not [p for p in ckpt.parent.iterdir() if ".tmp-" in p.name]
