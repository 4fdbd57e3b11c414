"""The paper's tables from a results tree: Table 1 (frozen), Table 2 (unfrozen), Table 3 (1024 px), and the data of
Fig. 2 (k-NN) and Fig. 3 (time), each named after the paper's own number (:mod:`fmcache.report.paper`).

A table cell never mixes what the paper keeps apart: results are grouped by dataset, metric and split (a column per
combination), by model, head and regime, and only results of the paper's protocol enter a cell (the paper's feature
at the last layer, the DeiT head on the paper's tokens, 224 px for Tables 1-2). Where several results compete for one
cell (other LR grids, epochs, views), the one with the best mean validation metric is chosen, as the paper chooses
its learning rate, and a note names the cell and how many competed.

Each table keeps two faces: ``rows`` (display text, what Markdown, LaTeX and HTML show) and ``records`` (numbers,
what the values CSV holds). A cell without a result is :data:`MISSING`, never 0, and a cell whose run finished
fewer seeds than it asked for carries :data:`FEWER_SEEDS`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fmcache.errors import FmcacheError
from fmcache.protocols import HEAD_LABELS, Protocol, get_protocol
from fmcache.report.paper import OUTPUTS, SEED_KNN_K, freeze_of, outputs_of, variation
from fmcache.results import find_results

MISSING = "–"
FEWER_SEEDS = "†"
# the paper's order first; any other dataset follows alphabetically
PAPER_DATASETS = ("aptos2019", "cbis_ddsm", "isic2019", "chexpert")
HEADS = ("linear", "deit")  # the paper's heads, in its column order
HEAD_NAMES = {h: HEAD_LABELS[h] for h in HEADS}


@dataclass
class Table:
    """One table: display ``header``/``rows`` and machine-readable ``records`` (one dict per value)."""

    name: str  # file stem, after the paper's number: table1_frozen, fig2_knn, ...
    title: str
    header: list[str]
    rows: list[list[str]]
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_results(root: Path, log=print, strict: bool = False) -> tuple[list[dict], list[str]]:
    """Every complete result under ``root`` that keeps the results contract (:func:`fmcache.results.find_results`
    checks each), and the skipped ``result.json`` files (``path (why)``): unreadable, breaking the contract (a missing
    ``metric``, ``summary``, ``dataset`` ...), or with a damaged ``subsets.npz``. Each is named through ``log``, never
    hidden; ``strict`` makes any of them an error (exit 2). No results at all is a user error, not an empty report."""
    root = Path(root)
    if not root.is_dir():
        raise FmcacheError(f"results folder {root} does not exist; run `fmcache grid CONFIG.yaml` or an evaluation")
    problems: list[tuple[Path, str]] = []
    found = find_results(root, problems)
    for path, why in problems:
        log(f"warning: skipped {path}: {why}; rerun that evaluation or remove its folder")
    if strict and problems:
        path, why = problems[0]
        raise FmcacheError(f"--strict: {len(problems)} result file(s) skipped (named above); first: {path}: {why}")
    if not found:
        raise FmcacheError(
            f"no results under {root}: no folder holds a complete result.json; run `fmcache grid CONFIG.yaml` first"
        )
    return found, [f"{p} ({why})" for p, why in problems]


def ordered_datasets(docs: Iterable[dict]) -> list[str]:
    names = {d["dataset"] for d in docs}
    return [d for d in PAPER_DATASETS if d in names] + sorted(names - set(PAPER_DATASETS))


def ordered_models(docs: Iterable[dict]) -> list[str]:
    return sorted({d["model"] for d in docs})


def fmt(value: float | None, digits: int = 4) -> str:
    """A number as the tables show it; None/NaN are missing (an unscored cell is not a zero)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{value:.{digits}f}"


def fmt_seconds(value: float | None) -> str:
    if value is None or not math.isfinite(float(value)):
        return MISSING
    # three significant digits: extraction per image is milliseconds, training is minutes
    return f"{float(value):.3g}"


def doc_outputs(doc: dict) -> list[str]:
    """The paper outputs a result feeds (:func:`fmcache.report.paper.outputs_of` on its settings)."""
    settings = _settings_of(doc)
    protocol = protocol_of(doc)
    if protocol.pairs:
        settings["same_model"] = _cka_same_model(doc)
    return outputs_of(protocol, settings, doc.get("model", ""), doc.get("img_size"))


