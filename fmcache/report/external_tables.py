"""The external validation's tables and figures (:mod:`fmcache.report.external` computes them).

* ``external_validation``: one row per foundation × source protocol × source → target (clean targets): the source's
  test metric beside the target's, Δ with its 95 % CI, the target's n, what the label map keeps and drops and the
  overlap dropped; figure ``external_validation`` (source vs target per foundation, a panel per pair).
* ``corruption_robustness``: foundation × corruption × severity → metric, and each foundation's mean relative drop
  per severity; figures ``corruption_robustness_<dataset>`` (metric vs severity, a panel per corruption).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fmcache.plots import plot_severity_curves, plot_source_target
from fmcache.report.external import TARGET_STREAM, Curve, External, Row
from fmcache.report.figures import Figure
from fmcache.report.tables import FEWER_SEEDS, MISSING, Table, fewer_seeds, fmt
from fmcache.results import safe_name

MEAN_DROP = "mean relative drop"


def _mean_std(mean: float | None, std: float | None) -> str:
    return f"{fmt(mean)} ± {fmt(std)}"


def _signed(value: float | None) -> str:
    return MISSING if value is None or not math.isfinite(value) else f"{value:+.4f}"


def delta_text(delta: dict | None) -> str:
    """Δ as a cell: ``+0.0123 [-0.0201, +0.0456]``, the point alone where there is no CI, – where no Δ."""
    if delta is None:
        return MISSING
    if delta.get("low") is None:
        return _signed(delta["delta"])
    return f"{_signed(delta['delta'])} [{_signed(delta['low'])}, {_signed(delta['high'])}]"


def _row_label(row: Row) -> str:
    t = row.transfer
    return f"{t.model} {t.head}, {t.pair}"


def _record(row: Row) -> dict:
    t, delta = row.transfer, row.delta or {}
    (source_mean, source_std), (target_mean, target_std) = t.source_test, t.target_test
    label_map, overlap = t.doc.get("label_map") or {}, t.doc.get("overlap") or {}
    source_ci = row.source.ci if row.source is not None else {}
    target_ci = row.target.ci if row.target is not None else {}
    return {
        "model": t.model,
        "head": t.head,
        "source_protocol": t.source_protocol,
        "source_dataset": t.source_dataset,
        "target_dataset": t.target_dataset,
        "source_metric": t.source.get("metric"),
        "source_test_mean": source_mean,
        "source_test_std": source_std,
        "source_ci_low": source_ci.get("low"),
        "source_ci_high": source_ci.get("high"),
        "source_unit": source_ci.get("unit"),
        "source_n": source_ci.get("n"),
        "target_metric": t.doc.get("metric"),
        "target_test_mean": target_mean,
        "target_test_std": target_std,
        "target_ci_low": target_ci.get("low"),
        "target_ci_high": target_ci.get("high"),
        "target_unit": target_ci.get("unit"),
        "target_n": (t.target.get("evaluated") or {}).get("test"),
        "delta": delta.get("delta"),
        "delta_low": delta.get("low"),
        "delta_high": delta.get("high"),
        "delta_ci": delta.get("kind"),
        "delta_p_value": delta.get("p_value"),
        "resamples": delta.get("resamples"),
        "failed": delta.get("failed"),
        "classes_kept": len(label_map.get("kept") or []),
        "classes_dropped": len(label_map.get("dropped_classes") or []),
        "unused_source_classes": len(label_map.get("unused_source_classes") or []),
        "samples_dropped_by_map": sum((label_map.get("dropped_samples") or {}).values()),
        "label_map": label_map.get("origin"),
        "overlap_found": (overlap.get("found") or {}).get("total"),
        "overlap_dropped": overlap.get("dropped"),
        "candidates": 1 + len(row.choice.others),
        "folder": t.folder,
        "source_folder": t.source.get("folder"),
    }


def external_table(ext: External) -> Table | None:
    """``external_validation``, or None where the tree holds no clean transfer."""
    if not ext.rows:
        return None
    header = ["model", "head", "source → target", "source metric", "source test", "target metric", "target test",
              "Δ [95 % CI]", "Δ CI", "target n", "classes kept / dropped", "overlap dropped"]  # fmt: skip
    rows, records, marked, notes = [], [], False, []
    for row in ext.rows:
        t, r = row.transfer, _record(row)
        summary = t.doc.get("summary") or {}
        marked |= fewer_seeds(summary)
        rows.append(
            [
                t.model,
                t.head,
                t.pair,
                str(r["source_metric"]),
                _mean_std(r["source_test_mean"], r["source_test_std"]),
                str(r["target_metric"]),
                _mean_std(r["target_test_mean"], r["target_test_std"]) + (FEWER_SEEDS if fewer_seeds(summary) else ""),
                delta_text(row.delta),
                r["delta_ci"] or MISSING,
                str(r["target_n"] if r["target_n"] is not None else MISSING),
                f"{r['classes_kept']} / {r['classes_dropped']}",
                str(r["overlap_dropped"] if r["overlap_dropped"] is not None else MISSING),
            ]
        )
        records.append(r)
        if row.choice.others:
            others = ", ".join(sorted(o.folder for o in row.choice.others))
            notes.append(
                f"{_row_label(row)}: {1 + len(row.choice.others)} transfers; shown {t.folder} ({row.choice.why}); "
                f"not shown: {others}."
            )
        notes += [f"{_row_label(row)}: {n}." for n in row.notes]
    level = round(100 * ext.level)
    head = [
        "External validation: the heads a frozen result selected (every seed's head at its best LR, the DeiT or "
        "attentive heads, or k-NN's bank) scored with no refit on another dataset's cache of the same model, "
        "transform and layer (fmcache transfer). Source test: the source result's own test metric; target test: "
        "the target's test samples the label map keeps, less any overlap dropped; mean ± std over seeds.",
        f"Δ = target − source. Its {level} % CI: the two test sets are different samples, so each is bootstrapped on "
        f"its own, at its own unit (patients, lesions, ... or images) and stratified by class as every CI of this "
        f"report ({ext.resamples} resamples; the source with seed {ext.seed}, the draws of its CI, the target with "
        f"seed {ext.seed + TARGET_STREAM}), and the interval is the percentile interval of the {ext.resamples} "
        "differences (Δ CI: independent). Paired: the target is the source's own test rows (its own cache), both "
        "drawn on the same resamples. –: no CI (predictions missing), or no Δ (the metrics differ).",
        "Classes kept / dropped: the target classes (label columns) the label map keeps and those it maps to no "
        "source class. Overlap dropped: target samples found among the source's train/val samples (by id, pixels or "
        "near-duplicate hash) and dropped with --drop-overlap.",
        "One transfer per cell (model, source protocol, source → target): the one whose source result fills the "
        "paper's Table 1 / Fig. 2 cell for its dataset, else the one whose source has the best mean val metric, "
        "then the newest.",
    ]
    if marked:
        head.append(f"{FEWER_SEEDS}: fewer seeds finished than were requested.")
    title = "External validation: source test metric and target test metric, Δ with its bootstrap CI"
    return Table("external_validation", title, header, rows, records, head + notes)


# -- corruption robustness -----------------------------------------------------------------------------------------


def relative_drop(clean: float | None, value: float | None) -> float | None:
    """(clean − value) / clean; None where either is unknown or clean is not positive."""
    if clean is None or value is None or not math.isfinite(clean) or not math.isfinite(value) or clean <= 0:
        return None
    return (clean - value) / clean


def _point_text(point: dict | None) -> str:
    if point is None or point.get("mean") is None:
        return MISSING
    if point.get("low") is None:
        return fmt(point["mean"])
    return f"{fmt(point['mean'])} [{fmt(point['low'], 3)}, {fmt(point['high'], 3)}]"


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{round(100 * value, 1) + 0.0:.1f} %"  # + 0.0: no "-0.0"


def _mean(values) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def mean_drops(curves: list[Curve], severities: list[int]) -> dict[int, tuple[float | None, int]]:
    """Per severity: the mean relative drop over the curves (corruptions) scored there, and how many."""
    out = {}
    for s in severities:
        drops = [relative_drop(c.points[0]["mean"], c.points[s]["mean"]) for c in curves if s in c.points]
        known = [d for d in drops if d is not None]
        out[s] = (float(np.mean(known)) if known else None, len(known))
    return out


def _groups(ext: External) -> dict[tuple, list[Curve]]:
    groups: dict[tuple, list[Curve]] = {}
    for c in ext.curves:
        groups.setdefault((c.pair, c.model, c.head), []).append(c)
    return groups


def corruption_table(ext: External) -> Table | None:
    """``corruption_robustness``, or None where the tree holds no transfer to a corrupted cache."""
    if not ext.curves:
        return None
    severities = sorted({s for c in ext.curves for s in c.points if s > 0})
    header = ["dataset", "model", "head", "corruption", "metric", "0 (clean)", *map(str, severities), "mean rel. drop"]
    rows, records = [], []
    for (pair, model, head), curves in _groups(ext).items():
        for c in curves:
            clean = c.points[0]["mean"]
            drops = {s: relative_drop(clean, c.points[s]["mean"]) for s in severities if s in c.points}
            cells = [_point_text(c.points.get(s)) for s in (0, *severities)]
            rows.append([pair, model, head, c.corruption, c.metric, *cells, _percent(_mean(drops.values()))])
            for s, point in sorted(c.points.items()):
                records.append(
                    {
                        "dataset": pair,
                        "source_dataset": c.source_dataset,
                        "target_dataset": c.target_dataset,
                        "model": model,
                        "head": head,
                        "corruption": c.corruption,
                        "severity": s,
                        "metric": c.metric,
                        "mean": point.get("mean"),
                        "std": point.get("std"),
                        "ci_low": point.get("low"),
                        "ci_high": point.get("high"),
                        "ci_unit": point.get("unit"),
                        "n": point.get("n"),
                        "relative_drop": drops.get(s) if s else None,
                        "from": point.get("from"),
                        "folder": point.get("folder"),
                    }
                )
        per = mean_drops(curves, severities)
        rows.append(
            [pair, model, head, MEAN_DROP, curves[0].metric, MISSING, *(_percent(per[s][0]) for s in severities),
             _percent(_mean(v for v, _n in per.values()))]
        )  # fmt: skip
        records += [
            {"dataset": pair, "model": model, "head": head, "corruption": MEAN_DROP, "severity": s,
             "metric": curves[0].metric, "mean_relative_drop": value, "corruptions": n}
            for s, (value, n) in per.items()
        ]  # fmt: skip
    notes = [
        "Corruption robustness: the clean-trained heads scored with no refit (fmcache transfer) on corrupted copies "
        "of a test split (fmcache extract --corrupt NAME:SEVERITY). Severity 0 is the clean test metric of the source "
        "result (for another dataset's corrupted cache: the clean transfer to it), 1-5 the corrupted caches'. A cell: "
        f"the seed-mean test metric [{round(100 * ext.level)} % bootstrap CI at the unit, stratified by class, "
        f"{ext.resamples} resamples]; –: not scored.",
        "Relative drop of a corruption at severity s: RD = (m0 - m_s) / m0, with m0 the clean metric. Mean relative "
        "drop of a foundation at severity s (its 'mean relative drop' row): the mean of RD over the corruptions "
        "scored at s. Column 'mean rel. drop': the mean of the row over its severities. In the spirit of ImageNet-C's "
        "mean corruption error and MedMNIST-C's relative balanced error, but normalised by the foundation's own clean "
        "metric, not by a reference model, and not by the metric's chance level (an AUC falling to chance reads as "
        "a 50 % drop). Lower is better; negative: better than clean.",
        *ext.curve_notes,
    ]
    title = "Corruption robustness: test metric against corruption severity, and the mean relative drop"
    return Table("corruption_robustness", title, header, rows, records, notes)


def external_tables(ext: External) -> list[Table]:
    return [t for t in (external_table(ext), corruption_table(ext)) if t is not None]


# -- figures -------------------------------------------------------------------------------------------------------


def _ci_point(mean: float | None, boot) -> tuple:
    ci = boot.ci if boot is not None else {}
    return (mean, ci.get("low"), ci.get("high"))


def external_figure(ext: External, out: Path) -> list[Figure]:
    """``external_validation``: each foundation's source and target test metric with their CIs, a panel per pair."""
    if not ext.rows:
        return []
    panels: dict[str, list[dict]] = {}
    for row in ext.rows:
        t = row.transfer
        metric = t.doc.get("metric")
        panels.setdefault(t.pair, []).append(
            {
                "label": f"{t.model} {t.head}",
                "metric": metric if t.source.get("metric") == metric else f"{t.source.get('metric')} → {metric}",
                "source": _ci_point(t.source_test[0], row.source),
                "target": _ci_point(t.target_test[0], row.target),
            }
        )
    title = "External validation: source vs target test metric"
    path = plot_source_target(Path(out) / "external_validation.png", panels, title)
    caption = f"{title} per foundation, a panel per source → target pair; bars: {round(100 * ext.level)} % CIs"
    return [Figure("external_validation", caption, path)]


