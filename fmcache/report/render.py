"""``fmcache report``: gather a results tree, compute the tables, CIs, tests and figures, and write them out.

Markdown (``report.md``) and CSV (per table: the displayed cells and the numbers) are always written; LaTeX
(``report.tex``, booktabs) and ``report.html`` (one file, figures embedded as base64, no network) on request.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path

from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes, ensure_writable_dir
from fmcache.report import stats
from fmcache.report.figures import Figure, all_figures, label_efficiency
from fmcache.report.paper import OUTPUTS
from fmcache.report.tables import (
    HEAD_NAMES,
    MISSING,
    Table,
    fmt,
    head_cells,
    head_table,
    knn_cells,
    knn_table,
    load_results,
    protocol_of,
    supplementary_tables,
    timing_table,
)
from fmcache.results import check_predictions, train_subset

FORMATS = ("md", "csv", "tex", "html")
# the paper's head tables and the regimes each shows
HEAD_TABLES = {
    "table1_frozen": ("frozen",),
    "table2_unfrozen": ("fine-tuned",),
    "table3_1024px": ("fine-tuned",),
}
ALWAYS = ("md", "csv")


def parse_formats(text: str) -> list[str]:
    asked = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in asked if f not in FORMATS]
    if bad:
        raise FmcacheError(f"unknown --format {', '.join(bad)}; valid: {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in asked or f in ALWAYS]


def ci_table(
    docs: Sequence[dict], cis: dict[str, dict], absent: Sequence[str] = (), skipped: Sequence[str] = ()
) -> Table:
    by_folder = {d["folder"]: d for d in docs}
    header = ["dataset", "model", "protocol", "metric", "point", "95 % CI", "n test"]
    rows, records = [], []
    for folder, ci in sorted(cis.items(), key=lambda kv: (by_folder[kv[0]]["dataset"], by_folder[kv[0]]["model"])):
        doc = by_folder[folder]
        label = doc["protocol"]
        if "error" in ci:
            rows.append([doc["dataset"], doc["model"], label, doc["metric"], MISSING, MISSING, MISSING])
            records.append({"dataset": doc["dataset"], "model": doc["model"], "protocol": label, "error": ci["error"]})
            continue
        rows.append(
            [
                doc["dataset"],
                doc["model"],
                label,
                doc["metric"],
                fmt(ci["point"]),
                f"[{fmt(ci['low'])}, {fmt(ci['high'])}]",
                str(ci["n"]),
            ]
        )
        records.append(
            {
                "dataset": doc["dataset"],
                "model": doc["model"],
                "protocol": label,
                "metric": doc["metric"],
                **{k: ci[k] for k in ("point", "low", "high", "n", "resamples", "failed", "seed")},
                "folder": folder,
            }
        )
    resamples = next((c["resamples"] for c in cis.values() if "resamples" in c), stats.RESAMPLES)
    notes = [f"Percentile bootstrap over test samples ({resamples} resamples, seeded) of the seed-mean test metric."]
    notes += [f"Not in the bootstrap (no predictions.npz): {folder}." for folder in absent]
    notes += [f"Skipped, unreadable: {item}." for item in skipped]
    return Table(
        "supp_bootstrap_ci",
        "Supplementary: 95 % bootstrap confidence intervals of the table cells",
        header,
        rows,
        records,
        notes,
    )


def paired_table(rows_in: list[dict]) -> Table:
    header = ["dataset", "column", "best", "other", "difference", "95 % CI", "p"]
    rows, records = [], []
    for r in rows_in:
        if "error" in r:
            rows.append([r["dataset"], r["column"], r["best"], r["other"], MISSING, MISSING, MISSING])
        else:
            rows.append(
                [
                    r["dataset"],
                    r["column"],
                    r["best"],
                    r["other"],
                    fmt(r["delta"]),
                    f"[{fmt(r['low'])}, {fmt(r['high'])}]",
                    f"{r['p_value']:.3g}",
                ]
            )
        records.append(r)
    notes = [
        "Paired bootstrap on the same test ids: the best model (by test mean) against each other model; "
        "two-sided p for no difference."
    ]
    return Table(
        "supp_paired_tests", "Supplementary: paired bootstrap tests between models", header, rows, records, notes
    )


def build_tables(
    docs: Sequence[dict], resamples: int, seed: int, log=print, skipped: Sequence[str] = ()
) -> list[Table]:
    """The paper's tables in its order, then the supplementary ones (CIs name what they leave out)."""
    head = {key: head_cells(docs, key) for key in HEAD_TABLES}
    knn = knn_cells(docs)
    chosen = {d["folder"]: d for cells in head.values() for d, _ in cells.values()}
    chosen.update({d["folder"]: d for d, _ in knn.values()})
    # every predictions.npz once, checked against its recorded sha256 (a damaged one is an error even where no table
    # shows its result); the CIs and the paired tests read the same arrays
    predictions, absent = {}, []
    for doc in docs:
        if not protocol_of(doc).predictions:
            continue
        data = check_predictions(doc)
        if data is None:
            where = "its cell is shown but it is not in the bootstrap" if doc["folder"] in chosen else "it has no CI"
            log(f"warning: {doc['folder']} has no predictions.npz; {where}")
            absent += [doc["folder"]] if doc["folder"] in chosen else []
            continue
        parsed = stats.load_predictions(doc["folder"], data=data)  # a damaged file is one error line, used or not
        if doc["folder"] in chosen:
            predictions[doc["folder"]] = parsed
    with_pred = [doc for folder, doc in chosen.items() if folder in predictions]
    cis = stats.cell_cis(with_pred, resamples, seed, predictions)
    groups: dict[tuple[str, str], list[dict]] = {}
    for key, cells in head.items():
        for (_model, column, head_name, regime), (doc, _n) in cells.items():
            if doc["folder"] in predictions:
                label = f"{OUTPUTS[key].label} {HEAD_NAMES[head_name]} {regime}"
                groups.setdefault((column.label(True), label), []).append(doc)
    for (_model, column), (doc, _n) in knn.items():
        if doc["folder"] in predictions:
            groups.setdefault((column.label(True), "Fig. 2 k-NN"), []).append(doc)
    tests = stats.paired_tests(groups, resamples, seed, predictions)
    tables = [head_table(docs, key, regimes, cis, head[key]) for key, regimes in HEAD_TABLES.items()]
    tables += [knn_table(docs, cis, knn), timing_table(docs), ci_table(docs, cis, absent, skipped), paired_table(tests)]
    tables += supplementary_tables(docs)
    return tables