def protocol_of(doc: dict) -> Protocol:
    """The protocol row of a result (its traits decide where the result goes)."""
    return get_protocol(str(doc.get("protocol", "")))


def transferred(doc: dict) -> bool:
    """A result that scored another result's heads on a cache (its protocol's records name a source and a target):
    the report's external-validation section shows it (:mod:`fmcache.report.external`), no paper or supplementary
    table."""
    return {"source", "target"} <= set(protocol_of(doc).records)


def cka_model_b(doc: dict) -> str | None:
    """The second model of a two-cache CKA (None for a self-CKA)."""
    settings = doc.get("settings") or {}
    details = doc.get("details") or {}
    model_b = settings.get("model_b") or (details.get("cache_b") or {}).get("model")
    key_b = settings.get("cache_b_key") or (details.get("cache_b") or {}).get("cache_key")
    if key_b is None or key_b == doc.get("cache_key"):
        return None
    return model_b


def _cka_same_model(doc: dict) -> bool:
    """A CKA of one model's two caches (before and after fine-tuning: Fig. 7)."""
    return cka_model_b(doc) == doc.get("model")


@dataclass(frozen=True, order=True)
class Column:
    """A dataset under one metric and one split: the unit a table's columns never mix."""

    position: int
    dataset: str
    metric: str
    split: str  # a short hash of the split identity ("" when the result does not record it)
    split_label: str = ""

    def label(self, several_splits: bool) -> str:
        text = f"{self.dataset} ({self.metric})"
        return text + (f" [split {self.split_label or self.split}]" if several_splits else "")


def column_of(doc: dict) -> Column:
    """The column of ``doc``; its position is the dataset's place in the paper (others after, by name), fixed for
    every table, so a cell's key is the same whichever results are present."""
    split = doc.get("split")
    digest = hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()[:8] if split else ""
    mode = str((split or {}).get("mode") or (split or {}).get("kind") or "") if isinstance(split, dict) else ""
    dataset = doc["dataset"]
    position = PAPER_DATASETS.index(dataset) if dataset in PAPER_DATASETS else len(PAPER_DATASETS)
    return Column(position, dataset, str(doc.get("metric")), digest, mode)


def columns_of(docs: Sequence[dict]) -> tuple[list[Column], set[tuple[str, str]]]:
    """The columns present, in the paper's dataset order, and the (dataset, metric) pairs with several splits."""
    columns = sorted({column_of(d) for d in docs})
    splits: dict[tuple[str, str], set[str]] = {}
    for c in columns:
        splits.setdefault((c.dataset, c.metric), set()).add(c.split)
    return columns, {pair for pair, values in splits.items() if len(values) > 1}


def _val(doc: dict) -> float:
    """The val metric a result competes on for a cell, by its protocol's rule (``competes_by``)."""
    value: object = doc.get("summary") or {}
    for part in protocol_of(doc).competes_by.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if value is not None and math.isfinite(float(value)) else -math.inf


def fewer_seeds(summary: dict) -> bool:
    n, asked = summary.get("n_seeds"), summary.get("seeds_requested")
    return n is not None and asked is not None and int(n) < int(asked)


def pick(candidates: Sequence[dict]) -> dict | None:
    """Of several results for one cell (other settings), the one with the best mean val metric, then the newest.

    Choosing on val keeps test untouched by the choice, as the LR is chosen.
    """
    if not candidates:
        return None
    return max(candidates, key=lambda d: (_val(d), d.get("written_at") or ""))


def _regime(doc: dict) -> str:
    trains = protocol_of(doc).trains_foundation and freeze_of(doc.get("settings") or {}) == "none"
    return "fine-tuned" if trains else "frozen"


