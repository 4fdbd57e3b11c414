"""The ``fmcache`` app: its consoles, the error wrapper, library log lines, and building a spec from flags."""

from __future__ import annotations

import functools
import re
import sys
import traceback
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

import fmcache
from fmcache.config import load_config, merge
from fmcache.errors import FmcacheError
from fmcache.protocols import get_protocol
from fmcache.runners import spec_class

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Cache-first evaluation of foundation models.",
)
console = Console()
err_console = Console(stderr=True)
STATE = {"verbose": False}
# terminal escape sequences: OSC (titles, links), CSI (colours) and two-byte ones
_ANSI = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def cli_command(fn):
    """Run a command body; a user error prints one red line and exits 2 (``--verbose`` shows the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FmcacheError as exc:
            if STATE["verbose"]:
                traceback.print_exc()
            # messages built from foreign errors (torch, h5py) may carry colour codes and line breaks: one plain line
            message = " ".join(_ANSI.sub("", str(exc)).split())
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]; rerun the same command to resume")
            raise typer.Exit(code=130) from None

    return wrapper


def log_line(message: str) -> None:
    """Library messages are plain text; the CLI colours them by their first word and prints them as they are."""
    text = str(message)
    style = "bold red" if text.startswith("WARNING") else "yellow" if text.startswith(("warning", "note")) else None
    err_console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"fmcache {fmcache.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks for errors.")] = False,
) -> None:
    """fmcache: extract frozen foundation-model features once, then evaluate from the cache in seconds."""
    STATE["verbose"] = STATE["verbose"] or verbose


# every registered dataset (tests/test_cli.py holds this list to fmcache.data.registry's; the registry imports torch)
DATASET_HELP = (
    "The paper's aptos2019, cbis_ddsm, isic2019, chexpert; external sets pad_ufes20, ham10000, messidor2, idrid, "
    "eyepacs, chestxray14, mimic_cxr, cmmd, vindr_mammo; or csv, imagefolder."
)
SPLIT_HELP = (
    "Split mode. aptos2019, isic2019: seed (default: the paper's row shuffle, or <data-root>/val_ids.json) or "
    "random; isic2019 also lesion (by lesion_id). cbis_ddsm: official (default) or patient (TCIA layout). "
    "chexpert: seed (default) or patient. External sets: external (default: every sample is test), random (by "
    "patient or lesion), official where the release has a split. Any dataset: file:FILE.csv (written by datasets "
    "--export-split)."
)


DATASET_FLAGS = ("uncertain", "split", "layout", "csv")


def protocol_spec(name: str, config: Path | None, flags: dict, **fixed):
    """The spec of protocol ``name`` (its head fixed by its row) from ``--config`` and the flags."""
    protocol = get_protocol(name)
    head = {"head": protocol.head} if protocol.head is not None else {}
    flags = {k: v for k, v in flags.items() if k != "head"}
    return build_spec(spec_class(name), config, flags, **fixed, **head)


def build_spec(spec_cls: type, config: Path | None, flags: dict, **fixed):
    """A command's spec from ``--config`` YAML overridden by the flags that were given (not None), plus ``fixed``.

    The one way every command turns options into its spec: the spec coerces and checks each value itself. Dataset
    options may come as flags, as top-level YAML keys or under ``dataset_options``; flags win. A YAML key that is not
    a field of the spec is refused, naming the valid ones; a flag that the spec has no field for was given for
    another variant (e.g. ``--pool`` with a token head) and is refused too.
    """
    names = {f.name for f in fields(spec_cls)}
    takes_dataset = "dataset_options" in names
    dataset_flags = {k: flags.pop(k, None) for k in DATASET_FLAGS} if takes_dataset else {}
    stray = sorted(k for k, v in flags.items() if v is not None and k not in names)
    if stray:
        raise FmcacheError(f"--{stray[0].replace('_', '-')} does not apply here ({spec_cls.__name__}); drop it")
    allowed = names | (set(DATASET_FLAGS) if takes_dataset else set())
    merged = merge({}, load_config(config), {k: v for k, v in flags.items() if k in names}, allowed, source=str(config))
    merged.update(fixed)
    if takes_dataset:
        options = {**merged.pop("dataset_options", {})}
        options.update(dataset_options(*(merged.pop(k, None) for k in DATASET_FLAGS)))
        options.update(dataset_options(*(dataset_flags[k] for k in DATASET_FLAGS)))
        merged["dataset_options"] = options
    for f in fields(spec_cls):
        required = f.default is MISSING and f.default_factory is MISSING
        if required and merged.get(f.name) is None:
            raise FmcacheError(f"--{f.name.replace('_', '-')} is required (as a flag or in --config)")
    return spec_cls(**merged)


def dataset_options(uncertain: str | None, split: str | None, layout: str | None, csv: str | None) -> dict:
    opts = {"uncertain": uncertain, "split": split, "layout": layout, "csv": csv}
    return {k: v for k, v in opts.items() if v is not None}


def main() -> None:
    """Console-script entry point; ``--verbose`` is accepted anywhere on the command line."""
    if "--verbose" in sys.argv[1:] or "-v" in sys.argv[1:]:
        STATE["verbose"] = True
        sys.argv = [a for a in sys.argv if a not in ("--verbose", "-v")]
    app()
