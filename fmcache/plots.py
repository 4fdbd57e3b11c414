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


# -- the report's evidence: reliability diagrams, forest plots, critical-difference diagrams ------------------------


def plot_reliability(path: Path, panels: Mapping[str, Mapping[str, Mapping]], title: str) -> Path:
    """PNG of reliability diagrams, one panel per entry of ``panels`` ({panel title: {line label: bins}}), bins as
    :func:`fmcache.report.calibration.reliability` gives them (``confidence``, ``accuracy``, ``count``); empty bins
    are left out, the diagonal is perfect calibration."""
    fig, axes = new_figure(len(panels))
    for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
        for label, bins in lines.items():
            filled = np.asarray(bins["count"]) > 0
            ax.plot(
                np.asarray(bins["confidence"])[filled],
                np.asarray(bins["accuracy"])[filled],
                marker="o",
                markersize=3,
                label=label,
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (mean predicted probability)")
        ax.set_ylabel("accuracy (observed frequency)")
        ax.set_title(panel, fontsize="medium")
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    return save_png(fig, path)


def plot_forest(path: Path, rows: Mapping[str, Mapping[str, Sequence[float]]], title: str, xlabel: str) -> Path:
    """PNG forest plot: for each row label (a model), each group's point estimate with its CI as a horizontal bar.

    ``rows`` maps a label to {group: (point, low, high, flagged)}; a flagged group (too small, one class) is drawn
    hollow. Groups keep one colour across rows and the order the caller gives them."""
    groups = list(dict.fromkeys(g for per in rows.values() for g in per))  # in the caller's order
    fig, (ax,) = new_figure()
    fig.set_size_inches(7, max(2.5, 0.25 * len(rows) * len(groups) + 1.2))
    step = 0.8 / max(len(groups), 1)
    colours = [f"C{i % 10}" for i in range(len(groups))]
    labels = list(rows)
    for i, label in enumerate(labels):
        for j, group in enumerate(groups):
            if group not in rows[label]:
                continue
            point, low, high, flagged = rows[label][group]
            y = len(labels) - 1 - i + (len(groups) - 1) / 2 * step - j * step
            ax.errorbar(
                [point],
                [y],
                xerr=[[point - low], [high - point]],
                fmt="o",
                color=colours[j],
                capsize=2,
                markerfacecolor="white" if flagged else colours[j],
                label=group if i == 0 or group not in ax.get_legend_handles_labels()[1] else None,
            )
    ax.set_yticks(range(len(labels)), labels[::-1])
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="x-small", title="group (hollow: flagged)", title_fontsize="x-small")
    return save_png(fig, path)


def plot_cd_diagram(
    path: Path, names: Sequence[str], avg_ranks: Sequence[float], cd: float, groups: Sequence[Sequence[str]], title: str
) -> Path:
    """PNG critical-difference diagram (Demšar 2006): the average-rank axis (1 = best, on the left), each model's
    rank with its name (the better half on the left), the CD as a bar, and a thick line joining each group of
    models whose ranks lie within CD of each other (not significantly different)."""
    k = len(names)
    ranks = np.asarray(avg_ranks, dtype=np.float64)
    order = np.argsort(ranks, kind="stable")
    half = (k + 1) // 2
    joined = [g for g in groups if len(g) > 1]
    chars = max(len(n) for n in names) + 7  # " (1.50)"
    width = max(7.0, 0.15 * chars + 3.5)
    pad = 0.075 * chars * max(k - 1, 1) / (width - 0.15 * chars)  # room for the names, in rank units
    fig, (ax,) = new_figure()
    bars_y = 0.25 + 0.15 * np.arange(len(joined))
    first_name = (bars_y[-1] if len(joined) else 0.1) + 0.35
    fig.set_size_inches(width, 1.4 + 0.28 * max(half, k - half) + 0.12 * len(joined))
    ax.set_axis_off()
    ax.set_xlim(1 - pad - 0.1, k + pad + 0.1)
    ax.set_ylim(first_name + 0.3 * max(half, k - half), -0.9)  # y grows downwards
    ax.hlines(0, 1, k, color="black", linewidth=1)
    for r in range(1, k + 1):
        ax.vlines(r, -0.1, 0, color="black", linewidth=1)
        ax.text(r, -0.15, str(r), ha="center", va="bottom", fontsize="small")
    ax.hlines(-0.6, 1, 1 + cd, color="black", linewidth=2)
    ax.vlines([1, 1 + cd], -0.65, -0.55, color="black", linewidth=1)
    ax.text(1 + cd / 2, -0.68, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize="small")
    for y, group in zip(bars_y, joined, strict=False):
        members = [ranks[list(names).index(n)] for n in group]
        ax.hlines(y, min(members) - 0.03, max(members) + 0.03, color="black", linewidth=4)
    for position, index in enumerate(order):
        r, left = ranks[index], position < half
        y = first_name + 0.3 * (position if left else k - 1 - position)
        end = 1 - pad * 0.1 if left else k + pad * 0.1
        ax.vlines(r, 0, y, color="black", linewidth=1)
        ax.hlines(y, min(r, end), max(r, end), color="black", linewidth=1)
        ax.text(
            end + (-0.05 if left else 0.05),
            y,
            f"{names[index]} ({r:.2f})",
            ha="right" if left else "left",
            va="center",
            fontsize="small",
        )
    ax.set_title(title, fontsize="medium")
    return save_png(fig, path)


