"""Per-sample metadata columns from a release's table: text as numpy unicode, numbers as float64 with NaN.

A loader declares what it keeps as ``{our name: (release column, kind)}`` (:data:`ColumnSpec`) and calls
:func:`table_columns` with the rows of its samples. Kinds: "text" (stripped cell, ``""`` when blank), "number"
(float, NaN when blank) and "age" (a number that may carry the DICOM age suffix, ``058Y``). Metadata is auxiliary:
a value that does not parse becomes missing and is counted in one problem line per column, never an error, so a
stray cell in an age column cannot block a label set that is fine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

ColumnSpec = Mapping[str, tuple[str, str]]
KINDS = ("text", "number", "age")

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*[Yy]?")


def text(values: Iterable[str]) -> np.ndarray:
    """A unicode column (``""`` stays blank)."""
    return np.array([v.strip() for v in values], dtype=str)


def _number(value: str, kind: str) -> float | None:
    """The float in ``value``; NaN when blank, None when it does not parse."""
    value = value.strip()
    if not value or value.lower() in ("nan", "na", "n/a"):
        return math.nan
    if kind == "age":
        match = _AGE.fullmatch(value)
        return float(match.group(1)) if match else None
    try:
        return float(value)
    except ValueError:
        return None


def numbers(values: Iterable[str], kind: str = "number") -> tuple[np.ndarray, int]:
    """A float64 column (NaN when blank or unparseable) and how many values did not parse."""
    parsed = [_number(v, kind) for v in values]
    bad = sum(v is None for v in parsed)
    return np.array([math.nan if v is None else v for v in parsed], dtype=np.float64), bad


def joined(values: Iterable[str]) -> str:
    """The distinct non-blank values, sorted and joined by "|" (one cell for a sample merged from several rows)."""
    return "|".join(sorted({v for v in values if v}))


def table_columns(
    rows: Sequence[Mapping[str, str]], spec: ColumnSpec, header: Sequence[str], source: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Metadata columns from ``rows`` (one per sample, in index order) and problem lines.

    Release columns absent from ``header`` are left out (one problem line names them); unparseable numbers are
    NaN and counted.
    """
    columns: dict[str, np.ndarray] = {}
    problems: list[str] = []
    absent = [column for column, _ in spec.values() if column not in header]
    if absent:
        problems.append(f"{source} lacks metadata column(s) {', '.join(map(repr, absent))}; left out")
    for name, (column, kind) in spec.items():
        if column not in header:
            continue
        values = [row.get(column, "") for row in rows]
        if kind == "text":
            columns[name] = text(values)
            continue
        columns[name], bad = numbers(values, kind)
        if bad:
            problems.append(f"{source}: {bad} value(s) of {column!r} are not numbers; read as missing")
    return columns, problems


def first_rows(keys: Sequence[str], rows: Sequence[Mapping[str, str]]) -> dict[str, Mapping[str, str]]:
    """The first row of every key (the row a merged duplicate keeps)."""
    first: dict[str, Mapping[str, str]] = {}
    for key, row in zip(keys, rows, strict=True):
        first.setdefault(key, row)
    return first