# -- writers -------------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown(tables: Sequence[Table], figures: Sequence[Figure], source: Path) -> str:
    lines = ["# fmcache report", "", f"Results: `{source}`", ""]
    for t in tables:
        lines += [f"## {t.title}", ""]
        if not t.rows:
            lines += ["(none)", ""]
            continue
        lines.append("| " + " | ".join(_md_cell(h) for h in t.header) + " |")
        lines.append("|" + "|".join("---" for _ in t.header) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
        lines += [""] + [f"{n}  " for n in t.notes] + [""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{f.title}](figures/{f.path.name})" for f in figures]
        lines.append("")
    return "\n".join(lines)


def _csv(header: Sequence[str], rows: Sequence[Sequence]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _records_csv(records: Sequence[dict]) -> bytes:
    columns: dict[str, None] = {}
    for r in records:
        columns.update(dict.fromkeys(r))
    rows = [["" if r.get(c) is None else r.get(c) for c in columns] for r in records]
    return _csv(list(columns), rows)


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "–": "--",
    "†": r"$^\dagger$",
    "×": r"$\times$",
}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def latex(tables: Sequence[Table]) -> str:
    out = ["% fmcache report; needs \\usepackage{booktabs}", ""]
    for t in tables:
        if not t.rows:
            continue
        out += [
            "\\begin{table}[t]",
            "\\centering",
            "\\small",
            f"\\caption{{{_tex(t.title)}}}",
            f"\\begin{{tabular}}{{l{'r' * (len(t.header) - 1)}}}",
            "\\toprule",
            " & ".join(_tex(h) for h in t.header) + " \\\\",
            "\\midrule",
        ]
        out += [" & ".join(_tex(c) for c in row) + " \\\\" for row in t.rows]
        out += ["\\bottomrule", "\\end{tabular}"]
        out += [f"\\\\[2pt]\\footnotesize {_tex(n)}" for n in t.notes]
        out += ["\\end{table}", ""]
    return "\n".join(out)


_CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eef}td:first-child{text-align:left}
.note{font-size:90%;color:#555}figure{display:inline-block;margin:1em}img{max-width:560px}"""


def html_page(tables: Sequence[Table], figures: Sequence[Figure], source: Path) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'><title>fmcache report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>fmcache report</h1>",
        f"<p>Results: <code>{esc(str(source))}</code></p>",
    ]
    for t in tables:
        parts.append(f"<h2>{esc(t.title)}</h2>")
        if not t.rows:
            parts.append("<p>(none)</p>")
            continue
        parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in t.header) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in t.rows]
        parts.append("</tbody></table>")
        parts += [f"<p class='note'>{esc(n)}</p>" for n in t.notes]
    if figures:
        parts.append("<h2>Figures</h2>")
    for f in figures:
        # embedded, so the one file opens offline and travels alone
        data = base64.b64encode(f.path.read_bytes()).decode()
        parts.append(
            f"<figure><img alt='{esc(f.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{esc(f.title)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(
    results: Path,
    out: Path = Path("report"),
    formats: Sequence[str] = ALWAYS,
    resamples: int = stats.RESAMPLES,
    seed: int = stats.SEED,
    log=print,
    strict: bool = False,
) -> dict:
    """Write the report of every complete result under ``results`` into ``out``; returns the files written.

    A result file that cannot be used (unreadable, breaking the results contract, a damaged ``subsets.npz``) is
    skipped with a warning naming it, or with ``strict`` refused (exit 2) before anything is written."""
    if resamples < 1:
        raise FmcacheError(f"--resamples must be at least 1, got {resamples}")
    docs, skipped = load_results(results, log, strict)
    # label-efficiency runs (a train subset) draw their own curves and never fill a cell of the paper's outputs
    subset_docs = [d for d in docs if train_subset(d) is not None]
    docs = [d for d in docs if train_subset(d) is None]
    out = ensure_writable_dir(Path(out))
    tables = build_tables(docs, resamples, seed, log, skipped)
    figures = all_figures(docs, out / "figures") + label_efficiency(subset_docs, out / "figures")
    written: list[Path] = []

    def write(name: str, data: bytes) -> None:
        atomic_write_bytes(out / name, data)
        written.append(out / name)

    write("report.md", markdown(tables, figures, Path(results)).encode())
    for t in tables:
        write(f"{t.name}.csv", _csv(t.header, t.rows))
        write(f"{t.name}_values.csv", _records_csv(t.records))
    if "tex" in formats:
        write("report.tex", latex(tables).encode())
    if "html" in formats:
        write("report.html", html_page(tables, figures, Path(results)).encode())
    return {
        "out": out,
        "files": written + [f.path for f in figures],
        "tables": tables,
        "figures": figures,
        "n_results": len(docs),
    }
