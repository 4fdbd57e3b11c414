"""The evidence's tables (:class:`fmcache.report.tables.Table`: display rows and numeric records) and its files.

Names, one per statistic (each a section of the HTML/Markdown/LaTeX report and a pair of CSVs):
``supp_bootstrap_ci`` (CIs at the unit), ``supp_paired_tests`` (paired bootstrap and DeLong),
``supp_paired_delong_per_label_<dataset>``, ``supp_delong`` and ``supp_delong_per_label_<dataset>``,
``supp_calibration`` and ``supp_calibration_per_label_<dataset>``, ``supp_subgroups_summary`` and
``supp_subgroups_<dataset>_<attribute>``, ``supp_rank_within_<output>`` and ``supp_friedman``.
:func:`evidence_rows` is ``supp_evidence.csv`` (one row per result and statistic) and :func:`evidence_document`
``evidence.json``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fmcache.report.evidence import Cell, Evidence, ResultEvidence, group_order
from fmcache.report.paper import OUTPUTS
from fmcache.report.tables import MISSING, Table, fmt
from fmcache.results import safe_name, to_jsonable

TIED = "≈"
FLAGGED = "‡"
OUTPUT_ORDER = list(OUTPUTS)


def _order(c: Cell) -> tuple:
    return (OUTPUT_ORDER.index(c.output), c.column, c.head or "", c.regime, c.model)


def _cells(ev: Evidence) -> list[tuple[Cell, ResultEvidence]]:
    """Every cell whose result was read, in the paper's order."""
    return [(c, ev.results[c.folder]) for c in sorted(ev.cells, key=_order) if c.folder in ev.results]


def _p(value: float | None) -> str:
    return MISSING if value is None or not np.isfinite(value) else f"{value:.3g}"


def _interval(low: float | None, high: float | None, digits: int = 4) -> str:
    return f"[{fmt(low, digits)}, {fmt(high, digits)}]"


def ci_text(ci: dict, digits: int = 4) -> str:
    """A CI as a cell: ``[low, high] unit`` (every CI names its unit), or – where undefined."""
    if "error" in ci or "low" not in ci:
        return MISSING
    return f"{_interval(ci['low'], ci['high'], digits)} {ci['unit']}"


def _unit_text(ci: dict) -> str:
    return "image" if ci.get("unit") == "image" else f"{ci['n_clusters']} {ci['unit']}s"


def _base(c: Cell) -> dict:
    return {"output": c.output, "head": c.head, "regime": c.regime, "dataset": c.column.dataset, "model": c.model}


# -- CIs ------------------------------------------------------------------------------------------------------------


def ci_table(ev: Evidence, skipped: Sequence[str] = ()) -> Table:
    header = ["paper cell", "dataset", "model", "point", "95 % CI", "unit", "n test"]
    rows, records, by_image = [], [], 0
    for c, r in _cells(ev):
        ci = r.ci
        row = [c.label, c.column.label(False), c.model]
        if "error" in ci:
            rows.append([*row, MISSING, MISSING, r.unit, str(r.n)])
            records.append({**_base(c), "metric": r.metric, "error": ci["error"], "folder": c.folder})
            continue
        by_image += ci["unit"] == "image"
        rows.append([*row, fmt(ci["point"]), ci_text(ci), _unit_text(ci), str(ci["n"])])
        keys = ("point", "low", "high", "level", "unit", "n", "n_clusters", "n_strata", "resamples", "failed", "seed")
        records.append(
            {**_base(c), "metric": r.metric, **{k: ci[k] for k in keys}, "note": "; ".join(r.notes), "folder": c.folder}
        )
    notes = [
        f"Percentile bootstrap of the seed-mean test metric (the cell's number) over the result's independent units "
        f"({ev.resamples} resamples, seed {ev.seed}): whole patients, lesions, exams or studies from test_groups, "
        "stratified by class; each CI names its unit. One draw per result also serves its paired tests and rank "
        "intervals."
    ]
    if by_image:
        notes.append(
            f"{by_image} result(s) bootstrapped by image: their predictions.npz holds no test_groups (written "
            "before the per-sample contract) or only image ids."
        )
    notes += [f"Not in the bootstrap (no predictions.npz): {folder}." for folder in ev.absent]
    notes += [f"Skipped, unreadable: {item}." for item in skipped]
    errors = sorted({r.ci["error"] for _, r in _cells(ev) if "error" in r.ci})
    notes += [f"No CI ({MISSING}): {e}." for e in errors]
    said: dict[str, int] = {}
    for _, r in _cells(ev):
        for note in r.notes:
            said[note] = said.get(note, 0) + 1
    notes += [f"{note} ({count} result(s))." for note, count in sorted(said.items()) if "test_groups" not in note]
    return Table(
        "supp_bootstrap_ci",
        "95 % bootstrap CIs of the paper cells, at each result's unit",
        header,
        rows,
        records,
        notes,
    )