def head_cells(docs: Sequence[dict], output: str) -> dict[tuple, tuple[dict, int]]:
    """{(model, column, head, regime): (chosen result, how many competed)} for a head table."""
    groups: dict[tuple, list[dict]] = {}
    for doc in docs:
        if output not in doc_outputs(doc) or (doc.get("summary") or {}).get("test_mean") is None:
            continue
        head = protocol_of(doc).head
        if head not in HEADS:
            continue
        groups.setdefault((doc["model"], column_of(doc), head, _regime(doc)), []).append(doc)
    cells = {}
    for key, group in groups.items():
        # a frozen cell is the cached probe's; an online frozen fine-tune stands in only where no probe ran
        probes = [d for d in group if not protocol_of(d).trains_foundation]
        chosen_from = probes or group
        cells[key] = (pick(chosen_from), len(chosen_from))
    return cells


def cell_text(summary: dict) -> str:
    text = f"{fmt(summary.get('test_mean'))} ± {fmt(summary.get('test_std'))}"
    return text + (FEWER_SEEDS if fewer_seeds(summary) else "")


def head_table(
    docs: Sequence[dict], output: str, regimes: Sequence[str], cis: dict | None = None, cells: dict | None = None
) -> Table:
    """Rows = models; columns = (dataset, metric, split) × head (× regime); test mean ± std at the best val LR.
    ``cells``: :func:`head_cells` of ``docs`` when the caller has them already."""
    cells = head_cells(docs, output) if cells is None else cells
    used = [d for d, _ in cells.values()]
    columns, several = columns_of(used)
    models = ordered_models(used)
    grid = [(c, h, r) for c in columns for h in HEADS for r in regimes]
    show_regime = len(regimes) > 1
    header = ["model"] + [
        f"{c.label((c.dataset, c.metric) in several)} {HEAD_NAMES[h]}" + (f" {r}" if show_regime else "")
        for c, h, r in grid
    ]
    rows, records, marked, competed = [], [], False, []
    for model in models:
        row = [model]
        for column, head, regime in grid:
            found = cells.get((model, column, head, regime))
            record = {
                "model": model,
                "dataset": column.dataset,
                "metric": column.metric,
                "split": column.split,
                "head": head,
                "regime": regime,
            }
            if found is None:
                row.append(MISSING)
                records.append({**record, "test_mean": None, "test_std": None, "n_seeds": None})
                continue
            doc, n = found
            s = doc["summary"]
            marked |= fewer_seeds(s)
            row.append(cell_text(s))
            ci = (cis or {}).get(doc["folder"], {})
            records.append(
                {
                    **record,
                    "test_mean": s.get("test_mean"),
                    "test_std": s.get("test_std"),
                    "val_mean": s.get("val_mean"),
                    "best_lr": s.get("best_lr"),
                    "n_seeds": s.get("n_seeds"),
                    "seeds_requested": s.get("seeds_requested"),
                    "fewer_seeds": fewer_seeds(s),
                    "ci_low": ci.get("low"),
                    "ci_high": ci.get("high"),
                    "ci_unit": ci.get("unit"),
                    "protocol": doc["protocol"],
                    "candidates": n,
                    "folder": doc["folder"],
                }
            )
            if n > 1:
                competed.append(f"{model} / {column.label(False)} / {HEAD_NAMES[head]}: {n} results")
        rows.append(row)
    paper = OUTPUTS[output]
    notes = [
        f"{paper.label}: {paper.caption}. Test metric, mean ± std over seeds, at the learning rate with the best mean "
        "validation metric.",
        f"{MISSING}: no result for that cell.",
    ]
    if marked:
        notes.append(f"{FEWER_SEEDS}: fewer seeds finished than were requested.")
    if competed:
        notes.append(
            "Several results competed for these cells; each shows the one with the best mean validation metric "
            "(as the paper chooses its LR): " + "; ".join(competed) + "."
        )
    title = f"{paper.label}: {paper.caption}"
    return Table(output, title, header, rows, records, notes)


def seed_knn_point(doc: dict) -> dict | None:
    """The seed's k-NN value of a result (Fig. 2): k = 200, T = 0.1, at its last layer, with the val value it
    competes on; None when the result did not score that k."""
    rows = [r for r in (doc.get("summary") or {}).get("rows") or [] if r.get("k") == SEED_KNN_K]
    if not rows:
        return None
    layer = max((r.get("layer") for r in rows), key=lambda v: (isinstance(v, int), v if isinstance(v, int) else 0))
    by_split = {r.get("split"): r.get("value") for r in rows if r.get("layer") == layer}
    t = rows[0].get("temperature", (doc.get("settings") or {}).get("temperature"))
    return {"k": SEED_KNN_K, "temperature": t, "layer": layer, "test": by_split.get("test"), "val": by_split.get("val")}


