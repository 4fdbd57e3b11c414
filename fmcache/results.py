"""Result files of stage-two commands: JSON + CSV written atomically, and PNG plots.

Every file goes to a temporary name in the target folder and is moved into place with ``os.replace``,
so a crash never leaves a half-written result that looks valid.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import fmcache
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes, ensure_writable_dir


def to_jsonable(obj):
    """``obj`` with numpy values, tuples, paths and dataclasses turned into JSON types.

    Dict keys become strings; NaN and infinities become None (strict JSON has no NaN).
    """
    if isinstance(obj, Mapping):
        return {_key(k): to_jsonable(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj))
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _key(k) -> str:
    if isinstance(k, np.generic):
        k = k.item()
    return k if isinstance(k, str) else json.dumps(k) if isinstance(k, bool) else str(k)


def _csv_bytes(rows: Sequence[Mapping]) -> bytes:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(_key(k) for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", lineterminator="\n")
    if columns:
        writer.writeheader()
    for row in rows:
        writer.writerow({_key(k): _csv_cell(v) for k, v in row.items()})
    return buffer.getvalue().encode()


def _csv_cell(value):
    value = to_jsonable(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else value


def write_results(out_dir: Path, stem: str, payload: Mapping, rows: Sequence[Mapping]) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (``payload``, indent 2) and ``<stem>.csv`` (``rows``) into ``out_dir``.

    The caller's payload should carry the cache key, settings and timings; ``fmcache_version`` and
    ``written_at`` (UTC ISO time) are added here. The CSV's columns are the union of the rows' keys in
    first-seen order. The CSV is written first, so an existing JSON always has its CSV. Returns the two
    paths; raises :class:`FmcacheError` if the folder cannot be written.
    """
    out_dir = ensure_writable_dir(Path(out_dir))
    document = {
        **to_jsonable(payload),
        "fmcache_version": fmcache.__version__,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    atomic_write_bytes(csv_path, _csv_bytes(rows))
    atomic_write_bytes(json_path, (json.dumps(document, indent=2, allow_nan=False) + "\n").encode())
    return json_path, csv_path


def _new_figure(n_panels: int = 1):
    # Figure + Agg canvas directly: no pyplot, so no global backend switch and no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * n_panels, 4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def _save_png(fig, path: Path) -> Path:
    path = Path(path)
    ensure_writable_dir(path.parent)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_knn_vs_k(path: Path, results: Mapping) -> Path:
    """PNG of the k-NN metric against k, one line per split, from a ``knn.knn_evaluate`` result."""
    fig, (ax,) = _new_figure()
    for split, per_k in results["splits"].items():
        ks = sorted(per_k, key=int)
        ax.plot([int(k) for k in ks], [per_k[k]["value"] for k in ks], marker="o", label=split)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel(results["metric"])
    ax.set_title(f"k-NN (T={results['temperature']})")
    ax.legend()
    return _save_png(fig, path)


def plot_knn_vs_layer(path: Path, results: Mapping) -> Path:
    """PNG of the k-NN metric against layer: one panel per split, one line per k.

    ``results`` maps layer (int or name, in plotting order) to a ``knn.knn_evaluate`` result.
    """
    if not results:
        raise FmcacheError("no k-NN results to plot; evaluate at least one layer")
    layers = list(results)
    first = results[layers[0]]
    splits = list(first["splits"])
    fig, axes = _new_figure(len(splits))
    positions = range(len(layers))
    for ax, split in zip(axes, splits, strict=True):
        for k in first["splits"][split]:
            values = [results[layer]["splits"][split][k]["value"] for layer in layers]
            ax.plot(positions, values, marker="o", label=f"k={k}")
        ax.set_xticks(list(positions), [str(layer) for layer in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel(first["metric"])
        ax.set_title(f"k-NN on {split}")
        ax.legend()
    return _save_png(fig, path)


def plot_probe_curves(path: Path, curves_by_lr: Mapping, metric: str = "val metric") -> Path:
    """PNG of val metric per epoch, one line per LR (mean over seeds, shaded ± std).

    ``curves_by_lr`` maps LR to a (seeds, epochs) array, e.g. ``ProbeResult.curves``.
    """
    fig, (ax,) = _new_figure()
    for lr, curve in curves_by_lr.items():
        c = np.atleast_2d(np.asarray(curve, dtype=np.float64))
        epochs = np.arange(1, c.shape[1] + 1)
        mean, std = c.mean(0), c.std(0)
        ax.plot(epochs, mean, label=f"lr={float(lr):g}")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("linear probe (val)")
    ax.legend()
    return _save_png(fig, path)


def plot_probe_vs_layer(path: Path, per_layer: Mapping, metric: str) -> Path:
    """PNG of the probe's test metric (best LR, mean ± std over seeds) against layer."""
    fig, (ax,) = _new_figure()
    layers = list(per_layer)
    means = np.array([per_layer[n]["test_mean"] for n in layers], dtype=np.float64)
    stds = np.array([per_layer[n]["test_std"] for n in layers], dtype=np.float64)
    ax.errorbar([int(n) for n in layers], means, yerr=np.nan_to_num(stds), marker="o", capsize=3)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"test {metric} (best LR, mean ± std over seeds)")
    ax.set_title("linear probe per layer")
    return _save_png(fig, path)


def plot_cka_heatmap(
    path: Path, matrix: np.ndarray, row_labels: Sequence, col_labels: Sequence, title: str, ylabel: str, xlabel: str
) -> Path:
    """PNG heatmap of a CKA matrix: rows and columns labelled with their layers, a colour bar from 0 to 1."""
    matrix = np.asarray(matrix, dtype=np.float64)
    fig, (ax,) = _new_figure()
    fig.set_size_inches(max(4.5, 0.35 * len(col_labels) + 2.5), max(4.0, 0.35 * len(row_labels) + 1.5))
    # row 0 at the bottom, as in the paper's layer-by-layer figures
    image = ax.imshow(matrix, origin="lower", vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="linear CKA")
    return _save_png(fig, path)