def corruption_figures(ext: External, out: Path) -> list[Figure]:
    """``corruption_robustness_<dataset>``: metric vs severity per foundation with its CI band, a panel per
    corruption, one figure per dataset (source → target pair)."""
    by_pair: dict[str, list[Curve]] = {}
    for c in ext.curves:
        by_pair.setdefault(c.pair, []).append(c)
    figures = []
    for pair, curves in by_pair.items():
        panels: dict[str, dict[str, list]] = {}
        for c in curves:
            points = [(s, p.get("mean"), p.get("low"), p.get("high")) for s, p in sorted(c.points.items())]
            panels.setdefault(c.corruption, {})[c.foundation] = points
        first = curves[0]
        stem = safe_name(first.target_dataset)
        if first.source_dataset != first.target_dataset:
            stem = f"{safe_name(first.source_dataset)}_to_{stem}"
        name = f"corruption_robustness_{stem}"
        metrics = " / ".join(dict.fromkeys(c.metric for c in curves))
        title = f"{pair}: test {metrics} against corruption severity"
        path = plot_severity_curves(Path(out) / f"{name}.png", dict(sorted(panels.items())), title, f"test {metrics}")
        caption = f"{title}, a line per foundation, band: {round(100 * ext.level)} % bootstrap CI; 0 = clean"
        figures.append(Figure(name, caption, path))
    return figures


def external_figures(ext: External, out: Path) -> list[Figure]:
    return external_figure(ext, out) + corruption_figures(ext, out)
