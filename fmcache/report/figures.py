"""The report's figures (PNG, matplotlib's Agg canvas, no pyplot): one function per figure kind.

Each returns the figures it drew as :class:`Figure` records; a kind with nothing to draw (no multi-layer result, no
partly frozen fine-tune) returns none rather than an empty plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmcache.report.tables import HEAD_NAMES, HEADS, REGIMES, ordered_datasets, ordered_models, table1_cells
from fmcache.results import new_figure, plot_cka_heatmap, safe_name, save_png

LAYER_PROTOCOLS = {"knn": "k-NN", "probe_linear": "linear probe", "probe_deit": "DeiT head (decapitation)",
                   "probe_attentive": "attentive head"}  # fmt: skip


@dataclass
class Figure:
    name: str
    title: str
    path: Path


def _finish(
    fig, ax, out: Path, name: str, caption: str, *, title: str, ylabel: str, xlabel: str | None = None
) -> Figure:
    """Label a one-panel figure, add its legend and save it as ``out/<name>.png``."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return Figure(name, caption, save_png(fig, out / f"{name}.png"))


def _layer_key(layer) -> tuple[int, str]:
    text = str(layer)
    return (int(text), "") if text.lstrip("-").isdigit() else (10**9, text)


def _curve_from_probe(doc: dict) -> tuple[list, list[float], list[float]] | None:
    per_layer = (doc.get("summary") or {}).get("per_layer") or {}
    if len(per_layer) < 2:
        return None
    layers = sorted(per_layer, key=_layer_key)
    means = [per_layer[n].get("test_mean") for n in layers]
    stds = [per_layer[n].get("test_std") or 0.0 for n in layers]
    return layers, [np.nan if m is None else m for m in means], stds


def _curve_from_knn(doc: dict) -> tuple[list, list[float], list[float]] | None:
    summary = doc.get("summary") or {}
    k = (summary.get("best") or {}).get("k")
    points = {r["layer"]: r["value"] for r in summary.get("rows") or [] if r.get("split") == "test" and r.get("k") == k}
    if len(points) < 2:
        return None
    layers = sorted(points, key=_layer_key)
    return layers, [np.nan if points[n] is None else points[n] for n in layers], [0.0] * len(layers)


