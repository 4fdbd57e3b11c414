"""A label-efficiency curve from its subset runs: the curve's own folder and its rows (val and test mean ± std over
repeats × seeds per amount and layer). The runs themselves are ordinary results (:func:`fmcache.results.train_subset`);
``fmcache knn|probe`` write the curve, ``fmcache report`` redraws it across models."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fmcache.protocols import get_protocol
from fmcache.results import LABEL_EFFICIENCY, result_folder, train_subset


def label_efficiency_folder(root: Path, dataset: str, model: str, key: str, protocol: str, settings: Mapping) -> Path:
    """``<root>/<dataset>/<model>/<key12>/label_efficiency/<protocol>-<hash12>``: a curve's own files (no result.json,
    so neither the report nor the grid takes it for a result)."""
    folder = result_folder(root, dataset, model, key, protocol, settings)
    return folder.parent / LABEL_EFFICIENCY / folder.name


def _pooled(parts: Sequence[tuple[float, float, int]]) -> tuple[float | None, float | None, int]:
    """Mean and sample std (ddof 1) of all values of groups given as (mean, std, n): repeats × seeds as one sample."""
    parts = [(float(m), float(s or 0.0), int(n)) for m, s, n in parts if m is not None and n]
    total = sum(n for _, _, n in parts)
    if not total:
        return None, None, 0
    mean = sum(m * n for m, _, n in parts) / total
    squares = sum((n - 1) * s * s + n * m * m for m, s, n in parts) - total * mean * mean
    return mean, math.sqrt(max(squares, 0.0) / (total - 1)) if total > 1 else 0.0, total


def _knn_points(summary: Mapping) -> dict[str, dict]:
    """Per layer, the k chosen on val (test without val; the smallest k on ties) and its val and test values."""
    by_layer: dict[str, dict[str, dict[int, float]]] = {}
    for row in summary.get("rows") or []:
        if row.get("value") is not None:
            by_layer.setdefault(str(row["layer"]), {}).setdefault(row["split"], {})[int(row["k"])] = row["value"]
    points = {}
    for layer, splits in by_layer.items():
        chooser = splits.get("val") or splits.get("test") or {}
        if not chooser:
            continue
        k = max(chooser, key=lambda kk: (chooser[kk], -kk))
        points[layer] = {s: (splits[s].get(k), 0.0, 1) for s in ("val", "test") if k in splits.get(s, {})}
    return points


def subset_points(document: Mapping) -> dict[str, dict]:
    """Per layer, ``{"val": (mean, std, n), "test": (...)}`` of one result: a head grid's best-LR mean ± std over
    seeds (n seeds), or k-NN's value at the k chosen on val (n 1)."""
    summary = document.get("summary") or {}
    if get_protocol(str(document.get("protocol"))).summary == "rows":  # k-NN: a value per k, chosen on val
        return _knn_points(summary)
    per_layer = summary.get("per_layer") or {str((document.get("settings") or {}).get("layers", ["?"])[-1]): summary}
    return {
        str(layer): {s: (e.get(f"{s}_mean"), e.get(f"{s}_std"), e.get("n_seeds") or 1) for s in ("val", "test")}
        for layer, e in per_layer.items()
    }


def label_efficiency_rows(documents: Sequence[Mapping]) -> list[dict]:
    """One row per (amount, layer) of subset results of one curve: val and test mean ± std over repeats × seeds."""
    groups: dict[tuple, list] = {}
    for doc in documents:
        subset = train_subset(doc)
        if subset is None:
            continue
        axis = "fraction" if subset.get("fraction") is not None else "per_class"
        n_train = (doc.get("subset") or {}).get("n_train")
        for layer, point in subset_points(doc).items():
            groups.setdefault((axis, float(subset[axis]), layer), []).append((point, n_train, doc.get("metric")))
    rows = []
    for (axis, x, layer), items in sorted(groups.items(), key=lambda kv: (kv[0][0], _layer_order(kv[0][2]), kv[0][1])):
        row = {"axis": axis, axis: x, "layer": layer, "metric": items[0][2], "repeats": len(items)}
        counts = [n for _, n, _ in items if n is not None]
        row["n_train"] = float(np.mean(counts)) if counts else None
        for split in ("test", "val"):
            mean, std, n = _pooled([p[split] for p, _, _ in items if split in p])
            row.update({f"{split}_mean": mean, f"{split}_std": std, f"{split}_n": n})
        rows.append(row)
    return rows


def _layer_order(layer: str) -> tuple[int, str]:
    return (int(layer), "") if str(layer).lstrip("-").isdigit() else (10**9, str(layer))
