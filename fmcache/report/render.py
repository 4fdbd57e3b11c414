"""``fmcache report``: gather a results tree, compute the tables, the evidence and the figures, and write them out.

Markdown (``report.md``) and CSV (per table: the displayed cells and the numbers) are always written; LaTeX
(``report.tex``, booktabs) and ``report.html`` (one file, figures embedded as base64, no network) on request. The
evidence (:mod:`fmcache.report.evidence`) adds ``evidence.json`` and ``supp_evidence.csv`` (one row per result and
statistic) to the report's folder; the results tree is only read. Every output is grouped into :data:`SECTIONS`,
one per statistic, in each format.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes, ensure_writable_dir
from fmcache.report.figures import Figure, all_figures, label_efficiency
from fmcache.report.predictions import RESAMPLES, SEED, load_predictions
from fmcache.report.tables import (
    Table,
    head_cells,
    head_table,
    knn_cells,
    knn_table,
    load_results,
    protocol_of,
    supplementary_tables,
    timing_table,
)
from fmcache.results import check_predictions, csv_bytes, train_subset

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


# the report's sections, one per statistic: (key, title, table-name prefixes, figure-name prefixes, what it holds);
# a table or figure goes to the first section whose prefix it starts with
SECTIONS = (
    ("paper", "The paper's tables", ("table", "fig"), (), ""),
    (
        "ci",
        "Confidence intervals at the unit",
        ("supp_bootstrap_ci",),
        (),
        "Each cell's 95 % bootstrap CI, resampling "
        "whole patients (lesions, exams, studies) where the predictions name them.",
    ),
    (
        "paired",
        "Paired tests between models",
        ("supp_paired_",),
        (),
        "The best model of each column against each "
        "other on the same test rows: paired bootstrap at the unit and, for AUC cells, paired DeLong.",
    ),
    ("delong", "DeLong standard errors", ("supp_delong",), (), "DeLong's SE of every AUC cell, cluster-robust."),
    (
        "calibration",
        "Calibration",
        ("supp_calibration",),
        ("supp_reliability_",),
        "ECE, MCE, Brier and NLL of the "
        "saved probabilities, before and after temperature scaling fitted on val; reliability diagrams.",
    ),
    (
        "subgroups",
        "Subgroups",
        ("supp_subgroups",),
        ("supp_forest_",),
        "The cell's metric, AUC and ECE per group "
        "with within-group CIs; the worst group, the largest gap, the equalised-odds difference; forest plots.",
    ),
    (
        "rankings",
        "Rankings",
        ("supp_rank_", "supp_friedman"),
        ("supp_cd_",),
        "Which models tie: rank intervals "
        "within each dataset, Friedman and Nemenyi's critical difference across datasets.",
    ),
    (
        "external",
        "External validation",
        ("external_validation",),
        ("external_validation",),
        "Heads a frozen result selected, scored with no refit on another dataset's cache of the same model, "
        "transform and layer (fmcache transfer): the source's test metric beside the target's.",
    ),
    (
        "corruption",
        "Corruption robustness",
        ("corruption_robustness",),
        ("corruption_robustness",),
        "The clean-trained heads scored on corrupted copies of a test split (fmcache extract --corrupt, then "
        "fmcache transfer): metric against severity per foundation.",
    ),
    ("supplementary", "Supplementary outputs", ("supp_",), (), "Results that fill no paper output."),
    ("figures", "Figures", (), ("",), ""),
)


def section_of(name: str, figure: bool = False) -> str:
    for key, _title, tables, figures, _what in SECTIONS:
        if any(name.startswith(prefix) for prefix in (figures if figure else tables)):
            return key
    return "figures" if figure else "supplementary"


def subgroup_notes(ev) -> list[str]:
    """What the subgroup section cannot show, and why: nothing asked for (naming the columns that could be), no
    metadata at all, or an asked column some datasets do not carry."""
    columns = sorted(set().union(*ev.available.values())) if ev.available else []
    if ev.spec is None and not columns:
        return [
            "No subgroups: these results' predictions carry no per-sample metadata (no test_meta__* arrays in "
            "predictions.npz; results written before the per-sample contract have none)."
        ]
    if ev.spec is None:
        return [f"No subgroups asked for: give --by {','.join(columns[:3])} (columns available: {', '.join(columns)})."]
    notes = []
    for attribute in dict.fromkeys(a for d in ev.available for a in ev.spec.attributes(d)):
        lacking = [
            d for d, cols in ev.available.items() if attribute in ev.spec.attributes(d) and attribute not in cols
        ]
        if lacking:
            notes.append(
                f"{attribute}: not carried by the predictions of {', '.join(sorted(lacking))} (no table there)."
            )
    return notes


def build_tables(
    docs: Sequence[dict],
    resamples: int,
    seed: int,
    log=print,
    skipped: Sequence[str] = (),
    subgroups=None,
    progress: bool = False,
):
    """The paper's tables in its order, the evidence's tables, then the supplementary ones; and the evidence
    (:class:`fmcache.report.evidence.Evidence`) and the external validation
    (:class:`fmcache.report.external.External`) for the figures and files. ``subgroups``: a
    :class:`fmcache.report.evidence.SubgroupSpec` or None."""
    from fmcache.report import evidence, evidence_tables, external, external_tables  # deferred: scipy

    head = {key: head_cells(docs, key) for key in HEAD_TABLES}
    knn = knn_cells(docs)
    cells = evidence.paper_cells(head, knn)
    chosen = {c.folder for c in cells}
    # every other predictions.npz is checked against its recorded sha256 and parsed once (a damaged one is an error
    # even where no table shows its result); the cells' files are read once, by the evidence, column by column, and
    # the transfers' and their sources', by the external validation
    transfers = external.needed_folders(docs)
    for doc in docs:
        if not protocol_of(doc).predictions or doc["folder"] in chosen or doc["folder"] in transfers:
            continue
        data = check_predictions(doc)
        if data is None:
            log(f"warning: {doc['folder']} has no predictions.npz; it has no CI")
            continue
        load_predictions(doc["folder"], data=data)  # a damaged file is one error line, used or not
    ev = evidence.compute(cells, subgroups, resamples, seed, log=log, progress=progress)
    cis = {folder: r.ci for folder, r in ev.results.items()}
    tables = [head_table(docs, key, regimes, cis, head[key]) for key, regimes in HEAD_TABLES.items()]
    tables += [knn_table(docs, cis, knn), timing_table(docs)]
    tables += evidence_tables.evidence_tables(ev, skipped)
    ext = external.compute(docs, ev)
    tables += external_tables.external_tables(ext)
    tables += supplementary_tables(docs)
    return tables, ev, ext


# -- writers -------------------------------------------------------------------------------------------------------


@dataclass
class Section:
    """One section of the report: a statistic (or the paper's tables), its tables, figures and notes."""

    key: str
    title: str
    what: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


EVIDENCE_SECTIONS = ("ci", "paired", "delong", "calibration", "subgroups", "rankings")


def arrange(
    tables: Sequence[Table], figures: Sequence[Figure], notes: dict[str, list[str]] | None = None
) -> list[Section]:
    """Tables and figures into :data:`SECTIONS`, in order; an evidence section is kept even when empty (its notes
    say why), any other only when it holds something."""
    sections = {key: Section(key, title, what) for key, title, _t, _f, what in SECTIONS}
    for t in tables:
        sections[section_of(t.name)].tables.append(t)
    for f in figures:
        sections[section_of(f.name, figure=True)].figures.append(f)
    for key, lines in (notes or {}).items():
        sections[key].notes += lines
    return [s for s in sections.values() if s.tables or s.figures or s.notes or s.key in EVIDENCE_SECTIONS]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown(sections: Sequence[Section], source: Path) -> str:
    lines = ["# fmcache report", "", f"Results: `{source}`", ""]
    for section in sections:
        lines += [f"# {section.title}", ""] + [f"{n}  " for n in [section.what, *section.notes] if n] + [""]
        for t in section.tables:
            lines += [f"## {t.title}", ""]
            if t.rows:
                lines.append("| " + " | ".join(_md_cell(h) for h in t.header) + " |")
                lines.append("|" + "|".join("---" for _ in t.header) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
            else:
                lines.append("(none)")
            lines += [""] + [f"{n}  " for n in t.notes] + [""]
        if section.figures:
            lines += [f"![{f.title}](figures/{f.path.name})" for f in section.figures] + [""]
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
    "≈": r"\ensuremath{\approx}",
    "‡": r"\ensuremath{^\ddagger}",
    "→": r"\ensuremath{\rightarrow}",
    "χ": r"\ensuremath{\chi}",
    "²": r"\textsuperscript{2}",
    "Δ": r"\ensuremath{\Delta}",
    "α": r"\ensuremath{\alpha}",
    "−": "-",
    "·": r"\ensuremath{\cdot}",
    "≥": r"\ensuremath{\geq}",
    "≤": r"\ensuremath{\leq}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "š": r"\v{s}",
}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def _tex_table(t: Table) -> list[str]:
    tabular = [
        f"\\begin{{tabular}}{{l{'r' * (len(t.header) - 1)}}}",
        "\\toprule",
        " & ".join(_tex(h) for h in t.header) + " \\\\",
        "\\midrule",
        *(" & ".join(_tex(c) for c in row) + " \\\\" for row in t.rows),
        "\\bottomrule",
        "\\end{tabular}",
    ]
    if len(t.header) > 8:  # a wide table (labels, groups) is scaled to the text width
        tabular = ["\\resizebox{\\linewidth}{!}{%", *tabular, "}"]
    out = ["\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{_tex(t.title)}}}", *tabular]
    out += [f"\\\\[2pt]\\footnotesize {_tex(n)}" for n in t.notes]
    return [*out, "\\end{table}", ""]


def latex(sections: Sequence[Section]) -> str:
    out = ["% fmcache report; needs \\usepackage{booktabs,graphicx}", ""]
    for section in sections:
        out += [f"\\section*{{{_tex(section.title)}}}"] + [_tex(n) + "\n" for n in [section.what, *section.notes] if n]
        for t in section.tables:
            out += _tex_table(t) if t.rows else []
        for f in section.figures:
            out += [
                "\\begin{figure}[t]",
                "\\centering",
                f"\\includegraphics[width=\\linewidth]{{figures/{f.path.name}}}",
                f"\\caption{{{_tex(f.title)}}}",
                "\\end{figure}",
                "",
            ]
    return "\n".join(out)


_CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eef}td:first-child{text-align:left}
.note{font-size:90%;color:#555}figure{display:inline-block;margin:1em}img{max-width:560px}
section{border-top:2px solid #99b;margin-top:2em}"""


def html_page(sections: Sequence[Section], source: Path) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'><title>fmcache report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>fmcache report</h1>",
        f"<p>Results: <code>{esc(str(source))}</code></p>",
        "<nav><p>" + " · ".join(f"<a href='#{s.key}'>{esc(s.title)}</a>" for s in sections) + "</p></nav>",
    ]
    for section in sections:
        parts.append(f"<section id='{section.key}'><h2>{esc(section.title)}</h2>")
        parts += [f"<p class='note'>{esc(n)}</p>" for n in [section.what, *section.notes] if n]
        for t in section.tables:
            parts.append(f"<h3 id='{esc(t.name)}'>{esc(t.title)}</h3>")
            if not t.rows:
                parts.append("<p>(none)</p>")
            else:
                head = "".join(f"<th>{esc(h)}</th>" for h in t.header)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>")
                parts += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in t.rows]
                parts.append("</tbody></table>")
            parts += [f"<p class='note'>{esc(n)}</p>" for n in t.notes]
        for f in section.figures:
            # embedded, so the one file opens offline and travels alone
            data = base64.b64encode(f.path.read_bytes()).decode()
            parts.append(
                f"<figure><img alt='{esc(f.title)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(f.title)}</figcaption></figure>"
            )
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(
    results: Path,
    out: Path = Path("report"),
    formats: Sequence[str] = ALWAYS,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    log=print,
    strict: bool = False,
    by: str | Sequence[str] | None = None,
    subgroups: Path | None = None,
    progress: bool = False,
) -> dict:
    """Write the report of every complete result under ``results`` into ``out``; returns the files written.

    ``by`` (``"sex,age_bin"`` or a list) or ``subgroups`` (a YAML file: ``by``, ``datasets``, ``age_edges``,
    ``min_size``) ask for subgroup tables; an attribute no result carries is one error line naming those available.
    A result file that cannot be used (unreadable, breaking the results contract, a damaged ``subsets.npz``) is
    skipped with a warning naming it, or with ``strict`` refused (exit 2) before anything is written. Nothing is
    written into the results tree."""
    from fmcache.report import evidence_figures, evidence_tables, external_tables  # deferred: scipy
    from fmcache.report.evidence import subgroup_spec  # deferred: scipy

    if resamples < 1:
        raise FmcacheError(f"--resamples must be at least 1, got {resamples}")
    spec = subgroup_spec(by, subgroups)
    docs, skipped = load_results(results, log, strict)
    # label-efficiency runs (a train subset) draw their own curves and never fill a cell of the paper's outputs
    subset_docs = [d for d in docs if train_subset(d) is not None]
    docs = [d for d in docs if train_subset(d) is None]
    tables, ev, ext = build_tables(docs, resamples, seed, log, skipped, spec, progress)
    out = ensure_writable_dir(Path(out))
    figures = all_figures(docs, out / "figures") + label_efficiency(subset_docs, out / "figures")
    figures += evidence_figures.evidence_figures(ev, out / "figures")
    figures += external_tables.external_figures(ext, out / "figures")
    sections = arrange(tables, figures, {"subgroups": subgroup_notes(ev)})
    written: list[Path] = []

    def write(name: str, data: bytes) -> None:
        atomic_write_bytes(out / name, data)
        written.append(out / name)

    write("report.md", markdown(sections, Path(results)).encode())
    for t in tables:
        write(f"{t.name}.csv", _csv(t.header, t.rows))
        write(f"{t.name}_values.csv", _records_csv(t.records))
    write("supp_evidence.csv", csv_bytes(evidence_tables.evidence_rows(ev)))
    write("evidence.json", (json.dumps(evidence_tables.evidence_document(ev), indent=1) + "\n").encode())
    if "tex" in formats:
        write("report.tex", latex(sections).encode())
    if "html" in formats:
        write("report.html", html_page(sections, Path(results)).encode())
    return {
        "out": out,
        "files": written + [f.path for f in figures],
        "tables": tables,
        "figures": figures,
        "sections": sections,
        "evidence": ev,
        "external": ext,
        "n_results": len(docs),
    }