def _knn_val(doc: dict) -> float:
    point = seed_knn_point(doc) or {}
    value = point.get("val")
    return float(value) if value is not None and math.isfinite(float(value)) else -math.inf


def knn_cells(docs: Sequence[dict]) -> dict[tuple[str, Column], tuple[dict, int]]:
    """{(model, column): (chosen result, how many competed)} for Fig. 2: results that fill it by the paper's rule
    (:func:`fmcache.report.paper.outputs_of`: the seed's k and T, the paper feature, 224 px), the best val at k = 200
    winning among several, then the newest."""
    groups: dict[tuple[str, Column], list[dict]] = {}
    for doc in docs:
        if "fig2_knn" in doc_outputs(doc) and seed_knn_point(doc) is not None:
            groups.setdefault((doc["model"], column_of(doc)), []).append(doc)
    return {
        key: (max(group, key=lambda d: (_knn_val(d), d.get("written_at") or "")), len(group))
        for key, group in groups.items()
    }


def knn_table(docs: Sequence[dict], cis: dict[str, dict] | None = None, cells: dict | None = None) -> Table:
    """Fig. 2's data: rows = models, columns = (dataset, metric, split); each cell the test metric of the seed's k-NN
    (k = 200, T = 0.1, the paper feature at the last layer) (``cells``: :func:`knn_cells` of ``docs``)."""
    cells = knn_cells(docs) if cells is None else cells
    columns, several = columns_of([d for d, _ in cells.values()])
    models = ordered_models([d for d, _ in cells.values()])
    header = ["model"] + [c.label((c.dataset, c.metric) in several) for c in columns]
    rows, records = [], []
    for model in models:
        row = [model]
        for column in columns:
            found = cells.get((model, column))
            if found is None:
                row.append(MISSING)
                records.append({"model": model, "dataset": column.dataset, "metric": column.metric, "test": None})
                continue
            doc, n = found
            point = seed_knn_point(doc)
            row.append(fmt(point["test"]))
            ci = (cis or {}).get(doc["folder"], {})
            records.append(
                {
                    "model": model,
                    "dataset": column.dataset,
                    "metric": column.metric,
                    "split": column.split,
                    **point,
                    "ci_low": ci.get("low"),
                    "ci_high": ci.get("high"),
                    "ci_unit": ci.get("unit"),
                    "candidates": n,
                    "folder": doc["folder"],
                }
            )
        rows.append(row)
    paper = OUTPUTS["fig2_knn"]
    notes = [
        f"{paper.label}: {paper.caption}. Weighted k-NN on the L2-normalised paper feature at the last layer, the "
        "train split as the bank; the seed's fixed k and T (a k/T sweep is supp_knn_sweep)."
    ]
    return Table("fig2_knn", f"{paper.label} (data): {paper.caption}", header, rows, records, notes)


def knn_temperature(doc: dict) -> float | None:
    summary = doc.get("summary") or {}
    best = summary.get("best") or {}
    for row in summary.get("rows") or []:
        if row.get("k") == best.get("k") and row.get("temperature") is not None:
            return float(row["temperature"])
    t = (doc.get("settings") or {}).get("temperature")
    return None if t is None else float(t)


def protocol_label(doc: dict) -> str:
    """A short name of an evaluation and its variant: ``finetune_linear (freeze 4)``, ``probe_deit``, ..."""
    protocol = doc.get("protocol", "?")
    settings = doc.get("settings") or {}
    if protocol_of(doc).trains_foundation:
        extra = f"freeze {settings.get('freeze', 'none')}"
        if settings.get("drop_after") is not None:
            extra += f", drop after {settings['drop_after']}"
        return f"{protocol} ({extra})"
    return protocol


