"""Stage two's start-up: the linear probe never imports the model libraries (timm, open_clip, transformers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys
from typer.testing import CliRunner
from fmcache.cli import app
result = CliRunner().invoke(app, ["probe", sys.argv[1], "--head", "linear", "--lrs", "1e-3", "--seeds", "1",
                                  "--epochs", "1", "--batch-size", "8", "--out", sys.argv[2]])
assert result.exit_code == 0, result.output
print(sorted(k for k in ("timm", "open_clip", "transformers") if k in sys.modules))
"""


def test_linear_probe_imports_no_model_library(tiny_cache: Path, tmp_path: Path):
    """The whole `fmcache probe --head linear` path, in a fresh interpreter, on a tiny cache."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_cache), str(tmp_path / "results")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
