"""Every command's usage errors (a value click cannot convert, a flag given a value, an unknown option, a missing
argument) and its spec's refusals read alike: ONE ``error:`` line naming the option and what it accepts, exit 2.

The table holds, for every registered command, a bad value of each kind of option the command has: int, float,
list-as-text (parsed by the spec), a choice (checked by the spec), a path that must exist, a flag given a value.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from fmcache.cli import app

runner = CliRunner()
NOPE = "/nonexistent/fmcache-test"

# (command, argv after the command, what the error line must name)
CASES = [
    ("models", ["--nope"], "--nope"),
    ("models", ["extra"], "extra"),
    ("datasets", ["--data-root", NOPE], "--dataset"),  # a required option left out
    ("datasets", ["--dataset", "aptos2019"], "--data-root"),
    ("datasets", ["--dataset", "aptos2019", "--data-root", NOPE, "--json=yes"], "--json"),  # a flag given a value
    ("datasets", ["--dataset", "aptos2019", "--data-root", NOPE, "--export-split"], "--export-split"),  # no value
    ("extract", ["--img-size", "big"], "--img-size"),  # int
    ("extract", ["--batch-size", "1.5"], "--batch-size"),
    ("extract", ["--random-init=1"], "--random-init"),
    ("extract", ["--config", f"{NOPE}.yaml"], f"{NOPE}.yaml"),  # a path that must exist
    ("extract", ["--limit"], "--limit"),
    ("extract", ["--dataset", "aptos2019", "--data-root", NOPE, "--model", "resnet50", "--corrupt"], "--corrupt"),
    ("pixels", ["--img-size", "big"], "--img-size"),
    ("pixels", ["--workers", "1.5"], "--workers"),
    ("pixels", ["--dry-run=1"], "--dry-run"),
    ("pixels", ["--nope"], "--nope"),
    ("info", [], "CACHE"),  # a missing argument
    ("info", [NOPE], NOPE),
    ("info", [NOPE, "again"], "again"),
    ("ls", ["--cache-root"], "--cache-root"),
    ("ls", ["--nope"], "--nope"),
    ("verify", [], "CACHE"),
    ("verify", [NOPE, "--repair=1"], "--repair"),
    ("verify", [NOPE], NOPE),
    ("knn", [NOPE, "--temperature", "hot"], "--temperature"),  # float
    ("knn", [NOPE, "--subset-repeats", "x"], "--subset-repeats"),  # int
    ("knn", [NOPE, "--cpu=1"], "--cpu"),
    ("knn", [NOPE, "--k", "a,b"], "--k"),  # list as text
    ("knn", [NOPE, "--train-fraction", "x"], "--train-fraction"),
    ("knn", [NOPE, "--eval", "train"], "--eval"),  # a choice
    ("knn", [], "CACHE"),
    ("probe", [NOPE, "--subset-repeats", "x"], "--subset-repeats"),
    ("probe", [NOPE, "--epochs", "many"], "--epochs"),
    ("probe", [NOPE, "--weight-decay", "w"], "--weight-decay"),
    ("probe", [NOPE, "--lrs", "abc"], "--lrs"),
    ("probe", [NOPE, "--seeds", "x,y"], "--seeds"),
    ("probe", [NOPE, "--schedule", "warm"], "--schedule"),
    ("probe", [NOPE, "--sklearn=1"], "--sklearn"),
    ("probe", [NOPE, "--plots=1"], "--plots"),  # one half of a --x/--no-x pair
    ("probe", [NOPE, "--epochs"], "--epochs"),
    ("cka", [NOPE, "--batch-size", "x"], "--batch-size"),
    ("cka", [NOPE, "--debiased=1"], "--debiased"),
    ("cka", [NOPE, "--split", "nope"], "--split"),
    ("cka", [], "CACHE"),
    ("transfer", [NOPE, NOPE, "--near-duplicate-bits", "x"], "--near-duplicate-bits"),  # int
    ("transfer", [NOPE, NOPE, "--near-duplicate-bits", "16"], "--near-duplicate-bits"),  # past the bands' guarantee
    ("transfer", [NOPE, NOPE, "--drop-overlap=1"], "--drop-overlap"),
    ("transfer", [NOPE], "TARGET_CACHE"),
    ("transfer", [NOPE, NOPE], NOPE),
    ("label-map", ["isic2019"], "TARGET"),
    ("label-map", ["isic2019", "nope"], "nope"),
    ("finetune", ["--method", "lora", "--lora-rank", "1.5"], "--lora-rank"),
    ("finetune", ["--lora-alpha", "a"], "--lora-alpha"),
    ("finetune", ["--clip", "c"], "--clip"),
    ("finetune", ["--lrs", "x"], "--lrs"),
    ("finetune", ["--amp", "fp8"], "--amp"),
    ("finetune", ["--tensorboard=1"], "--tensorboard"),
    ("finetune", ["--nope"], "--nope"),
    ("report", [NOPE, "--resamples", "x"], "--resamples"),
    ("report", [NOPE, "--seed", "1.5"], "--seed"),
    ("report", [NOPE, "--strict=1"], "--strict"),
    ("report", [NOPE], NOPE),
    ("report", ["--format", "pdf"], "--format"),
    ("grid", [], "CONFIG"),
    ("grid", [f"{NOPE}.yaml"], f"{NOPE}.yaml"),
    ("grid", [f"{NOPE}.yaml", "--jobs", "x"], "--jobs"),
    ("grid", [f"{NOPE}.yaml", "--time", "t"], "--time"),
    ("grid", [f"{NOPE}.yaml", "--dry-run=1"], "--dry-run"),
    ("grid", [f"{NOPE}.yaml", "--slurm-option"], "--slurm-option"),
    ("demo", ["--img-size", "x"], "--img-size"),
    ("demo", ["--epochs", "2.5"], "--epochs"),
    ("demo", ["--quick"], "--quick"),
    ("calibrate", ["--seconds", "s"], "--seconds"),
    ("calibrate", ["--quick=yes"], "--quick"),
    ("calibrate", ["--seconds", "inf"], "--seconds"),
    ("conformance", [], "MODEL"),
    ("conformance", ["deit_base", "--img-size", "x"], "--img-size"),
    ("conformance", ["deit_base", "--tolerance", "tiny"], "--tolerance"),
    ("conformance", ["deit_base", "--random-init=1"], "--random-init"),
]


def _ids() -> list[str]:
    return [f"{command}:{' '.join(argv) or 'nothing'}".replace(NOPE, "NOPE") for command, argv, _ in CASES]


def test_every_registered_command_has_rows():
    registered = set(typer.main.get_command(app).commands)
    assert registered == {command for command, _, _ in CASES}, "add the new command's bad values to CASES"


@pytest.mark.parametrize(("command", "argv", "named"), CASES, ids=_ids())
def test_a_bad_value_is_one_error_line_naming_the_option(command, argv, named):
    result = runner.invoke(app, [command, *argv])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert named in lines[0], lines[0]
    assert "Usage:" not in result.output and "╭" not in result.output


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["probe", NOPE, "--subset-repeats", "x"],
            "error: --subset-repeats: 'x' is not an integer; give a whole number such as 3",
        ),
        (
            ["finetune", "--lora-rank", "1.5"],
            "error: --lora-rank: '1.5' is not an integer; give a whole number such as 3",
        ),
        (["knn", NOPE, "--temperature", "hot"], "error: --temperature: 'hot' is not a number; give a number such as"),
        (["calibrate", "--quick=yes"], "error: --quick: a flag takes no value; give --quick alone, or leave it out"),
        (["probe", NOPE, "--epochs"], "error: --epochs: needs a value; give a whole number such as 3"),
        (["ls", "--cache-roo", "x"], "error: fmcache ls has no option --cache-roo; did you mean --cache-root?"),
        (["info"], "error: fmcache info needs CACHE: A cache directory"),
        (["nosuch"], "error: fmcache: no such command 'nosuch'"),
    ],
    ids=[
        "int",
        "int-not-float",
        "float",
        "flag-with-value",
        "option-without-value",
        "unknown-option",
        "missing-argument",
        "unknown-command",
    ],
)
def test_the_line_says_what_the_option_accepts(argv, expected):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and result.output.strip().startswith(expected), result.output


def test_a_yaml_value_and_the_same_flag_read_alike(tmp_path):
    """--config YAML was the one path that already gave one line: the flag now does too."""
    config = tmp_path / "knn.yaml"
    config.write_text("subset_repeats: x\n")
    from_yaml = runner.invoke(app, ["knn", NOPE, "--config", str(config)])
    from_flag = runner.invoke(app, ["knn", NOPE, "--subset-repeats", "x"])
    for result in (from_yaml, from_flag):
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "--subset-repeats" in lines[0], result.output


def test_verbose_adds_the_traceback_and_keeps_the_line(monkeypatch):
    import fmcache.cli  # noqa: F401  (the app module below is the one the commands registered on)

    monkeypatch.setitem(sys.modules["fmcache.cli.app"].STATE, "verbose", False)  # restored after the test
    result = runner.invoke(app, ["--verbose", "probe", NOPE, "--subset-repeats", "x"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and "Traceback" in result.output
    assert lines[-1].startswith("error: --subset-repeats") and sum(ln.startswith("error:") for ln in lines) == 1


def test_help_is_untouched():
    result = runner.invoke(app, ["probe", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Usage" in result.output and "--subset-repeats" in result.output
    bare = runner.invoke(app, [])
    assert "Commands" in bare.output and "error:" not in bare.output


@pytest.mark.slow
def test_the_console_script_prints_one_line_with_verbose_anywhere():
    for verbose in ([], ["-v"]):
        done = subprocess.run(
            [sys.executable, "-c", "from fmcache.cli import main; main()", "probe", NOPE, "--epochs", "x", *verbose],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and done.stdout == ""
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert lines[-1] == "error: --epochs: 'x' is not an integer; give a whole number such as 3"
        assert len(lines) == 1 or ("Traceback" in done.stderr and verbose)
