"""The PNG plots a run writes beside its results (and the report's figures draw with): matplotlib's Agg canvas,
written atomically like every result file."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes, ensure_writable_dir


def new_figure(n_panels: int = 1):
    # Figure + Agg canvas directly: no pyplot, so no global backend switch and no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * n_panels, 4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def save_png(fig, path: Path) -> Path:
    path = Path(path)
    ensure_writable_dir(path.parent)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_knn_vs_k(path: Path, results: Mapping) -> Path:
    """PNG of the k-NN metric against k, one line per split, from a ``knn.knn_evaluate`` result."""
    fig, (ax,) = new_figure()
    for split, per_k in results["splits"].items():
        ks = sorted(per_k, key=int)
        ax.plot([int(k) for k in ks], [per_k[k]["value"] for k in ks], marker="o", label=split)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel(results["metric"])
    ax.set_title(f"k-NN (T={results['temperature']})")
    ax.legend()
    return save_png(fig, path)


def plot_knn_vs_layer(path: Path, results: Mapping) -> Path:
    """PNG of the k-NN metric against layer: one panel per split, one line per k.

    ``results`` maps layer (int or name, in plotting order) to a ``knn.knn_evaluate`` result.
    """
    if not results:
        raise FmcacheError("no k-NN results to plot; evaluate at least one layer")
    layers = list(results)
    first = results[layers[0]]
    splits = list(first["splits"])
    fig, axes = new_figure(len(splits))
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
    return save_png(fig, path)


def plot_probe_curves(path: Path, curves_by_lr: Mapping, metric: str = "val metric") -> Path:
    """PNG of val metric per epoch, one line per LR (mean over seeds, shaded ± std).

    ``curves_by_lr`` maps LR to a (seeds, epochs) array, e.g. ``ProbeResult.curves``.
    """
    fig, (ax,) = new_figure()
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
    return save_png(fig, path)


def plot_probe_vs_layer(
    path: Path, per_layer: Mapping, metric: str, title: str = "linear probe per layer", xlabel: str = "layer"
) -> Path:
    """PNG of a head grid's test metric (best LR, mean ± std over seeds) against layer."""
    fig, (ax,) = new_figure()
    layers = list(per_layer)
    means = np.array([per_layer[n]["test_mean"] for n in layers], dtype=np.float64)
    stds = np.array([per_layer[n]["test_std"] for n in layers], dtype=np.float64)
    numeric = all(str(n).lstrip("-").isdigit() for n in layers)
    xs = [int(n) for n in layers] if numeric else list(range(len(layers)))  # "paper" tokens: placed after the blocks
    ax.errorbar(xs, means, yerr=np.nan_to_num(stds), marker="o", capsize=3)
    if not numeric:
        ax.set_xticks(xs, [str(n) for n in layers])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {metric} (best LR, mean ± std over seeds)")
    ax.set_title(title)
    return save_png(fig, path)


def plot_cka_heatmap(
    path: Path, matrix: np.ndarray, row_labels: Sequence, col_labels: Sequence, title: str, ylabel: str, xlabel: str
) -> Path:
    """PNG heatmap of a CKA matrix: rows and columns labelled with their layers, a colour bar from 0 to 1."""
    matrix = np.asarray(matrix, dtype=np.float64)
    fig, (ax,) = new_figure()
    fig.set_size_inches(max(4.5, 0.35 * len(col_labels) + 2.5), max(4.0, 0.35 * len(row_labels) + 1.5))
    # row 0 at the bottom, as in the paper's layer-by-layer figures
    image = ax.imshow(matrix, origin="lower", vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="linear CKA")
    return save_png(fig, path)


# -- label efficiency (``--train-fraction`` / ``--train-per-class``) ------------------------------------------------
# A subset run is a plain result whose settings hold ``train_subset`` ({fraction or per_class, repeat, sampling,
# val_follows}), one folder per (fraction, repeat); ``subsets.npz`` beside it holds its rows. The runner also writes
# ``<root>/<dataset>/<model>/<key12>/label_efficiency/<protocol>-<hash12>/`` (label_efficiency.csv and .png, every
# subset in subsets.npz, label_efficiency.json last); the report reads only the results themselves.


def plot_label_efficiency(path: Path, lines: Mapping[str, Sequence[Mapping]], metric: str, title: str) -> Path:
    """PNG of test metric against the train amount (fraction on a log axis, or samples per class), one line per
    label, mean ± std over repeats × seeds; ``lines`` maps a label to :func:`fmcache.label_efficiency.label_efficiency_rows` rows."""
    fig, (ax,) = new_figure()
    axis = "fraction"
    for label, rows in lines.items():
        rows = sorted(rows, key=lambda r: r[r["axis"]])
        if not rows:
            continue
        axis = rows[0]["axis"]
        xs = [r[axis] for r in rows]
        means = [np.nan if r["test_mean"] is None else r["test_mean"] for r in rows]
        stds = [r["test_std"] or 0.0 for r in rows]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the train split (labelled)" if axis == "fraction" else "train samples per class")
    ax.set_ylabel(f"test {metric} (mean ± std over repeats × seeds)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return save_png(fig, path)
