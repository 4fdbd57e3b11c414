"""The ``fmcache`` command line: thin shells over the library (errors → one line, exit 2).

:mod:`~fmcache.cli.app` holds the Typer app and what every command shares; the commands live by stage in
:mod:`~fmcache.cli.stage_one`, :mod:`~fmcache.cli.stage_two` and :mod:`~fmcache.cli.runs`, which register themselves
on the app when imported here. ``fmcache.cli:main`` is the console script.
"""

# isort: off
# importing a module registers its commands; this order is the order of `fmcache --help`
from fmcache.cli import stage_one  # noqa: F401
from fmcache.cli import stage_two  # noqa: F401
from fmcache.cli import runs  # noqa: F401
from fmcache.cli import tools  # noqa: F401

# isort: on
from fmcache.cli.app import app, main

__all__ = ["app", "main"]
