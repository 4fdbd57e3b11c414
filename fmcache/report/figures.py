"""The report's figures (PNG, matplotlib's Agg canvas, no pyplot): one function per figure kind, each file named
after the paper's figure it reproduces (``fig2_knn_<dataset>``, ``fig4_freeze_<dataset>``, ...) or ``supp_*`` for the
report's own extras.

Each returns the figures it drew as :class:`Figure` records; a kind with nothing to draw (no multi-layer result, no
partly frozen fine-tune) returns none rather than an empty plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmcache.label_efficiency import label_efficiency_rows
from fmcache.plots import new_figure, plot_cka_heatmap, plot_label_efficiency, save_png
from fmcache.protocols import HEAD_LABELS, PROTOCOLS
from fmcache.report.paper import MODEL_SIZE_FAMILY, OUTPUTS, freeze_of
from fmcache.report.tables import (
    HEAD_NAMES,
    cka_model_b,
    doc_outputs,
    head_cells,
    knn_cells,
    ordered_datasets,
    ordered_models,
    pick,
    protocol_of,
    seed_knn_point,
)
from fmcache.results import base_settings, safe_name, settings_hash, train_subset


def _paper(key: str) -> str:
    return f"{OUTPUTS[key].label}: {OUTPUTS[key].caption}"


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
    """Test metric against layer, one line per model: the DeiT decapitation curve (Fig. 5), k-NN and linear probe."""
    figures = []
    for dataset in ordered_datasets(docs):
        # per-layer curves, the report's extras (the DeiT head's is the paper's Fig. 5: decapitation() draws it)
        for protocol in (p for p in PROTOCOLS.values() if p.per_layer is not None):
            stem, label = protocol.per_layer
            if stem in OUTPUTS:
                continue
            curves = {}
            for doc in docs:
                if doc["dataset"] == dataset and doc.get("protocol") == protocol.name:
                    curve = _curve_from_knn(doc) if protocol.summary == "rows" else _curve_from_probe(doc)
                    if curve is not None:
                        curves[doc["model"]] = (curve, doc.get("metric"))
            if not curves:
                continue
            fig, (ax,) = new_figure()
            for model, ((layers, means, stds), _) in sorted(curves.items()):
                xs = [_layer_key(n)[0] for n in layers]
                ax.errorbar(xs, means, yerr=np.nan_to_num(stds), marker="o", capsize=3, label=model)
            metric = next(iter(curves.values()))[1]
            caption = f"{_paper(stem)} ({dataset})" if stem in OUTPUTS else f"{dataset}: {label}"
            figures.append(
                _finish(
                    fig,
                    ax,
                    out,
                    f"{stem}_{safe_name(dataset)}",
                    caption,
                    title=f"{dataset}: {label}",
                    ylabel=f"test {metric}",
                    xlabel="layer",
                )
            )
    return figures


def _decapitation_lines(docs: Sequence[dict], dataset: str) -> dict[str, tuple[list[int], list, list]]:
    """Fig. 5's lines of one dataset: each model's frozen DeiT head on block i's cached tokens (a multi-layer probe),
    and its fine-tuned decapitation (``finetune --drop-after i``), the best val among several results per point."""
    lines: dict[str, dict[int, tuple[float, float]]] = {}
    frozen: dict[str, list[dict]] = {}
    tuned: dict[tuple[str, str, int], list[dict]] = {}
    for doc in docs:
        if doc["dataset"] != dataset or "fig5_decapitation" not in doc_outputs(doc):
            continue
        if protocol_of(doc).trains_foundation:
            tuned.setdefault((doc["model"], protocol_of(doc).label, int(doc["settings"]["drop_after"])), []).append(doc)
        else:
            frozen.setdefault(doc["model"], []).append(doc)
    for model, group in frozen.items():
        curve = _curve_from_probe(pick(group))
        if curve is not None:
            for layer, mean, std in zip(*curve, strict=True):
                if _layer_key(layer)[0] < 10**9:
                    lines.setdefault(f"{model}, frozen", {})[_layer_key(layer)[0]] = (mean, std)
    for (model, head, block), group in tuned.items():
        summary = pick(group)["summary"]
        lines.setdefault(f"{model} + {head}, fine-tuned", {})[block] = (
            summary["test_mean"],
            summary.get("test_std") or 0.0,
        )
    return {
        label: (sorted(p), [p[k][0] for k in sorted(p)], [p[k][1] for k in sorted(p)]) for label, p in lines.items()
    }


def decapitation(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Fig. 5: test metric against the block the head reads, frozen and fine-tuned, one line each per model."""
    figures = []
    for dataset in ordered_datasets(docs):
        lines = _decapitation_lines(docs, dataset)
        if not lines:
            continue
        metric = next(d.get("metric") for d in docs if d["dataset"] == dataset)
        fig, (ax,) = new_figure()
        for label, (blocks, means, stds) in sorted(lines.items()):
            style = "--" if label.endswith("fine-tuned") else "-"
            ax.errorbar(blocks, means, yerr=np.nan_to_num(stds), marker="o", capsize=3, linestyle=style, label=label)
        figures.append(
            _finish(
                fig,
                ax,
                out,
                f"fig5_decapitation_{safe_name(dataset)}",
                f"{_paper('fig5_decapitation')} ({dataset})",
                title=f"{dataset}: decapitation",
                ylabel=f"test {metric}",
                xlabel="block the head reads (i)",
            )
        )
    return figures


