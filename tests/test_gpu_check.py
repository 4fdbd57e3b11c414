"""benchmarks/gpu_check.sh: on a machine without a CUDA GPU it says so and exits 0 (what CI runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    env.pop("FMCACHE_GPU_CHECK_ON_CPU", None)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_check: needs a CUDA GPU" in done.stdout and "exit 0" in done.stdout