# -- paired tests ---------------------------------------------------------------------------------------------------


def _delong_summary(d: dict | None) -> dict:
    if not d or "error" in d:
        return {}
    return d["mean"] if d["kind"] == "multilabel" else d


def paired_table(ev: Evidence) -> Table:
    header = [
        "comparison",
        "dataset",
        "best",
        "other",
        "unit",
        "Δ",
        "95 % CI",
        "p",
        "ΔAUC (DeLong)",
        "SE",
        "p (DeLong)",
    ]
    rows, records = [], []
    for r in ev.paired:
        d = _delong_summary(r.get("delong"))
        lead = [r["comparison"], r["column"], r["best"], r["other"], r["unit"]]
        if "error" in r:
            rows.append(lead + [MISSING] * 6)
        else:
            rows.append(
                [
                    *lead,
                    fmt(r["delta"]),
                    _interval(r["low"], r["high"]),
                    _p(r["p_value"]),
                    fmt(d.get("delta")),
                    fmt(d.get("se")),
                    _p(d.get("p_value")),
                ]
            )
        record = {k: v for k, v in r.items() if k != "delong"}
        record.update({f"delong_{k}": d.get(k) for k in ("delta", "se", "z", "p_value")} if d else {})
        if r.get("delong") and "error" in r["delong"]:
            record["delong_error"] = r["delong"]["error"]
        records.append(record)
    notes = [
        "Paired tests in each column of a paper table: the model with the best point estimate against each other "
        "model on the same test rows. Bootstrap: both scored on the same resamples of the unit; two-sided p for no "
        "difference, (1 + #{|d_b − d| ≥ |d|}) / (B + 1).",
        "DeLong (AUC cells): the paired test of the seed-mean AUCs, cluster-robust at the same unit; for multi-label "
        "data the mean-AUC difference here, each label in supp_paired_delong_per_label_<dataset>.",
    ]
    return Table("supp_paired_tests", "Paired tests between models: bootstrap and DeLong", header, rows, records, notes)


def paired_delong_per_label(ev: Evidence) -> list[Table]:
    by_dataset: dict[str, list[dict]] = {}
    for r in ev.paired:
        d = r.get("delong") or {}
        if d.get("kind") == "multilabel":
            by_dataset.setdefault(r["dataset"], []).append(r)
    tables = []
    for dataset, pairs in sorted(by_dataset.items()):
        labels = list(dict.fromkeys(n for r in pairs for n in r["delong"]["per_label"]))
        rows, records = [], []
        for r in pairs:
            per = r["delong"]["per_label"]
            rows.append(
                [r["comparison"], r["best"], r["other"]]
                + [f"{fmt(per[n]['delta'])} (p {_p(per[n]['p_value'])})" if n in per else MISSING for n in labels]
            )
            records += [
                {
                    "comparison": r["comparison"],
                    "best": r["best"],
                    "other": r["other"],
                    "label": n,
                    "unit": r["unit"],
                    **per[n],
                }
                for n in labels
                if n in per
            ]
        notes = ["Paired DeLong per label: ΔAUC (best − other) and its two-sided p, at the unit of supp_paired_tests."]
        tables.append(
            Table(
                f"supp_paired_delong_per_label_{safe_name(dataset)}",
                f"Paired DeLong tests per label ({dataset})",
                ["comparison", "best", "other", *labels],
                rows,
                records,
                notes,
            )
        )
    return tables


