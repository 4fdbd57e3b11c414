"""Commands about the machine rather than an experiment: ``calibrate``."""

from __future__ import annotations

from typing import Annotated

import typer

from fmcache.cli.app import app, cli_command, console, log_line


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
