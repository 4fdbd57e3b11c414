"""The CLI shell: version, models table, datasets on every fixture layout, error lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fmcache
from fmcache.cli import app
from fmcache.models import list_models
from tests import fixtures_data as fx

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and fmcache.__version__ in result.output


def test_models_lists_every_registry_name():
    result = runner.invoke(app, ["models"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for spec in list_models():
        assert spec.name in result.output
    assert "vmamba" in result.output and "unavailable" in result.output


@pytest.mark.parametrize(
    ("dataset", "maker", "extra", "expect"),
    [
        ("aptos2019", fx.make_aptos, [], "train"),
        ("isic2019", fx.make_isic, [], "MEL"),
        ("cbis_ddsm", fx.make_ddsm_lists, ["--layout", "lists"], "train"),
        ("cbis_ddsm", fx.make_ddsm_tcia, ["--layout", "tcia"], "train"),
        ("chexpert", fx.make_chexpert, ["--uncertain", "ones"], "Cardiomegaly"),
        ("csv", fx.make_csv, [], "train"),
        ("imagefolder", fx.make_imagefolder, [], "train"),
    ],
)
def test_datasets_describes_each_fixture_layout(tmp_path: Path, dataset, maker, extra, expect):
    root = maker(tmp_path / dataset)
    result = runner.invoke(
        app, ["datasets", "--dataset", dataset, "--data-root", str(root), *extra], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert expect in result.output and "val" in result.output and "test" in result.output


def test_datasets_bad_layout_is_one_line_exit_2(tmp_path: Path):
    root = fx.make_aptos(tmp_path / "aptos")
    (root / "train.csv").unlink()
    result = runner.invoke(app, ["datasets", "--dataset", "aptos2019", "--data-root", str(root)])
    assert result.exit_code == 2
    assert "train.csv" in result.output and "Traceback" not in result.output


def test_unknown_model_is_one_line_exit_2(tmp_path: Path):
    root = fx.make_aptos(tmp_path / "aptos")
    args = ["extract", "--dataset", "aptos2019", "--data-root", str(root), "--model", "dinov9", "--random-init"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "unknown model 'dinov9'" in result.output


@pytest.mark.slow
def test_checkout_shim_and_module_entry_point(tmp_path: Path):
    for cmd in ([sys.executable, "cli.py", "--version"], [sys.executable, "-m", "fmcache", "--version"]):
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
        assert fmcache.__version__ in out.stdout
    bad = subprocess.run(
        [sys.executable, "cli.py", "info", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    verbose = subprocess.run(
        [sys.executable, "cli.py", "info", str(tmp_path / "nope"), "--verbose"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_dataset_help_names_every_registered_dataset():
    from fmcache.cli.app import DATASET_HELP
    from fmcache.data.registry import DATASETS

    missing = [name for name in DATASETS if name not in DATASET_HELP]
    assert not missing, f"--dataset's help misses {missing}"