# -- DeLong ---------------------------------------------------------------------------------------------------------


def delong_tables(ev: Evidence) -> list[Table]:
    header = ["paper cell", "dataset", "model", "AUC", "SE", "95 % CI", "unit"]
    rows, records, per_label, errors = [], [], {}, set()
    for c, r in _cells(ev):
        if r.delong is None:
            continue
        lead = [c.label, c.column.label(False), c.model]
        if "error" in r.delong:
            rows.append(lead + [MISSING] * 3 + [r.unit])
            errors.add(r.delong["error"])
            continue
        d = _delong_summary(r.delong)
        rows.append([*lead, fmt(d["auc"]), fmt(d["se"]), _interval(d["low"], d["high"]), d["unit"]])
        records.append(
            {
                **_base(c),
                "label": "mean" if r.delong["kind"] == "multilabel" else "auc",
                **{k: d[k] for k in ("auc", "se", "low", "high", "unit")},
                "folder": c.folder,
            }
        )
        if r.delong["kind"] == "multilabel":
            per_label.setdefault(c.column.dataset, []).append((c, r))
            records += [
                {**_base(c), "label": n, **v, "unit": d["unit"], "folder": c.folder}
                for n, v in r.delong["per_label"].items()
            ]
    notes = [
        "DeLong's standard error of each AUC cell's seed-mean AUC (for mean AUC: of the mean over labels, labels "
        "sharing images covarying), cluster-robust at the result's unit; normal 95 % CI clipped to [0, 1]. The "
        "variance is over test samples with the trained models fixed; seed-to-seed spread is the tables' ± std."
    ]
    notes += [f"{MISSING}: {e}." for e in sorted(errors)]
    tables = [Table("supp_delong", "DeLong standard errors of the AUC cells", header, rows, records, notes)]
    for dataset, found in sorted(per_label.items()):
        labels = list(dict.fromkeys(n for _, r in found for n in r.delong["per_label"]))
        body = [
            [c.label, c.model]
            + [
                f"{fmt(r.delong['per_label'][n]['auc'])} ± {fmt(r.delong['per_label'][n]['se'])}"
                if n in r.delong["per_label"]
                else MISSING
                for n in labels
            ]
            for c, r in found
        ]
        skipped = sorted({n for _, r in found for n in r.delong["skipped"]})
        label_notes = ["AUC ± DeLong SE per label, at the unit of supp_delong."]
        label_notes += [f"{MISSING}: fewer than 2 positives or 2 negatives ({', '.join(skipped)})."] if skipped else []
        tables.append(
            Table(
                f"supp_delong_per_label_{safe_name(dataset)}",
                f"DeLong per label ({dataset})",
                ["paper cell", "model", *labels],
                body,
                [],
                label_notes,
            )
        )
    return tables


# -- calibration ----------------------------------------------------------------------------------------------------

CAL_KEYS = ("ece", "mce", "brier", "nll")


def _temperature_text(temps: Sequence[float] | None) -> str:
    if not temps:
        return MISSING
    if len(temps) == 1:
        return f"{temps[0]:.3g}"
    return f"{np.mean(temps):.3g} ({min(temps):.3g}–{max(temps):.3g})"