def knn_vs_k(docs: Sequence[dict], out: Path) -> list[Figure]:
    """The k/T sweep (supplementary): k-NN test metric against k at each model's chosen layer, one line per model;
    of several sweeps of one model, the one with the best val metric (the rule every output uses)."""
    figures = []
    for dataset in ordered_datasets(docs):
        chosen: dict[str, dict] = {}
        for doc in docs:
            summary = doc.get("summary") or {}
            if doc["dataset"] != dataset or protocol_of(doc).summary != "rows" or not summary.get("best"):
                continue
            if doc_outputs(doc) or train_subset(doc) is not None:
                continue  # the seed's setting is Fig. 2's bars; subsets are the label-efficiency curve
            if doc["model"] not in chosen or pick([chosen[doc["model"]], doc]) is doc:
                chosen[doc["model"]] = doc
        lines = {}
        for model, doc in chosen.items():
            summary = doc["summary"]
            layer = summary["best"].get("layer")
            points = {
                int(r["k"]): r["value"]
                for r in summary.get("rows") or []
                if r.get("split") == "test" and r.get("layer") == layer and r.get("value") is not None
            }
            if points:
                lines[model] = (points, doc.get("metric"))
        if not lines:
            continue
        fig, (ax,) = new_figure()
        for model, (points, _) in sorted(lines.items()):
            ks = sorted(points)
            ax.plot(ks, [points[k] for k in ks], marker="o", label=model)
        ax.set_xscale("log")
        name, metric = f"supp_knn_sweep_{safe_name(dataset)}", next(iter(lines.values()))[1]
        figures.append(
            _finish(
                fig,
                ax,
                out,
                name,
                f"{dataset}: k-NN against k (the k/T sweep, supplementary)",
                title=f"{dataset}: k-NN vs k",
                ylabel=f"test {metric}",
                xlabel="k",
            )
        )
    return figures


