"""Commands about the machine and the models rather than an experiment: ``calibrate``, ``conformance``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fmcache.cli.app import app, cli_command, console, err_console, log_line


@app.command("calibrate")
@cli_command
def calibrate_cmd(
    seconds: Annotated[float, typer.Option(help="Time budget of the measurement, seconds.")] = 60.0,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes and three rounds (tests, a first look).")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
) -> None:
    """Measure this device's rates (foundation forward, head step, data path, disk) for `fmcache grid --dry-run`.

    Kept per device in ~/.cache/fmcache/calibration.json ($FMCACHE_CALIBRATION overrides the path); the dry run
    uses this machine's entry, or another with --device-rate NAME.
    """
    from fmcache.cost.calibrate import calibrate  # deferred: torch, timm (the probes build models)

    entry = calibrate(seconds=seconds, quick=quick, device=device, log=log_line)
    console.print(
        f"calibrated {entry['name']} in {entry['seconds']:.0f} s → {entry['path']}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command("conformance")
@cli_command
def conformance_cmd(
    model: Annotated[str, typer.Argument(help="Registry model (see `fmcache models`).")],
    weights: Annotated[Path | None, typer.Option(help="The release file to check (its original layout).")] = None,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Random weights saved in the release's layout (a self-test).")
    ] = False,
    img_size: Annotated[int | None, typer.Option(help="Input size (default: the cache's, else the model's).")] = None,
    tolerance: Annotated[float, typer.Option(help="Max |difference| allowed per output, fp32.")] = 1e-5,
    cache: Annotated[
        Path | None, typer.Option(help="A cache extracted from --weights: the verdict goes into its manifest.")
    ] = None,
) -> None:
    """Check fmcache's model against the official implementation for the same weights: every cached layer, the
    paper's pooled feature and the DeiT head's tokens (fp32, CPU). Exit 1 when an output differs."""
    from fmcache.extract.conformance import ConformanceSpec, run_conformance  # deferred: torch, the backends

    spec = ConformanceSpec(model, weights, random_init, img_size, tolerance, cache)
    verdict = run_conformance(spec)
    table = Table(title=f"{verdict['model']} against {verdict['reference']} at {verdict['img_size']} px")
    for column in ("output", "max |diff|", "verdict"):
        table.add_column(column)
    for layer in verdict["layers"]:
        table.add_row(layer["name"], f"{layer['max_abs_diff']:.2e}", "ok" if layer["passed"] else "DIFFERS")
    console.print(table)
    if verdict.get("recorded_in"):
        console.print(f"verdict recorded in {verdict['recorded_in']}/manifest.json", markup=False, highlight=False)
    if not verdict["passed"]:
        err_console.print(verdict["message"], markup=False, highlight=False)
        raise typer.Exit(1)