def calibration_tables(ev: Evidence) -> list[Table]:
    header = [
        "paper cell",
        "dataset",
        "model",
        "ECE",
        "MCE",
        "Brier",
        "NLL",
        "T",
        "ECE (T)",
        "MCE (T)",
        "Brier (T)",
        "NLL (T)",
        "val NLL (T)",
    ]
    rows, records, per_label, errors, knn = [], [], {}, set(), False
    for c, r in _cells(ev):
        cal = r.calibration or {}
        lead = [c.label, c.column.label(False), c.model]
        if "error" in cal:
            rows.append(lead + [MISSING] * 10)
            errors.add(cal["error"])
            continue
        knn |= c.head is None
        before, after = cal["before"], cal.get("after") or {}
        val = f"{cal['val_nll_before']:.3f} → {cal['val_nll_after']:.3f}" if "val_nll_before" in cal else MISSING
        rows.append(
            lead
            + [fmt(before[k]) for k in CAL_KEYS]
            + [_temperature_text(cal.get("temperature"))]
            + [fmt(after.get(k)) for k in CAL_KEYS]
            + [val]
        )
        records.append(
            {
                **_base(c),
                **{k: before[k] for k in CAL_KEYS},
                "temperature": cal.get("temperature"),
                **{f"{k}_scaled": after.get(k) for k in CAL_KEYS},
                "val_nll_before": cal.get("val_nll_before"),
                "val_nll_after": cal.get("val_nll_after"),
                "folder": c.folder,
            }
        )
        if "per_label" in before:
            per_label.setdefault(c.column.dataset, []).append((c, cal))
    notes = [
        "From the saved test probabilities, per seed then averaged: ECE (15 equal-width bins, L1, top-label), MCE, "
        "multiclass Brier, NLL; multi-label: each label a binary problem on its known rows, averaged over labels. "
        "(T): after temperature scaling, one T per seed fitted on val by NLL and applied to test (T shows the mean "
        "and range over seeds); val NLL before → after. Reliability diagrams: figures supp_reliability_*."
    ]
    if knn:
        notes.append(
            "k-NN scores are vote shares (exp(sim/T)-weighted), not trained probabilities; their "
            "calibration is reported as is."
        )
    notes += [f"{MISSING}: {e}." for e in sorted(errors)]
    tables = [
        Table("supp_calibration", "Calibration before and after temperature scaling", header, rows, records, notes)
    ]
    for dataset, found in sorted(per_label.items()):
        labels = list(dict.fromkeys(n for _, cal in found for n in cal["before"]["per_label"]))
        body, recs = [], []
        for c, cal in found:
            after = (cal.get("after") or {}).get("per_label") or {}
            before = cal["before"]["per_label"]
            body.append(
                [c.label, c.model]
                + [
                    MISSING
                    if n not in before
                    else f"{before[n]['ece']:.3f}" + (f" → {after[n]['ece']:.3f}" if n in after else "")
                    for n in labels
                ]
            )
            recs += [
                {**_base(c), "label": n, **before[n], **{f"{k}_scaled": after.get(n, {}).get(k) for k in CAL_KEYS}}
                for n in labels
                if n in before
            ]
        tables.append(
            Table(
                f"supp_calibration_per_label_{safe_name(dataset)}",
                f"Calibration per label ({dataset}): ECE before → after temperature scaling",
                ["paper cell", "model", *labels],
                body,
                recs,
                [
                    "ECE per label (15 bins, L1) before → after one T per seed; MCE, Brier and NLL per "
                    "label in the values CSV."
                ],
            )
        )
    return tables


# -- subgroups ------------------------------------------------------------------------------------------------------


def _sub_ci(entry: dict, key: str) -> str:
    ci = entry.get(key) or {}
    if "point" not in ci:
        return MISSING
    return f"{fmt(ci['point'], 3)} {_interval(ci['low'], ci['high'], 3)}"