def timing_table(docs: Sequence[dict]) -> Table:
    """Fig. 3's data: extraction s/img, training s and inference s/img per evaluation."""
    header = ["dataset", "model", "protocol", "extract s/img", "train s", "inference s/img"]
    rows, records = [], []
    position = {name: i for i, name in enumerate(ordered_datasets(docs))}
    labelled = sorted(
        ((d, protocol_label(d)) for d in docs if protocol_of(d).summary != "matrix"),  # a CKA trains nothing
        key=lambda dl: (position[dl[0]["dataset"]], dl[0]["model"], dl[1]),
    )
    for doc, label in labelled:
        t = doc.get("timings") or {}
        values = [t.get("extract_seconds_per_image"), t.get("train_seconds"), t.get("inference_seconds_per_sample")]
        rows.append([doc["dataset"], doc["model"], label, *(fmt_seconds(v) for v in values)])
        records.append(
            {
                "dataset": doc["dataset"],
                "model": doc["model"],
                "protocol": label,
                "extract_seconds_per_image": values[0],
                "train_seconds": values[1],
                "inference_seconds_per_sample": values[2],
                "folder": doc["folder"],
            }
        )
    paper = OUTPUTS["fig3_time"]
    notes = [
        f"{paper.label}: {paper.caption}. Seconds as recorded by each run (k-NN: the search time); extraction "
        "is paid once per cache."
    ]
    return Table("fig3_time", f"{paper.label} (data): {paper.caption}", header, rows, records, notes)


# -- supplementary outputs: every result that fills no paper output, grouped by what it varies --------------------


def _supp_value(doc: dict) -> tuple[str, dict]:
    """A result's headline as a cell and as numbers, by its summary's shape."""
    summary, kind = doc.get("summary") or {}, protocol_of(doc).summary
    if kind == "rows":
        best = summary.get("best") or {}
        t = knn_temperature(doc)
        text = (
            f"{fmt(best.get('test'))} (k={best.get('k')}, T={t if t is None else f'{t:g}'}, layer {best.get('layer')})"
        )
        return text, {"test": best.get("test"), "val": best.get("val"), "k": best.get("k"), "temperature": t}
    if kind == "matrix":
        matrix = summary.get("matrix") or []
        last = matrix[-1][-1] if matrix and matrix[-1] else None
        return f"last-layer CKA {fmt(last)}", {"last_layer_cka": last}
    return cell_text(summary), {k: summary.get(k) for k in ("test_mean", "test_std", "val_mean", "best_lr")}


def supplementary_tables(docs: Sequence[dict]) -> list[Table]:
    """One ``supp_<variation>`` table per way results depart from the paper (:func:`fmcache.report.paper.variation`:
    a LoRA fine-tune, a cosine schedule, 1024 px outside Table 3, the k/T sweep, a label-efficiency subset, an
    attentive head ...), so nothing in the results tree vanishes from the report (transfer results have the external
    validation section, :mod:`fmcache.report.external`)."""
    groups: dict[str, list[dict]] = {}
    for doc in docs:
        if not doc_outputs(doc) and not transferred(doc):
            name = variation(protocol_of(doc), _settings_of(doc), doc.get("model", ""), doc.get("img_size"))
            groups.setdefault(name, []).append(doc)
    tables = []
    header = ["dataset", "model", "protocol", "img px", "test (mean ± std over seeds)", "folder"]
    for name, group in sorted(groups.items()):
        rows, records = [], []
        for doc in sorted(group, key=lambda d: (d["dataset"], d["model"], d["folder"])):
            text, numbers = _supp_value(doc)
            rows.append(
                [
                    doc["dataset"],
                    doc["model"],
                    protocol_label(doc),
                    str(doc.get("img_size") or MISSING),
                    text,
                    doc["folder"],
                ]
            )
            records.append(
                {
                    "dataset": doc["dataset"],
                    "model": doc["model"],
                    "protocol": doc.get("protocol"),
                    "img_size": doc.get("img_size"),
                    "metric": doc.get("metric"),
                    **numbers,
                    "folder": doc["folder"],
                }
            )
        notes = [
            f"Results that fill no paper output because they vary: {name.replace('_', ' ')}. Test metric at "
            "the learning rate (or k) with the best validation metric."
        ]
        tables.append(Table(f"supp_{name}", f"Supplementary: {name.replace('_', ' ')}", header, rows, records, notes))
    return tables


def _settings_of(doc: dict) -> dict:
    settings = dict(doc.get("settings") or {})
    if doc.get("paper_feature") is not None:
        settings["paper_feature"] = doc["paper_feature"]
    return settings