def metric_vs_layer(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Test metric against layer, one line per model: k-NN (best k), linear probe and the DeiT decapitation curve."""
    figures = []
    for dataset in ordered_datasets(docs):
        for protocol, label in LAYER_PROTOCOLS.items():
            curves = {}
            for doc in docs:
                if doc["dataset"] == dataset and doc.get("protocol") == protocol:
                    curve = _curve_from_knn(doc) if protocol == "knn" else _curve_from_probe(doc)
                    if curve is not None:
                        curves[doc["model"]] = (curve, doc.get("metric"))
            if not curves:
                continue
            fig, (ax,) = new_figure()
            for model, ((layers, means, stds), _) in sorted(curves.items()):
                xs = [_layer_key(n)[0] for n in layers]
                ax.errorbar(xs, means, yerr=np.nan_to_num(stds), marker="o", capsize=3, label=model)
            metric = next(iter(curves.values()))[1]
            figures.append(_finish(fig, ax, out, f"{safe_name(dataset)}_{protocol}_vs_layer",
                                   f"{dataset}: {label}, metric vs layer", title=f"{dataset}: {label} per layer",
                                   ylabel=f"test {metric}", xlabel="layer"))  # fmt: skip
    return figures


def knn_vs_k(docs: Sequence[dict], out: Path) -> list[Figure]:
    """k-NN test metric against k at each model's chosen layer, one line per model."""
    figures = []
    for dataset in ordered_datasets(docs):
        lines = {}
        for doc in docs:
            if doc["dataset"] != dataset or doc.get("protocol") != "knn":
                continue
            summary = doc.get("summary") or {}
            layer = (summary.get("best") or {}).get("layer")
            points = {int(r["k"]): r["value"] for r in summary.get("rows") or []
                      if r.get("split") == "test" and r.get("layer") == layer and r.get("value") is not None}  # fmt: skip
            if points:
                lines[doc["model"]] = (points, doc.get("metric"))
        if not lines:
            continue
        fig, (ax,) = new_figure()
        for model, (points, _) in sorted(lines.items()):
            ks = sorted(points)
            ax.plot(ks, [points[k] for k in ks], marker="o", label=model)
        ax.set_xscale("log")
        figures.append(_finish(fig, ax, out, f"{safe_name(dataset)}_knn_vs_k", f"{dataset}: k-NN vs k",
                               title=f"{dataset}: k-NN vs k", ylabel=f"test {next(iter(lines.values()))[1]}",
                               xlabel="k"))  # fmt: skip
    return figures


def _frozen_blocks(settings: dict) -> int | None:
    freeze = settings.get("freeze", "none")
    if freeze is None or str(freeze) == "none":
        return 0
    text = str(freeze)
    return int(text) if text.isdigit() else None


def frozen_blocks(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Fine-tuning test metric against the number of frozen blocks (paper Fig. 4), one line per model and head."""
    figures = []
    for dataset in ordered_datasets(docs):
        lines: dict[str, dict[int, tuple[float, float]]] = {}
        metric = None
        for doc in docs:
            if doc["dataset"] != dataset or not str(doc.get("protocol", "")).startswith("finetune"):
                continue
            settings = doc.get("settings") or {}
            k = _frozen_blocks(settings)
            summary = doc.get("summary") or {}
            if k is None or settings.get("drop_after") is not None or summary.get("test_mean") is None:
                continue
            label = f"{doc['model']} + {HEAD_NAMES.get(doc['protocol'].split('_')[1], '?')}"
            lines.setdefault(label, {})[k] = (summary["test_mean"], summary.get("test_std") or 0.0)
            metric = doc.get("metric")
        lines = {label: points for label, points in lines.items() if len(points) >= 2}
        if not lines:
            continue
        fig, (ax,) = new_figure()
        for label, points in sorted(lines.items()):
            ks = sorted(points)
            ax.errorbar(ks, [points[k][0] for k in ks], yerr=[points[k][1] for k in ks], marker="o", capsize=3,
                        label=label)  # fmt: skip
        figures.append(_finish(fig, ax, out, f"{safe_name(dataset)}_frozen_blocks",
                               f"{dataset}: metric vs frozen blocks (Fig. 4)",
                               title=f"{dataset}: fine-tuning with the first K blocks frozen", ylabel=f"test {metric}",
                               xlabel="frozen blocks (first K)"))  # fmt: skip
    return figures


def cka_model_b(doc: dict) -> str | None:
    """The second model of a two-cache CKA (None for a self-CKA)."""
    settings = doc.get("settings") or {}
    details = doc.get("details") or {}
    model_b = settings.get("model_b") or (details.get("cache_b") or {}).get("model")
    key_b = settings.get("cache_b_key") or (details.get("cache_b") or {}).get("cache_key")
    if key_b is None or key_b == doc.get("cache_key"):
        return None
    return model_b


def cka_heatmaps(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Every CKA matrix as a heatmap (paper Fig. 7: pre vs post fine-tuning is a two-cache CKA)."""
    figures = []
    for doc in docs:
        if doc.get("protocol") != "cka":
            continue
        summary = doc.get("summary") or {}
        matrix = np.asarray(summary.get("matrix") or [], dtype=np.float64)
        if matrix.ndim != 2 or matrix.size == 0:
            continue
        model_b = cka_model_b(doc) or doc["model"]
        name = f"{safe_name(doc['dataset'])}_cka_{safe_name(doc['model'])}_vs_{safe_name(model_b)}_{Path(doc['folder']).name}"
        title = f"{doc['dataset']}: CKA {doc['model']} × {model_b}"
        path = plot_cka_heatmap(out / f"{name}.png", matrix, summary.get("layers_a") or [],
                                summary.get("layers_b") or [], title=title, ylabel=f"{doc['model']} layer",
                                xlabel=f"{model_b} layer")  # fmt: skip
        figures.append(Figure(name, title, path))
    return figures


def cka_across_models(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Last-layer CKA between models (paper Fig. 8), one models × models heatmap per dataset."""
    figures = []
    for dataset in ordered_datasets(docs):
        pairs: dict[tuple[str, str], float] = {}
        for doc in docs:
            model_b = cka_model_b(doc) if doc.get("protocol") == "cka" and doc["dataset"] == dataset else None
            if model_b is None or model_b == doc["model"]:
                continue
            matrix = (doc.get("summary") or {}).get("matrix") or []
            if matrix and matrix[-1] and matrix[-1][-1] is not None:
                value = float(matrix[-1][-1])  # the last layer of A against the last layer of B
                pairs[(doc["model"], model_b)] = pairs[(model_b, doc["model"])] = value
        if not pairs:
            continue
        models = sorted({m for pair in pairs for m in pair})
        grid = np.full((len(models), len(models)), np.nan)
        for i, a in enumerate(models):
            for j, b in enumerate(models):
                grid[i, j] = 1.0 if a == b else pairs.get((a, b), np.nan)
        name = f"{safe_name(dataset)}_cka_last_layer_models"
        title = f"{dataset}: last-layer CKA across models"
        path = plot_cka_heatmap(out / f"{name}.png", grid, models, models, title=title, ylabel="model", xlabel="model")
        figures.append(Figure(name, f"{title} (Fig. 8)", path))
    return figures


def bar_charts(docs: Sequence[dict], out: Path) -> list[Figure]:
    """One grouped bar chart per dataset: Table 1's cells, mean ± std over seeds (missing cells are left empty)."""
    cells = table1_cells(docs)
    figures = []
    models = ordered_models(docs)
    columns = [(h, r) for h in HEADS for r in REGIMES]
    for dataset in ordered_datasets(docs):
        present = [c for c in columns if any((m, dataset, *c) in cells for m in models)]
        if not present:
            continue
        fig, (ax,) = new_figure()
        fig.set_size_inches(max(5.0, 1.2 * len(models) + 2), 4)
        width = 0.8 / len(present)
        metric = None
        for i, (head, regime) in enumerate(present):
            means, stds = [], []
            for model in models:
                doc = cells.get((model, dataset, head, regime))
                s = (doc or {}).get("summary") or {}
                means.append(np.nan if doc is None else s.get("test_mean"))
                stds.append(0.0 if doc is None else s.get("test_std") or 0.0)
                metric = metric or (doc or {}).get("metric")
            xs = np.arange(len(models)) + (i - (len(present) - 1) / 2) * width
            ax.bar(xs, [np.nan if m is None else m for m in means], width, yerr=stds, capsize=2,
                   label=f"{HEAD_NAMES[head]} {regime}")  # fmt: skip
        ax.set_xticks(range(len(models)), models, rotation=30 if len(models) > 3 else 0, ha="right")
        figures.append(_finish(fig, ax, out, f"{safe_name(dataset)}_bars", f"{dataset}: all models",
                               title=f"{dataset}: test {metric} (mean ± std over seeds)",
                               ylabel=f"test {metric}"))  # fmt: skip
    return figures


def all_figures(docs: Sequence[dict], out: Path) -> list[Figure]:
    out = Path(out)
    figures: list[Figure] = []
    for kind in (bar_charts, metric_vs_layer, knn_vs_k, frozen_blocks, cka_heatmaps, cka_across_models):
        figures += kind(docs, out)
    return figures