def subgroup_tables(ev: Evidence) -> list[Table]:
    """One table per (dataset, attribute): a row per (paper cell, group); and a summary row per (cell, attribute)."""
    if ev.spec is None:
        return []
    by: dict[tuple[str, str], list[tuple[Cell, ResultEvidence]]] = {}
    for c, r in _cells(ev):
        for attribute in r.subgroups:
            by.setdefault((c.column.dataset, attribute), []).append((c, r))
    tables, summary_rows, summary_records = [], [], []
    for (dataset, attribute), found in sorted(by.items()):
        auc_column = any(
            r.metric not in ("auc", "mean_auc") and "auc" in e
            for _, r in found
            for e in (r.subgroups[attribute].get("groups") or {}).values()
        )
        header = ["paper cell", "model", attribute, "n", "metric [95 % CI]"]
        header += ["AUC [95 % CI]"] if auc_column else []
        header += ["ECE [95 % CI]", "unit", "flags"]
        rows, records = [], []
        for c, r in found:
            report = r.subgroups[attribute]
            if "error" in report:
                rows.append([c.label, c.model, MISSING, MISSING, report["error"]] + [MISSING] * (len(header) - 5))
                continue
            for group, entry in sorted(report["groups"].items(), key=lambda ge: group_order(ge[0])):
                flags = "; ".join(entry["flags"])
                row = [
                    c.label,
                    c.model,
                    group + (f" {FLAGGED}" if entry["flags"] else ""),
                    str(entry["n"]),
                    _sub_ci(entry, "metric"),
                ]
                row += [_sub_ci(entry, "auc")] if auc_column else []
                rows.append([*row, _sub_ci(entry, "ece"), entry["unit"], flags])
                records.append(
                    {
                        **_base(c),
                        "attribute": attribute,
                        "group": group,
                        "n": entry["n"],
                        "n_clusters": entry["n_clusters"],
                        "unit": entry["unit"],
                        "flags": flags,
                        **_ci_fields(entry, "metric"),
                        **_ci_fields(entry, "auc"),
                        **_ci_fields(entry, "ece"),
                        "folder": c.folder,
                    }
                )
            eod = (report.get("equalized_odds") or {}).get("difference")
            summary_rows.append(
                [
                    dataset,
                    attribute,
                    c.label,
                    c.model,
                    report.get("worst") or MISSING,
                    fmt(report.get("gap"), 3),
                    fmt(eod, 3),
                    ", ".join(g for g, e in report["groups"].items() if e["flags"]) or "none",
                ]
            )
            summary_records.append(
                {
                    **_base(c),
                    "attribute": attribute,
                    "metric": r.metric,
                    "worst": report.get("worst"),
                    "best": report.get("best"),
                    "gap": report.get("gap"),
                    "equalized_odds_difference": eod,
                    "folder": c.folder,
                }
            )
        notes = [
            f"Per {attribute} group: the cell's metric ({found[0][1].metric}), AUC where it applies and ECE, each "
            "with a 95 % CI from a bootstrap within the group at the result's unit (seed means; ECE is biased "
            "upwards on resamples, so its interval may sit above the point). "
            f"{FLAGGED}: fewer than {ev.spec.min_size} samples or one class: shown, not eligible as the worst group "
            "or for the gap. A missing value is its own group, 'unknown'."
        ]
        tables.append(
            Table(
                f"supp_subgroups_{safe_name(dataset)}_{safe_name(attribute)}",
                f"Subgroups of {dataset} by {attribute}",
                header,
                rows,
                records,
                notes,
            )
        )
    summary = Table(
        "supp_subgroups_summary",
        "Subgroups: the worst group, the largest gap and the equalised-odds difference",
        ["dataset", "attribute", "paper cell", "model", "worst group", "gap", "EOD", "flagged groups"],
        summary_rows,
        summary_records,
        [
            "Worst group and gap (best − worst metric) over the groups not flagged. EOD (binary tasks): the "
            "equalised-odds difference, the larger of the between-group ranges of TPR and FPR at p > 0.5, per seed "
            "then averaged; every group counts."
        ],
    )
    return [summary, *tables] if summary_rows else tables


def _ci_fields(entry: dict, key: str) -> dict:
    ci = entry.get(key) or {}
    return {f"{key}": ci.get("point"), f"{key}_low": ci.get("low"), f"{key}_high": ci.get("high")}


# -- rankings -------------------------------------------------------------------------------------------------------


def _rank_text(m: dict) -> str:
    text = f"{m['rank']:g} [{m['rank_low']:g}–{m['rank_high']:g}]"
    return text + (f" {TIED}" if m["tied_with_best"] else "")


