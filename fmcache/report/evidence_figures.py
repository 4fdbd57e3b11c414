"""The evidence's figures: reliability diagrams (``supp_reliability_*``), subgroup forest plots (``supp_forest_*``)
and critical-difference diagrams (``supp_cd_*``), drawn on matplotlib's Agg canvas by :mod:`fmcache.plots`."""

from __future__ import annotations

from pathlib import Path

from fmcache.plots import plot_cd_diagram, plot_forest, plot_reliability
from fmcache.report.evidence import Cell, Evidence, group_order
from fmcache.report.figures import Figure
from fmcache.report.paper import OUTPUTS
from fmcache.results import safe_name


def _stem(c: Cell) -> str:
    """A figure name's part for one paper column: output, dataset, metric and head."""
    return "_".join(
        [
            c.output,
            safe_name(c.column.dataset),
            c.column.metric,
            *([c.column.split] if c.column.split else []),
            *([c.head] if c.head else []),
        ]
    )


def _columns(ev: Evidence) -> dict[str, list[Cell]]:
    by: dict[str, list[Cell]] = {}
    for c in sorted(ev.cells, key=lambda c: (list(OUTPUTS).index(c.output), c.column, c.head or "", c.model)):
        if c.folder in ev.results:
            by.setdefault(_stem(c), []).append(c)
    return by


def reliability_figures(ev: Evidence, out: Path) -> list[Figure]:
    """One figure per paper column: every model's reliability curve before and after temperature scaling."""
    figures = []
    for stem, cells in _columns(ev).items():
        before, after = {}, {}
        for c in cells:
            bins = ev.results[c.folder].reliability or {}
            if bins.get("before"):
                before[c.model] = bins["before"]
            if bins.get("after"):
                after[c.model] = bins["after"]
        if not before:
            continue
        first = cells[0]
        pooled = "seeds and labels" if ev.results[first.folder].label_names else "seeds"
        panels = {"before": before} | ({"after temperature scaling (T on val)": after} if after else {})
        title = f"{first.column.dataset}: {first.label}, reliability"
        name = f"supp_reliability_{stem}"
        path = plot_reliability(out / f"{name}.png", panels, title)
        caption = f"{title} (15 bins, pooled over {pooled}); before and after temperature scaling"
        figures.append(Figure(name, caption, path))
    return figures


def forest_figures(ev: Evidence, out: Path) -> list[Figure]:
    """One forest plot per paper column and attribute: each model's metric per group with its 95 % CI."""
    figures = []
    if ev.spec is None:
        return figures
    for stem, cells in _columns(ev).items():
        attributes = dict.fromkeys(a for c in cells for a in ev.results[c.folder].subgroups)
        for attribute in attributes:
            rows = {}
            for c in cells:
                report = ev.results[c.folder].subgroups.get(attribute) or {}
                points = {
                    g: (e["metric"]["point"], e["metric"]["low"], e["metric"]["high"], bool(e["flags"]))
                    for g, e in sorted((report.get("groups") or {}).items(), key=lambda ge: group_order(ge[0]))
                    if "point" in e["metric"]
                }
                if points:
                    rows[c.model] = points
            if not rows:
                continue
            first = cells[0]
            name = f"supp_forest_{stem}_{safe_name(attribute)}"
            title = f"{first.column.dataset}: {first.label} by {attribute}"
            xlabel = f"test {first.column.metric} (95 % CI, within-group bootstrap at the unit)"
            figures.append(
                Figure(name, f"{title}: subgroup forest plot", plot_forest(out / f"{name}.png", rows, title, xlabel))
            )
    return figures


def cd_figures(ev: Evidence, out: Path) -> list[Figure]:
    """One critical-difference diagram per output, head and regime ranked across datasets."""
    figures = []
    for a in ev.across:
        output, head, regime = a["block"]
        name = f"supp_cd_{output}_{head}_{safe_name(regime)}"
        title = f"{a['comparison']}: average ranks over {a['n_datasets']} datasets (Friedman p = {a['chi2_p']:.3g})"
        path = plot_cd_diagram(out / f"{name}.png", a["names"], a["avg_ranks"], a["cd"], a["groups"], title)
        figures.append(Figure(name, f"{title}; Nemenyi CD = {a['cd']:.2f} at α = {a['alpha']}", path))
    return figures


def evidence_figures(ev: Evidence, out: Path) -> list[Figure]:
    return reliability_figures(ev, out) + forest_figures(ev, out) + cd_figures(ev, out)
