"""Counts per split and class of a :class:`DatasetIndex`, as JSON-able data and as text for the CLI."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fmcache.data.corruptions import corruptions_for, modality_of
from fmcache.data.index import SPLITS, DatasetIndex

COLUMNS = (*SPLITS, "total")


def _single_counts(index: DatasetIndex, rows: np.ndarray) -> dict:
    counts = np.bincount(index.labels[rows], minlength=index.num_classes)
    return {"n": len(rows), "classes": {name: int(c) for name, c in zip(index.class_names, counts, strict=True)}}


def _multi_counts(index: DatasetIndex, rows: np.ndarray) -> dict:
    labels = index.labels[rows]
    columns = {}
    for j, name in enumerate(index.class_names):
        col = labels[:, j]
        columns[name] = {
            "positive": int(np.sum(col == 1)),
            "negative": int(np.sum(col == 0)),
            "unknown": int(np.sum(np.isnan(col))),
        }
    return {"n": len(rows), "labels": columns}


def _metadata_summary(index: DatasetIndex) -> dict:
    """Kind and blank count of every metadata column."""
    summary = {}
    for name, column in index.metadata.items():
        number = column.dtype.kind == "f"
        blank = int(np.isnan(column).sum()) if number else int(np.sum(column == ""))
        summary[name] = {"kind": "number" if number else "text", "blank": blank}
    return summary


def describe(index: DatasetIndex) -> dict:
    """Counts for each split and in total: per class (single-label) or positive/negative/unknown per label
    column (multi-label), plus the split info, options, metadata columns (kind, blank cells), the bootstrap unit
    with its number of units, the raw label columns and problems. JSON-able."""
    count = _multi_counts if index.multilabel else _single_counts
    rows = {s: index.indices(s) for s in SPLITS} | {"total": np.arange(len(index))}
    return {
        "name": index.name,
        "root": str(index.root),
        "num_images": len(index),
        "multilabel": index.multilabel,
        "class_names": list(index.class_names),
        "split_info": index.split_info,
        "options": index.options,
        "splits": {name: count(index, r) for name, r in rows.items()},
        "metadata": _metadata_summary(index),
        "group_unit": index.group_unit,
        "units": len(np.unique(index.groups())),
        "raw_label_names": list(index.raw_label_names),
        "corruptions": {"modality": modality_of(index.name), "names": corruptions_for(index.name)},
        "problems": list(index.problems),
    }


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        # First column (names) left-aligned, counts right-aligned.
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells)

    return [f"[bold]{fmt(header)}[/bold]", *(fmt(row) for row in body)]


def format_description(desc: dict) -> str:
    """Human-readable text of :func:`describe`'s output (rich markup; class names are escaped)."""
    from rich.markup import escape

    splits = desc["splits"]
    lines = [
        f"[bold]{escape(desc['name'])}[/bold]  {desc['num_images']} images  root: {escape(desc['root'])}",
        f"split: {escape(str(desc['split_info']))}",
    ]
    if desc["options"]:
        lines.append(f"options: {escape(str(desc['options']))}")
    header = ["", *COLUMNS]
    body = [["images", *(str(splits[c]["n"]) for c in COLUMNS)]]
    if desc["multilabel"]:
        header[0] = "label (pos/neg/unknown)"
        for name in desc["class_names"]:
            cells = [splits[c]["labels"][name] for c in COLUMNS]
            body.append([escape(name), *(f"{x['positive']}/{x['negative']}/{x['unknown']}" for x in cells)])
    else:
        header[0] = "class"
        body += [[escape(name), *(str(splits[c]["classes"][name]) for c in COLUMNS)] for name in desc["class_names"]]
    lines += _table(header, body)
    lines += _annotation_lines(desc, escape)
    if desc.get("corruptions"):
        corruptions = desc["corruptions"]
        lines.append(
            f"corruptions ({corruptions['modality']}; extract --corrupt NAME:1-5): {', '.join(corruptions['names'])}"
        )
    lines += [f"[yellow]note:[/yellow] {escape(p)}" for p in desc["problems"]]
    return "\n".join(lines)


def _annotation_lines(desc: dict, escape: Callable[[str], str]) -> list[str]:
    """The metadata, bootstrap-unit and raw-label lines (descriptions made before they existed have none)."""
    lines = []
    if desc.get("metadata"):
        cells = [
            f"{name} ({info['kind']}{', ' + str(info['blank']) + ' blank' if info['blank'] else ''})"
            for name, info in desc["metadata"].items()
        ]
        lines.append(f"metadata: {escape(', '.join(cells))}")
    if "units" in desc:
        unit = desc.get("group_unit") or "image"
        lines.append(f"bootstrap unit: {escape(unit)} ({desc['units']} units)")
    if desc.get("raw_label_names"):
        lines.append(f"raw labels: {escape(', '.join(desc['raw_label_names']))}")
    return lines


def empty_split_warning(name: str, counts: dict[str, int]) -> str | None:
    """One line when the train, val or test split is empty (``extract`` refuses it, ``datasets`` warns), else None.

    Shared by both commands so the user sees the same counts and fix before and during extraction.
    """
    empty = [s for s in SPLITS if not counts.get(s, 0)]
    if not empty:
        return None
    shown = ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS)
    return (
        f"dataset {name} has an empty {' and '.join(empty)} split ({shown}); k-NN and probes need all three: "
        "add images, or change the split (--split, its fractions) or --limit"
    )