def ranking_tables(ev: Evidence) -> list[Table]:
    tables = []
    for output in OUTPUT_ORDER:
        found = [w for w in ev.within if w["output"] == output]
        if not found:
            continue
        keys = sorted({(w["column"], w["head"] or "", w["regime"]) for w in found})
        several = len({k[1:] for k in keys}) > 1
        header = ["model"] + [k[0].label(False) + (f" {k[1]} {k[2]}" if several else "") for k in keys]
        by_key = {(w["column"], w["head"] or "", w["regime"]): w for w in found}
        models = sorted({m for w in found for m in w["models"]})
        rows, records = [], []
        for model in models:
            row = [model]
            for key in keys:
                m = by_key[key]["models"].get(model)
                row.append(MISSING if m is None else _rank_text(m))
                if m is not None:
                    w = by_key[key]
                    records.append(
                        {
                            "output": output,
                            "head": w["head"],
                            "regime": w["regime"],
                            "dataset": w["dataset"],
                            "model": model,
                            **m,
                            "unit": w["unit"],
                            "n_clusters": w["n_clusters"],
                            "resamples": w["resamples"],
                            "failed": w["failed"],
                        }
                    )
            rows.append(row)
        notes = [
            f"Rank of the point estimate [95 % rank interval] within each dataset, from a bootstrap over the test "
            "units and the seeds (every model on the same resamples; seed s drawn together for all models). "
            f"{TIED}: tied with the best (the CI of best − model reaches 0)."
        ]
        left = sorted({m for w in found for m in w["left_out"]})
        notes += [f"Not ranked (other test rows than the best model): {', '.join(left)}."] if left else []
        tables.append(
            Table(
                f"supp_rank_within_{output}",
                f"{OUTPUTS[output].label}: ranks within each dataset",
                header,
                rows,
                records,
                notes,
            )
        )
    rows, records = [], []
    for a in ev.across:
        ranks = sorted(zip(a["names"], a["avg_ranks"], strict=True), key=lambda nr: nr[1])
        rows.append(
            [
                a["comparison"],
                str(a["n_datasets"]),
                str(a["n_models"]),
                f"{a['chi2']:.3g}",
                _p(a["chi2_p"]),
                f"{a['ff']:.3g}",
                _p(a["ff_p"]),
                f"{a['cd']:.3g}",
                ", ".join(f"{n} ({r:.2f})" for n, r in ranks),
                " | ".join(", ".join(g) for g in a["groups"]),
            ]
        )
        records.append({k: v for k, v in a.items() if k not in ("table", "block")})
    notes = [
        "Across datasets (Demšar 2006): each dataset ranks the models by its cell (rank 1 = best); Friedman's χ²_F "
        "and Iman–Davenport's F_F test whether the average ranks differ; two models differ (Nemenyi, α = 0.05) when "
        "their average ranks differ by at least CD. Groups: models whose ranks lie within CD (not significantly "
        "different). Critical-difference diagrams: figures supp_cd_*."
    ]
    notes += ev.notes
    lefts = [f"{a['comparison']}: {', '.join(a['left_out'])}" for a in ev.across if a["left_out"]]
    notes += [f"Left out (no cell on every dataset): {'; '.join(lefts)}."] if lefts else []
    header = ["comparison", "datasets", "models", "χ²_F", "p", "F_F", "p (F)", "CD", "average ranks", "groups"]
    tables.append(
        Table(
            "supp_friedman",
            "Ranks across datasets: Friedman test and Nemenyi critical difference",
            header,
            rows,
            records,
            notes,
        )
    )
    return tables


# -- every table, and the per-result files --------------------------------------------------------------------------


def evidence_tables(ev: Evidence, skipped: Sequence[str] = ()) -> list[Table]:
    return [
        ci_table(ev, skipped),
        paired_table(ev),
        *paired_delong_per_label(ev),
        *delong_tables(ev),
        *calibration_tables(ev),
        *subgroup_tables(ev),
        *ranking_tables(ev),
    ]


