"""User-facing errors.

An :class:`FmcacheError` carries one line that names what is wrong and how to fix it. The CLI prints that
line and exits with code 2 (no traceback unless ``--verbose``). Library code raises it for bad user input;
``assert`` is reserved for internal invariants.
"""

from __future__ import annotations


class FmcacheError(Exception):
    """Bad input or environment, explained in one line for the user."""

    exit_code = 2