def knn_bars(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Fig. 2: the seed's k-NN (k = 200, T = 0.1) per model, one bar chart per dataset and metric: Fig. 2's cells."""
    by: dict[tuple[str, str], dict[str, float]] = {}
    for (model, column), (doc, _n) in knn_cells(docs).items():
        point = seed_knn_point(doc) or {}
        if point.get("test") is not None:
            by.setdefault((column.dataset, column.metric), {})[model] = float(point["test"])
    figures = []
    for (dataset, metric), values in sorted(by.items()):
        models = sorted(values)
        fig, (ax,) = new_figure()
        fig.set_size_inches(max(5.0, 0.9 * len(models) + 2), 4)
        ax.bar(range(len(models)), [values[m] for m in models], label="k-NN (k = 200, T = 0.1)")
        ax.set_xticks(range(len(models)), models, rotation=30 if len(models) > 3 else 0, ha="right")
        figures.append(
            _finish(
                fig,
                ax,
                out,
                f"fig2_knn_{safe_name(dataset)}",
                f"{_paper('fig2_knn')} ({dataset})",
                title=f"{dataset}: k-NN on the frozen paper feature",
                ylabel=f"test {metric}",
            )
        )
    return figures


def _frozen_blocks(settings: dict) -> int | None:
    """K of ``--freeze K`` (0 is the seed's cutoff 0: every block trains, embeddings frozen); None otherwise."""
    text = freeze_of(settings)
    return int(text) if text.isdigit() else None


def frozen_blocks(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Fine-tuning test metric against the number of frozen blocks K (paper Fig. 4), one line per model and head; the
    model's Table 2 cell (unfrozen, same head) is a dashed reference line. Points and line follow the rule of every
    paper output: results that qualify (:func:`fmcache.report.paper.outputs_of`), the best val among several."""
    table2 = {
        (model, column.dataset, head): doc
        for (model, column, head, _r), (doc, _n) in head_cells(docs, "table2_unfrozen").items()
    }
    figures = []
    for dataset in ordered_datasets(docs):
        groups: dict[tuple[str, str, int], list[dict]] = {}
        for doc in docs:
            if doc["dataset"] == dataset and "fig4_freeze" in doc_outputs(doc):
                head = protocol_of(doc).head or "?"
                groups.setdefault((doc["model"], head, int(freeze_of(doc["settings"]))), []).append(doc)
        lines: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
        metric = None
        for (model, head, k), group in groups.items():
            summary = pick(group)["summary"]
            lines.setdefault((model, head), {})[k] = (summary["test_mean"], summary.get("test_std") or 0.0)
            metric = group[0].get("metric")
        if not lines:
            continue
        fig, (ax,) = new_figure()
        for (model, head), points in sorted(lines.items()):
            label = f"{model} + {HEAD_LABELS.get(head, head)}"
            ks = sorted(points)
            line = ax.errorbar(
                ks, [points[k][0] for k in ks], yerr=[points[k][1] for k in ks], marker="o", capsize=3, label=label
            )
            reference = table2.get((model, dataset, head))
            if reference is not None:
                ax.axhline(
                    reference["summary"]["test_mean"],
                    linestyle="--",
                    color=line[0].get_color(),
                    label=f"{label}, unfrozen",
                )
        figures.append(
            _finish(
                fig,
                ax,
                out,
                f"fig4_freeze_{safe_name(dataset)}",
                f"{_paper('fig4_freeze')} ({dataset})",
                title=f"{dataset}: fine-tuning with the first K blocks frozen",
                ylabel=f"test {metric}",
                xlabel="frozen blocks (first K)",
            )
        )
    return figures


def cka_heatmaps(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Every CKA matrix as a heatmap: one model before and after fine-tuning is the paper's Fig. 7 (two caches of
    the same model); a cache against itself or another model is the report's extra."""
    figures = []
    for doc in docs:
        if protocol_of(doc).summary != "matrix":
            continue
        summary = doc.get("summary") or {}
        matrix = np.asarray(summary.get("matrix") or [], dtype=np.float64)
        if matrix.ndim != 2 or matrix.size == 0:
            continue
        model_b = cka_model_b(doc) or doc["model"]
        fig7 = "fig7_cka_finetune" in doc_outputs(doc)
        stem = "fig7_cka_finetune" if fig7 else "supp_cka"
        name = f"{stem}_{safe_name(doc['dataset'])}_{safe_name(doc['model'])}_vs_{safe_name(model_b)}_{Path(doc['folder']).name}"
        title = f"{doc['dataset']}: CKA {doc['model']} × {model_b}" + (" (after fine-tuning)" if fig7 else "")
        path = plot_cka_heatmap(
            out / f"{name}.png",
            matrix,
            summary.get("layers_a") or [],
            summary.get("layers_b") or [],
            title=title,
            ylabel=f"{doc['model']} layer",
            xlabel=f"{model_b} layer" + (" (fine-tuned)" if fig7 else ""),
        )
        figures.append(Figure(name, f"{_paper('fig7_cka_finetune')} ({title})" if fig7 else title, path))
    return figures


def cka_across_models(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Last-layer CKA between models (paper Fig. 8), one models × models heatmap per dataset."""
    figures = []
    for dataset in ordered_datasets(docs):
        pairs: dict[tuple[str, str], float] = {}
        for doc in docs:
            model_b = cka_model_b(doc) if protocol_of(doc).pairs and doc["dataset"] == dataset else None
            if model_b is None or model_b == doc["model"]:  # one model before/after fine-tuning is Fig. 7, not 8
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
        name = f"fig8_cka_models_{safe_name(dataset)}"
        title = f"{dataset}: last-layer CKA across models"
        path = plot_cka_heatmap(out / f"{name}.png", grid, models, models, title=title, ylabel="model", xlabel="model")
        figures.append(Figure(name, f"{_paper('fig8_cka_models')} ({dataset})", path))
    return figures


def _head_columns(docs: Sequence[dict]) -> dict:
    """Tables 1 and 2's cells by (dataset, head, regime, model), for the bar charts and Fig. 6."""
    by: dict = {}
    for key in ("table1_frozen", "table2_unfrozen"):
        for (model, column, head, regime), (doc, _n) in head_cells(docs, key).items():
            by[(column.dataset, column.metric, head, regime, model)] = doc
    return by


def bar_charts(docs: Sequence[dict], out: Path) -> list[Figure]:
    """One grouped bar chart per dataset and metric: Tables 1 and 2's cells, mean ± std over seeds."""
    cells = _head_columns(docs)
    figures = []
    models = ordered_models(docs)
    for dataset, metric in sorted({(k[0], k[1]) for k in cells}):
        present = sorted({(k[2], k[3]) for k in cells if k[:2] == (dataset, metric)})
        fig, (ax,) = new_figure()
        fig.set_size_inches(max(5.0, 1.2 * len(models) + 2), 4)
        width = 0.8 / len(present)
        for i, (head, regime) in enumerate(present):
            docs_ = [cells.get((dataset, metric, head, regime, m)) for m in models]
            means = [np.nan if d is None else d["summary"].get("test_mean") for d in docs_]
            stds = [0.0 if d is None else d["summary"].get("test_std") or 0.0 for d in docs_]
            xs = np.arange(len(models)) + (i - (len(present) - 1) / 2) * width
            ax.bar(
                xs,
                [np.nan if m is None else m for m in means],
                width,
                yerr=stds,
                capsize=2,
                label=f"{HEAD_NAMES[head]} {regime}",
            )
        ax.set_xticks(range(len(models)), models, rotation=30 if len(models) > 3 else 0, ha="right")
        figures.append(
            _finish(
                fig,
                ax,
                out,
                f"supp_bars_{safe_name(dataset)}_{safe_name(metric)}",
                f"{dataset}: Tables 1 and 2 as bars ({metric})",
                title=f"{dataset}: test {metric} (mean ± std over seeds)",
                ylabel=f"test {metric}",
            )
        )
    return figures


def model_size(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Fig. 6: Tables 1 and 2's DINOv2 cells against model size (S, B, L, g), one line per head and regime."""
    cells = _head_columns(docs)
    sizes = [m for m in MODEL_SIZE_FAMILY if any(k[4] == m for k in cells)]
    figures = []
    if len(sizes) < 2:
        return figures
    for dataset, metric in sorted({(k[0], k[1]) for k in cells if k[4] in sizes}):
        fig, (ax,) = new_figure()
        lines = sorted({(k[2], k[3]) for k in cells if k[:2] == (dataset, metric) and k[4] in sizes})
        for head, regime in lines:
            points = [(i, cells.get((dataset, metric, head, regime, m))) for i, m in enumerate(sizes)]
            points = [(i, d["summary"]) for i, d in points if d is not None]
            ax.errorbar(
                [i for i, _ in points],
                [s.get("test_mean") for _, s in points],
                yerr=[s.get("test_std") or 0.0 for _, s in points],
                marker="o",
                capsize=3,
                label=f"{HEAD_NAMES[head]} {regime}",
            )
        ax.set_xticks(range(len(sizes)), [m.replace("dinov2_vit", "").upper() for m in sizes])
        figures.append(
            _finish(
                fig,
                ax,
                out,
                f"fig6_model_size_{safe_name(dataset)}",
                f"{_paper('fig6_model_size')} ({dataset})",
                title=f"{dataset}: DINOv2 size",
                ylabel=f"test {metric}",
                xlabel="DINOv2",
            )
        )
    return figures


def all_figures(docs: Sequence[dict], out: Path) -> list[Figure]:
    out = Path(out)
    figures: list[Figure] = []
    kinds = (
        knn_bars,
        knn_vs_k,
        frozen_blocks,
        metric_vs_layer,
        decapitation,
        model_size,
        cka_heatmaps,
        cka_across_models,
        bar_charts,
    )
    for kind in kinds:
        figures += kind(docs, out)
    return figures


def _chosen_layer(rows: Sequence[dict]) -> str:
    """A multi-layer curve's layer in the comparison: the best mean val at the largest train amount (as the report
    chooses on val everywhere; the last layer on ties)."""
    largest = max(r[r["axis"]] for r in rows)
    top = [r for r in rows if r[r["axis"]] == largest]
    best = max(top, key=lambda r: (-np.inf if r["val_mean"] is None else r["val_mean"], _layer_key(r["layer"])))
    return best["layer"]


def label_efficiency(docs: Sequence[dict], out: Path) -> list[Figure]:
    """Test metric against the labelled train amount (``--train-fraction`` runs), one figure per dataset and metric,
    one line per model and head (a multi-layer run at the layer chosen on val), mean ± std over repeats × seeds."""
    curves: dict[tuple, dict[tuple, list[dict]]] = {}
    for doc in docs:
        subset = train_subset(doc)
        if subset is None:
            continue
        axis = "fraction" if subset.get("fraction") is not None else "per_class"
        line = (doc["model"], protocol_of(doc).label, settings_hash(base_settings(doc))[:6])
        curves.setdefault((doc["dataset"], str(doc.get("metric")), axis), {}).setdefault(line, []).append(doc)
    figures = []
    for (dataset, metric, axis), lines in sorted(curves.items()):
        named = {}
        for model, head, digest in sorted(lines):
            rows = label_efficiency_rows(lines[(model, head, digest)])
            layer = _chosen_layer(rows)
            label = f"{model} {head}" + (f" [{digest}]" if sum(k[:2] == (model, head) for k in lines) > 1 else "")
            label += f" (layer {layer})" if len({r["layer"] for r in rows}) > 1 else ""
            named[label] = [r for r in rows if r["layer"] == layer]
        stem = "supp_label_efficiency" + ("" if axis == "fraction" else "_per_class")
        name = f"{stem}_{safe_name(dataset)}_{safe_name(metric)}"
        title = f"{dataset}: label efficiency ({metric})"
        path = plot_label_efficiency(out / f"{name}.png", named, metric, title)
        figures.append(
            Figure(
                name,
                f"{title}: test metric against labelled train data, mean ± std over repeats × "
                "seeds, one line per model and head",
                path,
            )
        )
    return figures