def evidence_rows(ev: Evidence) -> list[dict]:
    """``supp_evidence.csv``: one row per result and statistic (CI, DeLong per label, calibration before/after,
    temperature, subgroup metric/AUC/ECE per group, worst group gap and EOD)."""
    rows: list[dict] = []
    for c, r in _cells(ev):
        base = {**_base(c), "protocol": c.doc.get("protocol"), "metric": r.metric, "folder": c.folder}
        rows += [
            {**base, "statistic": statistic, "value": value, **extra} for statistic, value, extra in _statistics(r)
        ]
    return rows


def _statistics(r: ResultEvidence) -> list[tuple[str, float, dict]]:
    """(statistic, value, extra columns) of one result, for :func:`evidence_rows`."""
    out: list[tuple[str, float, dict]] = []
    if "point" in r.ci:
        out.append(
            (
                "ci",
                r.ci["point"],
                {"low": r.ci["low"], "high": r.ci["high"], "unit": r.ci["unit"], "n": r.n, "n_clusters": r.n_clusters},
            )
        )
    d = r.delong or {}
    if d.get("kind") == "binary":
        out.append(("delong_auc", d["auc"], {k: d[k] for k in ("se", "low", "high", "unit")}))
    elif d.get("kind") == "multilabel":
        unit = d["mean"]["unit"]
        for name, v in [("mean", d["mean"]), *d["per_label"].items()]:
            out.append(
                (
                    "delong_auc",
                    v["auc"],
                    {"label": name, "se": v["se"], "low": v["low"], "high": v["high"], "unit": unit},
                )
            )
    cal = r.calibration or {}
    for when in ("before", "after"):
        summary = cal.get(when) or {}
        for k in CAL_KEYS if summary else ():
            out.append((f"{k}_{when}", summary[k], {}))
            out += [(f"{k}_{when}", v[k], {"label": name}) for name, v in (summary.get("per_label") or {}).items()]
    out += [("temperature", t, {"label": f"seed {i}"}) for i, t in enumerate(cal.get("temperature") or [])]
    for attribute, report in r.subgroups.items():
        for group, entry in (report.get("groups") or {}).items():
            for key in ("metric", "auc", "ece"):
                ci = entry.get(key) or {}
                if "point" in ci:
                    extra = {
                        "attribute": attribute,
                        "group": group,
                        "low": ci["low"],
                        "high": ci["high"],
                        "unit": entry["unit"],
                        "n": entry["n"],
                        "n_clusters": entry["n_clusters"],
                        "flags": "; ".join(entry["flags"]),
                    }
                    out.append((f"subgroup_{key}", ci["point"], extra))
        if report.get("gap") is not None:
            out.append(("subgroup_gap", report["gap"], {"attribute": attribute, "group": report.get("worst")}))
        if report.get("equalized_odds"):
            out.append(("equalized_odds_difference", report["equalized_odds"]["difference"], {"attribute": attribute}))
    return out


def evidence_document(ev: Evidence) -> dict:
    """``evidence.json``: every statistic per result (by folder), the paired tests and both rankings."""
    results = {
        folder: {
            "dataset": r.dataset,
            "model": r.model,
            "metric": r.metric,
            "unit": r.unit,
            "n": r.n,
            "n_clusters": r.n_clusters,
            "cells": [c.label for c in ev.cells if c.folder == folder],
            "ci": r.ci,
            "delong": r.delong,
            "calibration": r.calibration,
            "reliability": r.reliability,
            "subgroups": r.subgroups,
            "notes": r.notes,
        }
        for folder, r in ev.results.items()
    }
    within = [{**w, "column": w["column"].label(False)} for w in ev.within]
    across = [{k: v for k, v in a.items() if k != "block"} for a in ev.across]
    settings = {"resamples": ev.resamples, "seed": ev.seed, "level": ev.level}
    if ev.spec is not None:
        settings["subgroups"] = {"by": ev.spec.by, "datasets": ev.spec.datasets, "min_size": ev.spec.min_size}
    return to_jsonable(
        {
            "settings": settings,
            "results": results,
            "paired": ev.paired,
            "within": within,
            "across": across,
            "notes": ev.notes,
        }
    )
