"""The ``fmcache`` app: its consoles, the error wrapper, library log lines, and building a spec from flags."""

from __future__ import annotations

import contextlib
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
from typer.core import TyperGroup

import fmcache
from fmcache.config import load_config, merge
from fmcache.errors import FmcacheError
from fmcache.protocols import get_protocol
from fmcache.runners import spec_class

try:  # a recent typer carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - an older typer on click itself
    from click import exceptions as click_errors

# what each option type accepts, for a value click could not convert: (what it is not, what to give)
ACCEPTS = {
    int: ("an integer", "give a whole number such as 3"),
    float: ("a number", "give a number such as 0.5 or 1e-4"),
    bool: ("yes or no", "give the flag alone, or leave it out"),
    Path: ("a path", "give a file or folder path"),
}


@contextlib.contextmanager
def _one_line_usage_errors(group, ctx=None):
    """Turn click's usage errors into one ``error:`` line and exit 2; ``fmcache`` alone still prints the help.

    ``ctx`` is the group's context once it parsed: a subcommand's parser raises without a context of its own."""
    try:
        yield
    except click_errors.UsageError as exc:
        if isinstance(exc, getattr(click_errors, "NoArgsIsHelpError", ())):
            raise
        if STATE["verbose"]:
            traceback.print_exc()
        sub = exc.ctx.info_name if exc.ctx is not None and exc.ctx.parent is not None else None
        sub = sub or (ctx.invoked_subcommand if ctx is not None else None)
        command = group.get_command(ctx, sub) if sub else group
        print_error(usage_line(exc, command, f"fmcache {sub}" if sub else "fmcache"))
        raise typer.Exit(code=2) from None


def usage_line(exc: Exception, command, title: str) -> str:
    """One line for a click usage error of ``command`` (``title``: as typed): the option or argument at fault and
    what it accepts."""
    if isinstance(exc, click_errors.MissingParameter) and exc.param is not None:
        return f"{title} needs {param_name(exc.param)}: {first_sentence(exc.param)}"
    if isinstance(exc, click_errors.BadParameter) and exc.param is not None:
        return f"{param_name(exc.param)}: {bad_value(exc)}"
    if isinstance(exc, click_errors.NoSuchOption):
        maybe = f"; did you mean {', '.join(sorted(exc.possibilities))}?" if exc.possibilities else ""
        return f"{title} has no option {exc.option_name}{maybe} (see {title} --help)"
    if isinstance(exc, click_errors.BadOptionUsage):
        return f"{exc.option_name}: {_option_usage(exc.option_name, command)}"
    message = exc.format_message().rstrip(".")
    return f"{title}: {message[:1].lower()}{message[1:]} (see {title} --help)"


def param_name(param) -> str:
    """An option as typed (its long flag) or an argument as the help shows it (CACHE)."""
    opts = [o for o in getattr(param, "opts", []) if o.startswith("-")]
    return max(opts, key=len) if opts else str(param.name).upper()


def first_sentence(param) -> str:
    help_text = " ".join(str(getattr(param, "help", None) or "a value").split())
    return help_text.split(". ")[0].rstrip(".")


def accepts(param) -> tuple[str, str] | None:
    """(what the value is not, what to give) for the option's type; None for a type without a sentence."""
    descriptor = getattr(param, "type_descriptor", None)
    choices = getattr(descriptor, "choices", None)
    if choices:
        return "one of the choices", f"use {', '.join(str(getattr(c, 'value', c)) for c in choices)}"
    return ACCEPTS.get(getattr(descriptor, "annotation", None))


def bad_value(exc) -> str:
    """``'x' is not an integer; give a whole number such as 3``, from the value click could not convert."""
    errors = getattr(exc.__cause__, "errors", None)
    given = errors()[0].get("input") if callable(errors) and errors() else None
    said = accepts(exc.param)
    if given is None or said is None:
        return exc.message[:1].lower() + exc.message[1:]
    return f"{given!r} is not {said[0]}; {said[1]}"


def _option_usage(option: str, command) -> str:
    """A flag given a value (``--quick=yes``), or an option given none (``--epochs`` last)."""
    found = [p for p in getattr(command, "params", []) if option in (*p.opts, *p.secondary_opts)]
    if found and getattr(found[0], "is_flag", False):
        return f"a flag takes no value; give {option} alone, or leave it out"
    said = accepts(found[0]) if found else None
    return "needs a value" + (f"; {said[1]}" if said else f": {first_sentence(found[0])}" if found else "")


class OneLineGroup(TyperGroup):
    """The app's group: click's own usage errors (a bad type, an unknown option, a missing argument) read like
    every other error, one ``error:`` line and exit 2, instead of typer's usage box. Help is untouched."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors(self):
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_usage_errors(self, ctx):  # the subcommand parses its options in here
            return super().invoke(ctx)


app = typer.Typer(
    cls=OneLineGroup,
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
            print_error(str(exc))
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]; rerun the same command to resume")
            raise typer.Exit(code=130) from None

    return wrapper


def print_error(message: str) -> None:
    """``error: …`` on stderr, on one line: messages built from foreign errors (torch, h5py) may carry colour codes
    and line breaks."""
    message = " ".join(_ANSI.sub("", str(message)).split())
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


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
BEST_EPOCH_HELP = (
    "Best epoch on val: seed (the val metric rounded to 3 decimals, strictly better: a tie keeps the earlier epoch, "
    "as the seed) or exact (unrounded)."
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
