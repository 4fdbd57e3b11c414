"""The paper's tables from a results tree: Table 1 (linear/DeiT × frozen/fine-tuned), Table 2 (k-NN), timings.

Each table keeps two faces: ``rows`` (display text, what Markdown, LaTeX and HTML show) and ``records`` (numbers,
what the values CSV holds). A cell without a result is :data:`MISSING`, never 0, and a cell whose run finished
fewer seeds than it asked for carries :data:`FEWER_SEEDS`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fmcache.errors import FmcacheError

MISSING = "–"
FEWER_SEEDS = "†"
# the paper's order first; any other dataset follows alphabetically
PAPER_DATASETS = ("aptos2019", "cbis_ddsm", "isic2019", "chexpert")
HEADS = ("linear", "deit")
REGIMES = ("frozen", "fine-tuned")
HEAD_NAMES = {"linear": "linear", "deit": "DeiT"}
FREEZE_NONE = ("none", "0", None)


@dataclass
class Table:
    """One table: display ``header``/``rows`` and machine-readable ``records`` (one dict per value)."""

    name: str  # file stem: table1, table2_knn, timings, ...
    title: str
    header: list[str]
    rows: list[list[str]]
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_results(root: Path) -> list[dict]:
    """Every complete result under ``root``; no results at all is a user error (exit 2), not an empty report."""
    from fmcache.results import find_results

    root = Path(root)
    if not root.is_dir():
        raise FmcacheError(f"results folder {root} does not exist; run `fmcache grid CONFIG.yaml` or an evaluation")
    found = find_results(root)
    if not found:
        raise FmcacheError(
            f"no results under {root}: no folder holds a complete result.json; run `fmcache grid CONFIG.yaml` first"
        )
    return found


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


def table1_column(doc: dict) -> tuple[str, str] | None:
    """(head, regime) of a probe/fine-tune result in Table 1, or None when it belongs to a study, not the table.

    Frozen: the probes from the cache, else fine-tuning with every block frozen (the online frozen baseline).
    Fine-tuned: fine-tuning with no block frozen. Partly frozen (Fig. 4) and decapitated runs are studies.
    """
    protocol = doc.get("protocol", "")
    if protocol in ("probe_linear", "probe_deit"):
        return protocol.split("_")[1], "frozen"
    if protocol in ("finetune_linear", "finetune_deit"):
        settings = doc.get("settings") or {}
        if settings.get("drop_after") is not None:
            return None
        freeze = settings.get("freeze", "none")
        freeze = None if freeze is None else str(freeze)
        if freeze in FREEZE_NONE:
            return protocol.split("_")[1], "fine-tuned"
        if freeze == "all":
            return protocol.split("_")[1], "frozen"
    return None


def _val(doc: dict) -> float:
    value = (doc.get("summary") or {}).get("val_mean")
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


def table1_cells(docs: Sequence[dict]) -> dict[tuple[str, str, str, str], dict]:
    """{(model, dataset, head, regime): the chosen result} for Table 1."""
    groups: dict[tuple[str, str, str, str], list[dict]] = {}
    for doc in docs:
        column = table1_column(doc)
        if column is not None and (doc.get("summary") or {}).get("test_mean") is not None:
            groups.setdefault((doc["model"], doc["dataset"], *column), []).append(doc)
    # the frozen column is the cached probe's; an online frozen fine-tune stands in only where no probe ran
    return {
        key: pick([d for d in group if d["protocol"].startswith("probe")] or group)  # type: ignore[misc]
        for key, group in groups.items()
    }


def dataset_metrics(docs: Iterable[dict]) -> dict[str, str]:
    out: dict[str, str] = {}
    for doc in docs:
        if doc.get("metric") and doc.get("protocol") != "cka":  # CKA's "metric" is the similarity, not the dataset's
            out.setdefault(doc["dataset"], doc["metric"])
    return out


def cell_text(summary: dict) -> str:
    text = f"{fmt(summary.get('test_mean'))} ± {fmt(summary.get('test_std'))}"
    return text + (FEWER_SEEDS if fewer_seeds(summary) else "")


def table1(docs: Sequence[dict], cis: dict[str, dict] | None = None) -> Table:
    """Rows = models; columns = datasets × {linear, DeiT} × {frozen, fine-tuned}; test mean ± std at the val LR.

    ``cis`` maps a result folder to its bootstrap CI (:mod:`fmcache.report.stats`), added to the records.
    """
    cells = table1_cells(docs)
    datasets, models = ordered_datasets(docs), ordered_models(docs)
    metric = dataset_metrics(docs)
    columns = [(d, h, r) for d in datasets for h in HEADS for r in REGIMES]
    header = ["model"] + [f"{d} ({metric.get(d, '?')}) {HEAD_NAMES[h]} {r}" for d, h, r in columns]
    rows, records, marked = [], [], False
    for model in models:
        row = [model]
        for dataset, head, regime in columns:
            doc = cells.get((model, dataset, head, regime))
            record = {"model": model, "dataset": dataset, "metric": metric.get(dataset), "head": head,
                      "regime": regime}  # fmt: skip
            if doc is None:
                row.append(MISSING)
                records.append({**record, "test_mean": None, "test_std": None, "n_seeds": None})
                continue
            s = doc["summary"]
            marked |= fewer_seeds(s)
            row.append(cell_text(s))
            ci = (cis or {}).get(doc["folder"], {})
            records.append({
                **record, "test_mean": s.get("test_mean"), "test_std": s.get("test_std"),
                "val_mean": s.get("val_mean"), "best_lr": s.get("best_lr"), "n_seeds": s.get("n_seeds"),
                "seeds_requested": s.get("seeds_requested"), "fewer_seeds": fewer_seeds(s),
                "ci_low": ci.get("low"), "ci_high": ci.get("high"), "protocol": doc["protocol"],
                "folder": doc["folder"],
            })  # fmt: skip
        rows.append(row)
    notes = [
        "Test metric, mean ± std over seeds, at the learning rate with the best mean validation metric.",
        f"{MISSING}: no result for that cell.",
    ]
    if marked:
        notes.append(f"{FEWER_SEEDS}: fewer seeds finished than were requested.")
    return Table("table1", "Table 1: frozen and fine-tuned, linear and DeiT heads", header, rows, records, notes)


def _knn_best_val(doc: dict) -> float:
    summary = doc.get("summary") or {}
    best = summary.get("best") or {}
    for row in summary.get("rows") or []:
        if row.get("split") == "val" and row.get("k") == best.get("k") and row.get("layer") == best.get("layer"):
            return float(row["value"]) if row.get("value") is not None else -math.inf
    return -math.inf


def knn_temperature(doc: dict) -> float | None:
    summary = doc.get("summary") or {}
    best = summary.get("best") or {}
    for row in summary.get("rows") or []:
        if row.get("k") == best.get("k") and row.get("temperature") is not None:
            return float(row["temperature"])
    t = (doc.get("settings") or {}).get("temperature")
    return None if t is None else float(t)


def knn_cells(docs: Sequence[dict]) -> dict[tuple[str, str], dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for doc in docs:
        if doc.get("protocol") == "knn" and (doc.get("summary") or {}).get("best"):
            groups.setdefault((doc["model"], doc["dataset"]), []).append(doc)
    return {
        key: max(group, key=lambda d: (_knn_best_val(d), d.get("written_at") or "")) for key, group in groups.items()
    }


def table2(docs: Sequence[dict], cis: dict[str, dict] | None = None) -> Table:
    """k-NN: rows = models, columns = datasets; each cell the test metric at the k (and layer) chosen, with k and T."""
    cells = knn_cells(docs)
    datasets, models = ordered_datasets(docs), ordered_models(docs)
    metric = dataset_metrics(docs)
    header = ["model"] + [f"{d} ({metric.get(d, '?')})" for d in datasets]
    rows, records = [], []
    for model in models:
        row = [model]
        for dataset in datasets:
            doc = cells.get((model, dataset))
            if doc is None:
                row.append(MISSING)
                records.append({"model": model, "dataset": dataset, "metric": metric.get(dataset), "test": None})
                continue
            best = doc["summary"]["best"]
            t = knn_temperature(doc)
            row.append(f"{fmt(best.get('test'))} (k={best.get('k')}, T={t:g}, layer {best.get('layer')})")
            ci = (cis or {}).get(doc["folder"], {})
            records.append({
                "model": model, "dataset": dataset, "metric": metric.get(dataset), "test": best.get("test"),
                "k": best.get("k"), "temperature": t, "layer": best.get("layer"), "ci_low": ci.get("low"),
                "ci_high": ci.get("high"), "folder": doc["folder"],
            })  # fmt: skip
        rows.append(row)
    notes = ["Weighted k-NN on L2-normalised features, train split as the bank; k, T and layer chosen as recorded."]
    return Table("table2_knn", "Table 2: k-NN", header, rows, records, notes)


def protocol_label(doc: dict) -> str:
    """A short name of an evaluation and its variant: ``finetune_linear (freeze 4)``, ``probe_deit``, ..."""
    protocol = doc.get("protocol", "?")
    settings = doc.get("settings") or {}
    if protocol.startswith("finetune"):
        extra = f"freeze {settings.get('freeze', 'none')}"
        if settings.get("drop_after") is not None:
            extra += f", drop after {settings['drop_after']}"
        return f"{protocol} ({extra})"
    return protocol


def timing_table(docs: Sequence[dict]) -> Table:
    """The data of the paper's Fig. 3: extraction s/img, training s and inference s/img per evaluation."""
    header = ["dataset", "model", "protocol", "extract s/img", "train s", "inference s/img"]
    rows, records = [], []
    position = {name: i for i, name in enumerate(ordered_datasets(docs))}
    labelled = sorted(
        ((d, protocol_label(d)) for d in docs if d.get("protocol") != "cka"),
        key=lambda dl: (position[dl[0]["dataset"]], dl[0]["model"], dl[1]),
    )
    for doc, label in labelled:
        t = doc.get("timings") or {}
        values = [t.get("extract_seconds_per_image"), t.get("train_seconds"), t.get("inference_seconds_per_sample")]
        rows.append([doc["dataset"], doc["model"], label, *(fmt_seconds(v) for v in values)])
        records.append({
            "dataset": doc["dataset"], "model": doc["model"], "protocol": label,
            "extract_seconds_per_image": values[0], "train_seconds": values[1],
            "inference_seconds_per_sample": values[2], "folder": doc["folder"],
        })  # fmt: skip
    notes = ["Seconds as recorded by each run (k-NN: the search time). Extraction is paid once per cache."]
    return Table("timings", "Time per stage", header, rows, records, notes)