# -- the report's external validation: source vs target, metric vs corruption severity ------------------------------


def panel_grid(n_panels: int, columns: int = 3):
    """A figure of ``n_panels`` panels, at most ``columns`` a row (5 × 4 in each); the unused cells hidden."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # deferred: matplotlib
    from matplotlib.figure import Figure

    cols = max(1, min(columns, n_panels))
    rows = -(-max(n_panels, 1) // cols)
    fig = Figure(figsize=(5 * cols, 4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _error_bars(ax, xs, points: Sequence[Sequence], **kw) -> None:
    """Points (mean, low, high) at ``xs``: the mean as a marker, the interval as an error bar where it is known."""
    means = np.array([np.nan if p[0] is None else p[0] for p in points], dtype=np.float64)
    lows = np.array([np.nan if p[1] is None else p[1] for p in points], dtype=np.float64)
    highs = np.array([np.nan if p[2] is None else p[2] for p in points], dtype=np.float64)
    known = np.isfinite(lows) & np.isfinite(highs) & np.isfinite(means)
    xs = np.asarray(xs, dtype=np.float64)
    ax.plot(xs, means, linestyle="none", **kw)
    if known.any():
        yerr = np.stack([means[known] - lows[known], highs[known] - means[known]])
        ax.errorbar(xs[known], means[known], yerr=yerr, fmt="none", capsize=3, color=kw.get("color"))


def plot_source_target(path: Path, panels: Mapping[str, Sequence[Mapping]], title: str) -> Path:
    """PNG of each foundation's test metric on its source and on the target, one panel per (source → target) pair.

    ``panels`` maps a panel title to rows ``{"label", "metric", "source": (mean, low, high), "target": (mean, low,
    high)}`` (low/high None where no CI); a grey line joins a foundation's two points."""
    fig, axes = panel_grid(len(panels))
    for ax, (panel, rows) in zip(axes, panels.items(), strict=True):
        xs = np.arange(len(rows))
        for x, row in zip(xs, rows, strict=True):
            a, b = row["source"][0], row["target"][0]
            if a is not None and b is not None:
                ax.plot([x - 0.12, x + 0.12], [a, b], color="grey", linewidth=1)
        _error_bars(ax, xs - 0.12, [r["source"] for r in rows], marker="o", color="C0", label="source (own test)")
        _error_bars(ax, xs + 0.12, [r["target"] for r in rows], marker="s", color="C3", label="target")
        ax.set_xticks(xs, [r["label"] for r in rows], rotation=30, ha="right", fontsize="small")
        ax.set_xlim(-0.6, len(rows) - 0.4)
        metrics = list(dict.fromkeys(str(r["metric"]) for r in rows))
        ax.set_ylabel(f"test {' / '.join(metrics)} (95 % CI)")
        ax.set_title(panel, fontsize="medium")
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    return save_png(fig, path)


def plot_severity_curves(
    path: Path, panels: Mapping[str, Mapping[str, Sequence[Sequence]]], title: str, ylabel: str
) -> Path:
    """PNG of metric against corruption severity, one panel per corruption, one line per foundation with its CI as a
    band. ``panels`` maps a panel title to {line label: [(severity, mean, low, high), ...]} (None where unknown)."""
    fig, axes = panel_grid(len(panels))
    labels = list(dict.fromkeys(label for lines in panels.values() for label in lines))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
        for label, points in lines.items():
            table = np.array([[np.nan if v is None else v for v in p] for p in sorted(points)], dtype=np.float64)
            xs, means, lows, highs = table.T
            ax.plot(xs, means, marker="o", color=colours[label], label=label)
            known = np.isfinite(lows) & np.isfinite(highs)
            if known.any():
                ax.fill_between(xs, lows, highs, where=known, color=colours[label], alpha=0.15, linewidth=0)
        ax.set_xticks(range(0, 6))
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel(ylabel)
        ax.set_title(panel, fontsize="medium")
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    return save_png(fig, path)
