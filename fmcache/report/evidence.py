"""Reviewer-grade evidence for every paper cell, computed from the saved predictions (each file read once).

A *cell* is one number of Tables 1-3 or Fig. 2, filled by one result (:func:`paper_cells`). Per result:

* **CI at the unit.** The cell's seed-mean test metric, bootstrapped over the result's independent units (whole
  patients, lesions, exams, studies: ``test_groups`` in ``predictions.npz``, named by ``group_unit`` in
  ``result.json``), stratified by class (:mod:`fmcache.report.resampling`). A result saved without ``test_groups``
  (or whose groups are all ``image:<id>``) is bootstrapped by image, and says so.
* **DeLong** (:mod:`fmcache.report.delong`): the AUC's standard error, cluster-robust at the same unit, for AUC
  cells (binary AUC; per label and for the mean of multi-label mean AUC).
* **Calibration** (:mod:`fmcache.report.calibration`): ECE (15 bins, L1), MCE, Brier, NLL of the saved
  probabilities, per seed and averaged (per label for multi-label); one temperature per seed fitted on val and
  applied to test, before and after; reliability data pooled over seeds (and labels) for the diagrams. k-NN
  scores are vote shares, not trained probabilities: reported the same way, and the notes say so.
* **Subgroups** (:mod:`fmcache.report.subgroups`), for the attributes asked for (:class:`SubgroupSpec`).

Per column of a paper table (one output, head, regime, dataset, metric, split): the best model against each
other with the paired bootstrap at the unit and, for AUC cells, the paired DeLong test; rank intervals and the
tier tied with the best (:func:`fmcache.report.ranking.ranking_from_values`). Per output, head and regime across
datasets: Friedman and Nemenyi's critical difference (:func:`fmcache.report.ranking.compare_models`).

One draw serves a result: its per-seed bootstrap values (:func:`fmcache.report.resampling.per_seed_values`) give its
CI, every paired test it is in (A − B on the same resamples: results of one column share test rows, units and
labels, so the same seed draws the same resamples) and its rank interval. Results are processed column by column,
so only one column's predictions are held in memory.
"""

from __future__ import annotations

import contextlib
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmcache.config import load_config
from fmcache.errors import FmcacheError
from fmcache.progress import progress_bar
from fmcache.report import calibration, delong, ranking, resampling, subgroups
from fmcache.report.paper import OUTPUTS, SEED_KNN_K
from fmcache.report.predictions import LEVEL, META, RESAMPLES, SEED, Predictions, align, load_splits, seed_mean
from fmcache.report.tables import HEAD_NAMES, Column, protocol_of, seed_knn_point
from fmcache.results import PREDICTIONS, check_predictions

AGE_COLUMNS = ("age", "age_approx")  # what age_bin is derived from, in this order
AUC_METRICS = ("auc", "mean_auc")


# ---------------------------------------------------------------------------------------------------------------
# cells


@dataclass
class Cell:
    """One number of a paper output and the result that fills it."""

    output: str  # table1_frozen, table2_unfrozen, table3_1024px, fig2_knn
    column: Column
    model: str
    head: str | None  # linear / deit; None for k-NN
    regime: str  # frozen / fine-tuned
    doc: dict

    @property
    def folder(self) -> str:
        return self.doc["folder"]

    @property
    def block(self) -> tuple[str, str, str]:
        """What ranks across datasets: one output, head and regime."""
        return (self.output, self.head or "knn", self.regime)

    @property
    def label(self) -> str:
        if self.head is None:
            return f"{OUTPUTS[self.output].label} k-NN"
        return f"{OUTPUTS[self.output].label} {HEAD_NAMES[self.head]} {self.regime}"

    @property
    def point(self) -> float | None:
        """The number the paper output shows."""
        if self.head is None:
            return (seed_knn_point(self.doc) or {}).get("test")
        return (self.doc.get("summary") or {}).get("test_mean")


def paper_cells(head: dict[str, dict], knn: dict) -> list[Cell]:
    """The cells of the head tables (``{output: tables.head_cells(...)}``) and of Fig. 2 (``tables.knn_cells``)."""
    cells = [
        Cell(output, column, model, head_name, regime, doc)
        for output, found in head.items()
        for (model, column, head_name, regime), (doc, _n) in found.items()
    ]
    cells += [Cell("fig2_knn", column, model, None, "frozen", doc) for (model, column), (doc, _n) in knn.items()]
    return cells


# ---------------------------------------------------------------------------------------------------------------
# subgroups: what to split by


@dataclass(frozen=True)
class SubgroupSpec:
    """The attributes to split every cell's test set by: ``by`` for every dataset, or ``datasets`` per dataset
    (its list replaces ``by`` there). ``age_bin`` is derived from an ``age``/``age_approx`` column."""

    by: tuple[str, ...] = ()
    datasets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    age_edges: tuple[float, ...] = subgroups.AGE_EDGES
    min_size: int = subgroups.MIN_SIZE
    source: str = "--by"

    def attributes(self, dataset: str) -> tuple[str, ...]:
        return self.datasets.get(dataset, self.by)


SUBGROUP_KEYS = ("by", "datasets", "age_edges", "min_size")


def _names(value: object, where: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise FmcacheError(f"{where} must be a comma list or a YAML list of column names, e.g. sex,age_bin,view")
    names = tuple(v.strip() for v in items if v.strip())
    if not names:
        raise FmcacheError(f"{where} names no column; e.g. sex,age_bin,view")
    return names


def subgroup_spec(by: str | Sequence[str] | None = None, file: Path | None = None) -> SubgroupSpec | None:
    """The subgroup request from ``--by a,b`` or ``--subgroups FILE.yaml`` (keys: ``by``, ``datasets`` {name:
    list}, ``age_edges``, ``min_size``); None when neither is given. Both at once is an error."""
    if by is not None and file is not None:
        raise FmcacheError("give --by or --subgroups FILE.yaml, not both")
    if file is None:
        return None if by is None else SubgroupSpec(by=_names(by, "--by"))
    config = load_config(file)
    unknown = sorted(set(config) - set(SUBGROUP_KEYS))
    if unknown:
        raise FmcacheError(f"{file} has unknown key(s) {', '.join(unknown)}; valid: {', '.join(SUBGROUP_KEYS)}")
    per_dataset = config.get("datasets") or {}
    if not isinstance(per_dataset, dict):
        raise FmcacheError(f"{file}: datasets must map a dataset name to its columns, e.g. chexpert: [sex, view]")
    spec = SubgroupSpec(
        by=_names(config["by"], f"{file}: by") if config.get("by") is not None else (),
        datasets={str(k): _names(v, f"{file}: datasets.{k}") for k, v in per_dataset.items()},
        age_edges=_edges(config.get("age_edges"), file),
        min_size=_min_size(config.get("min_size", subgroups.MIN_SIZE), file),
        source=str(file),
    )
    if not spec.by and not spec.datasets:
        raise FmcacheError(f"{file} names no column to split by; give by: [sex, age_bin] or datasets: {{...}}")
    return spec


def _edges(value: object, file: Path) -> tuple[float, ...]:
    if value is None:
        return subgroups.AGE_EDGES
    try:
        edges = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise FmcacheError(f"{file}: age_edges must be a list of numbers, e.g. [0, 40, 60, 80]") from None
    subgroups.age_bin([], edges)  # increasing, at least two: one clear line otherwise
    return (*edges, np.inf) if edges[-1] != np.inf else edges


def _min_size(value: object, file: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FmcacheError(f"{file}: min_size must be a whole number of at least 1, got {value!r}")
    return value


def _npz_columns(doc: dict) -> set[str]:
    """The test metadata columns a result's ``predictions.npz`` holds, from its zip directory only."""
    path = Path(doc["folder"]) / PREDICTIONS
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n.removesuffix(".npy") for n in archive.namelist()]
    except (OSError, zipfile.BadZipFile):
        return set()  # a missing file has no columns; a damaged one is named when it is read
    prefix = f"test{META}"
    return {n[len(prefix) :] for n in names if n.startswith(prefix)}


def available_columns(docs: Sequence[dict]) -> dict[str, set[str]]:
    """{dataset: the attributes its results' test predictions can be split by}: metadata columns, plus
    ``age_bin`` where an age column exists."""
    out: dict[str, set[str]] = {}
    for doc in docs:
        columns = _npz_columns(doc)
        if set(AGE_COLUMNS) & columns:
            columns.add("age_bin")
        out.setdefault(doc["dataset"], set()).update(columns)
    return out


def check_spec(spec: SubgroupSpec, available: dict[str, set[str]]) -> None:
    """One line naming the columns available when an asked attribute is carried by no result (of its dataset)."""
    everywhere = sorted(set().union(*available.values())) if available else []
    listed = ", ".join(everywhere) or "none (no predictions.npz carries test_meta__* columns)"
    for name in spec.by:
        if not any(name in cols for cols in available.values()):
            raise FmcacheError(
                f"{spec.source}: no result's predictions carry a {name!r} column; columns available: {listed}"
            )
    for dataset, names in spec.datasets.items():
        if dataset not in available:
            raise FmcacheError(f"{spec.source}: no paper cell on dataset {dataset!r}; datasets: {', '.join(available)}")
        missing = [n for n in names if n not in available[dataset]]
        if missing:
            have = ", ".join(sorted(available[dataset])) or "none"
            raise FmcacheError(
                f"{spec.source}: dataset {dataset!r} carries no column {missing[0]!r}; columns available there: {have}"
            )


def attribute_values(pred: Predictions, attribute: str, edges: Sequence[float]) -> np.ndarray | None:
    """One group value per test row for ``attribute`` (a metadata column, or ``age_bin``), None when absent."""
    if attribute in pred.meta:
        return pred.meta[attribute]
    if attribute == "age_bin":
        for name in AGE_COLUMNS:
            if name in pred.meta:
                return subgroups.age_bin(_as_float(pred.meta[name]), edges)
    return None


def group_order(name: str) -> tuple:
    """Sort key of subgroup names: numeric bins by their lower edge (``<40``, ``40-59``, ``80+``), other names
    alphabetically, :data:`fmcache.report.subgroups.UNKNOWN` last."""
    if name == subgroups.UNKNOWN:
        return (2, 0.0, name)
    found = re.match(r"(<)?(\d+(?:\.\d+)?)", name)
    if found:
        return (0, -np.inf if found.group(1) else float(found.group(2)), name)
    return (1, 0.0, name)


def _as_float(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "fiu":
        return values.astype(np.float64)
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        with contextlib.suppress(TypeError, ValueError):  # "" or "unknown": missing
            out[i] = float(v)
    return out


# ---------------------------------------------------------------------------------------------------------------
# one result


def unit_of(doc: dict, pred: Predictions) -> tuple[str, np.ndarray | None, str | None]:
    """``(unit, cluster ids or None, note)`` of a result's test rows: the unit ``result.json`` names (or the groups'
    own ``<unit>:`` prefix), image level when the predictions carry no groups or only ``image:<id>`` ones."""
    if pred.groups is None:
        return "image", None, "no test_groups in predictions.npz: bootstrapped by image"
    groups = np.asarray(pred.groups).astype(str)
    kinds = np.char.partition(groups, ":")[:, 0]
    grouped = (kinds != "image") & (groups != "")
    if not grouped.any():
        return "image", None, None
    declared = doc.get("group_unit")
    named, counts = np.unique(kinds[grouped], return_counts=True)
    unit = str(declared or named[np.argmax(counts)]).lower().removesuffix("_id")
    if unit not in resampling.UNITS or unit == "image":
        return "image", None, f"unknown group unit {unit!r}: bootstrapped by image"
    alone = int(np.sum(~grouped))
    note = f"{alone} of {len(groups)} test rows name no {unit}: each is its own cluster" if alone else None
    return unit, groups, note


@dataclass
class ResultEvidence:
    """Everything the report knows about one result; ``values`` (resamples, n_seeds) are its bootstrap draws."""

    folder: str
    dataset: str
    model: str
    metric: str
    unit: str
    n: int
    n_clusters: int
    label_names: list[str] | None
    ci: dict = field(default_factory=dict)
    delong: dict | None = None
    calibration: dict | None = None
    reliability: dict | None = None
    subgroups: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    values: np.ndarray | None = None
    clusters: resampling.Clusters | None = None
    cluster_ids: np.ndarray | None = None


def _guard(compute: Callable[[], dict | None]) -> dict | None:
    """A statistic, or ``{"error": line}`` where it is undefined for these data (reported, never fatal)."""
    try:
        return compute()
    except FmcacheError as exc:
        return {"error": str(exc)}


def label_names(doc: dict, pred: Predictions) -> list[str] | None:
    """The label columns' names of a multi-label result (``class_names`` where it records them)."""
    if not pred.multilabel:
        return None
    names = doc.get("class_names") or (doc.get("details") or {}).get("class_names")
    width = pred.labels.shape[1]
    return [str(n) for n in names] if names and len(names) == width else [f"label_{c}" for c in range(width)]


def _knn_mismatch(doc: dict) -> str | None:
    """Why a k-NN result's predictions are not Fig. 2's number (they hold the best k on val, not the seed's)."""
    if protocol_of(doc).summary != "rows":
        return None
    best = (doc.get("summary") or {}).get("best") or {}
    point = seed_knn_point(doc) or {}
    if best.get("k") != SEED_KNN_K or best.get("layer") != point.get("layer"):
        return (
            f"its predictions.npz holds k = {best.get('k')} at layer {best.get('layer')} (the best on val), not "
            f"Fig. 2's k = {SEED_KNN_K}: no CI"
        )
    return None


def result_evidence(
    doc: dict,
    test: Predictions,
    val: Predictions | None,
    spec: SubgroupSpec | None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> ResultEvidence:
    """CI at the unit, DeLong, calibration and subgroups of one result's saved predictions."""
    metric = str(doc.get("metric"))
    unit, ids, note = unit_of(doc, test)
    clusters = resampling.make_clusters(len(test.labels), ids, unit if ids is not None else None, labels=test.labels)
    names = label_names(doc, test)
    ev = ResultEvidence(
        doc["folder"], doc["dataset"], doc["model"], metric, unit, len(test.labels), clusters.n_clusters, names
    )
    ev.clusters, ev.cluster_ids = clusters, ids
    ev.notes += [note] if note else []
    mismatch = _knn_mismatch(doc)
    if mismatch:
        ev.ci = {"error": mismatch}
    else:
        try:
            ev.values = resampling.per_seed_values(metric, test, clusters, resamples, seed)
            point = seed_mean(metric, test)
            values = ev.values.mean(axis=1)
            ev.ci = {**resampling.ci_from_values(point, values, clusters, resamples, seed, level), "metric": metric}
        except FmcacheError as exc:
            ev.values, ev.ci = None, {"error": str(exc)}
    ev.delong = _guard(lambda: delong_of(metric, test, ids, unit, level, names))
    ev.calibration, ev.reliability = calibration_of(test, val, names)
    if spec is not None:
        for attribute in spec.attributes(doc["dataset"]):
            groups = attribute_values(test, attribute, spec.age_edges)
            if groups is None:  # another result of its dataset carries it (check_spec); this one is named
                ev.notes.append(f"its predictions carry no {attribute!r} column: no {attribute} subgroups")
                continue
            ev.subgroups[attribute] = _guard(
                lambda g=groups: subgroups.subgroup_report(
                    metric, test, g, ids, unit if ids is not None else None, resamples, seed, level, spec.min_size
                )
            )
    return ev


def delong_of(
    metric: str,
    pred: Predictions,
    ids: np.ndarray | None,
    unit: str,
    level: float = LEVEL,
    names: list[str] | None = None,
    other: Predictions | None = None,
) -> dict | None:
    """DeLong for an AUC cell: the SE (or, with ``other``, the paired test against it) of the seed-mean AUC, per
    label and for the mean for multi-label data; None for other metrics."""
    if metric not in AUC_METRICS:
        return None
    unit_arg = unit if ids is not None else None
    if pred.multilabel:
        b = None if other is None else other.scores
        out = delong.multilabel_delong(pred.labels, pred.scores, b, names, ids, unit_arg, level)
        return {"kind": "multilabel", **out}
    if pred.scores.shape[2] != 2:
        raise FmcacheError(f"DeLong needs a binary task; these scores have {pred.scores.shape[2]} classes")
    if other is None:
        return {"kind": "binary", **delong.auc_se(pred.labels, pred.scores[:, :, 1], ids, unit_arg, level)}
    return {
        "kind": "binary",
        **delong.delong_test(pred.labels, pred.scores[:, :, 1], other.scores[:, :, 1], ids, unit_arg),
    }


def _not_probabilities(pred: Predictions) -> str | None:
    s = pred.scores
    if np.any(~np.isfinite(s)) or s.min() < -1e-6 or s.max() > 1 + 1e-6:
        return "the saved scores are not probabilities (outside [0, 1]): no calibration"
    if not pred.multilabel and np.max(np.abs(s.sum(axis=2) - 1)) > 1e-3:
        return "the saved scores do not sum to 1 per sample (not probabilities): no calibration"
    return None


def _named(summary: dict | None, names: list[str] | None) -> dict | None:
    """A calibration summary with its ``label_<c>`` keys renamed to the label names."""
    if not summary or "per_label" not in summary or names is None:
        return summary
    per_label = {names[int(k.removeprefix("label_"))]: v for k, v in summary["per_label"].items()}
    return {**summary, "per_label": per_label}


def pooled_reliability(scores: np.ndarray, labels: np.ndarray, multilabel: bool) -> dict:
    """Reliability-diagram data pooled over seeds (and labels for multi-label data, NaN masked)."""
    if multilabel:
        y = np.broadcast_to(np.asarray(labels, dtype=np.float64), scores.shape)
        return calibration.binary_reliability(scores.ravel(), y.ravel())
    return calibration.reliability(scores.reshape(-1, scores.shape[2]), np.tile(labels, len(scores)))


def calibration_of(test: Predictions, val: Predictions | None, names: list[str] | None) -> tuple[dict, dict | None]:
    """``(calibration, reliability)``: the library's temperature scaling (T per seed on val) with the test summary
    before and after, or the summary alone where val has no matching predictions."""
    why = _not_probabilities(test)
    if why:
        return {"error": why}, None
    ml = test.multilabel
    try:
        if val is None or val.scores.shape[0] != test.scores.shape[0] or _not_probabilities(val):
            before = calibration.summary(test.scores, test.labels, ml)
            out = {"before": before, "after": None, "temperature": None, "note": "no usable val predictions: no T"}
            return _with_names(out, names), {"before": pooled_reliability(test.scores, test.labels, ml)}
        out = calibration.temperature_scaling(val.scores, val.labels, test.scores, test.labels, ml)
        scaled = np.stack(
            [calibration.apply_temperature(s, t, ml) for s, t in zip(test.scores, out["temperature"], strict=True)]
        )
        reliability = {
            "before": pooled_reliability(test.scores, test.labels, ml),
            "after": pooled_reliability(scaled, test.labels, ml),
        }
        return _with_names(out, names), reliability
    except FmcacheError as exc:
        return {"error": str(exc)}, None


def _with_names(out: dict, names: list[str] | None) -> dict:
    return {**out, "before": _named(out["before"], names), "after": _named(out.get("after"), names)}


# ---------------------------------------------------------------------------------------------------------------
# one column of a paper table: paired tests and the ranking within the dataset


def same_rows(a: Predictions, b: Predictions) -> bool:
    """The same test rows, in one order, with the same units and labels: one draw serves both."""
    if not np.array_equal(a.ids, b.ids):
        return False
    if (a.groups is None) != (b.groups is None) or (a.groups is not None and not np.array_equal(a.groups, b.groups)):
        return False
    return np.array_equal(np.asarray(a.labels, float), np.asarray(b.labels, float), equal_nan=True)


def _pair(best: Cell, other: Cell, evs: dict, preds: dict, resamples: int, seed: int, level: float) -> dict:
    ea, eb = evs[best.folder], evs[other.folder]
    a, b = preds[best.folder], preds[other.folder]
    row = {
        "comparison": best.label,
        "output": best.output,
        "head": best.head,
        "regime": best.regime,
        "dataset": best.column.dataset,
        "column": best.column.label(False),
        "metric": ea.metric,
        "best": best.model,
        "other": other.model,
        "unit": ea.unit,
    }
    try:
        if same_rows(a, b) and ea.unit == eb.unit:
            delta = ea.ci["point"] - eb.ci["point"]
            diff = ea.values.mean(axis=1) - eb.values.mean(axis=1)
            row.update(resampling.paired_from_values(delta, diff, ea.clusters, resamples, seed, level))
            ids = ea.cluster_ids
        else:  # other rows or order: align on the common ids and draw for this pair
            a, b = align(a, b)
            unit, ids, _ = unit_of(best.doc, a)
            clusters = resampling.make_clusters(len(a.labels), ids, unit if ids is not None else None, labels=a.labels)
            row.update(resampling.paired_metric_test(ea.metric, a, b, clusters, resamples, seed, level))
            row["unit"] = unit
        row["metric"] = ea.metric
    except FmcacheError as exc:
        row["error"] = str(exc)
        return row
    row["delong"] = _guard(lambda: delong_of(ea.metric, a, ids, row["unit"], level, ea.label_names, other=b))
    return row


def compare_column(
    cells: Sequence[Cell], evs: dict, preds: dict, resamples: int, seed: int, level: float
) -> tuple[list[dict], dict | None]:
    """The best cell (by its bootstrapped point) against each other, and the ranking within the dataset."""
    usable = [c for c in cells if evs[c.folder].values is not None]
    if len(usable) < 2:
        return [], None
    best = max(usable, key=lambda c: (evs[c.folder].ci["point"], c.model))
    paired = [_pair(best, c, evs, preds, resamples, seed, level) for c in usable if c is not best]
    ranked = [c for c in usable if same_rows(preds[c.folder], preds[best.folder])]
    if len(ranked) < 2:
        return paired, None
    within = ranking.ranking_from_values(
        evs[best.folder].metric,
        [c.model for c in ranked],
        [evs[c.folder].values for c in ranked],
        [evs[c.folder].ci["point"] for c in ranked],
        evs[best.folder].clusters,
        resamples,
        seed,
        level,
    )
    in_ranking = {c.folder for c in ranked}
    left_out = sorted(c.model for c in usable if c.folder not in in_ranking)
    meta = {"comparison": best.label, "output": best.output, "head": best.head, "regime": best.regime}
    return paired, {
        **meta,
        "dataset": best.column.dataset,
        "column": best.column,
        "left_out": left_out,
        **within,
    }


# ---------------------------------------------------------------------------------------------------------------
# across datasets


def across_datasets(cells: Sequence[Cell], alpha: float = 0.05) -> tuple[list[dict], list[str]]:
    """Friedman and Nemenyi per output, head and regime over the datasets where every compared model has a cell
    (per dataset, the column with the most models); models missing anywhere are left out and named."""
    blocks: dict[tuple, dict[Column, dict[str, float]]] = {}
    labels: dict[tuple, str] = {}
    for c in cells:
        if c.point is not None and np.isfinite(float(c.point)):
            blocks.setdefault(c.block, {}).setdefault(c.column, {})[c.model] = float(c.point)
            labels[c.block] = c.label
    out, notes = [], []
    for block, columns in sorted(blocks.items()):
        per_dataset: dict[str, tuple[Column, dict[str, float]]] = {}
        for column, models in sorted(columns.items()):
            if column.dataset not in per_dataset or len(models) > len(per_dataset[column.dataset][1]):
                per_dataset[column.dataset] = (column, models)
        chosen = [per_dataset[d] for d in sorted(per_dataset, key=lambda d: (per_dataset[d][0].position, d))]
        common = sorted(set.intersection(*(set(m) for _, m in chosen)))
        every = sorted(set.union(*(set(m) for _, m in chosen)))
        if len(chosen) < 2 or len(common) < 2:
            notes.append(
                f"{labels[block]}: no ranking across datasets ({len(chosen)} dataset(s), {len(common)} model(s) "
                "with a cell in each; Friedman needs at least 2 of each)"
            )
            continue
        table = np.array([[models[m] for m in common] for _, models in chosen])
        result = ranking.compare_models(table, common, alpha)
        out.append(
            {
                "block": block,
                "comparison": labels[block],
                "datasets": [c.label(False) for c, _ in chosen],
                "left_out": [m for m in every if m not in common],
                "table": table,
                **result,
            }
        )
    return out, notes


# ---------------------------------------------------------------------------------------------------------------
# the whole report


@dataclass
class Evidence:
    """Per result (by folder), per column comparison, per block across datasets."""

    cells: list[Cell]
    results: dict[str, ResultEvidence]
    paired: list[dict]
    within: list[dict]
    across: list[dict]
    notes: list[str]
    spec: SubgroupSpec | None
    available: dict[str, set[str]]
    absent: list[str]
    resamples: int
    seed: int
    level: float


def compute(
    cells: Sequence[Cell],
    spec: SubgroupSpec | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> Evidence:
    """Every statistic of every cell, reading each result's ``predictions.npz`` once (checked against its sha256).

    A cell whose result saved no predictions is named through ``log`` and left out of the statistics; a damaged
    file is one error line. Columns are processed one at a time, so memory holds one column's predictions."""
    available = available_columns([c.doc for c in cells])
    if spec is not None:
        check_spec(spec, available)
    columns: dict[tuple, list[Cell]] = {}
    for c in cells:
        columns.setdefault((c.block, c.column), []).append(c)
    results: dict[str, ResultEvidence] = {}
    paired, within, absent = [], [], []
    folders = {c.folder for c in cells}
    with progress_bar(progress, len(folders), "evidence", verb="evidence", unit="results/s") as advance:
        for key in sorted(columns, key=lambda k: (k[0], k[1])):
            preds = {}
            for c in columns[key]:
                loaded = _load(c.doc, log, absent)
                if loaded is None:
                    continue
                test, val = loaded
                preds[c.folder] = test
                if c.folder not in results:
                    results[c.folder] = result_evidence(c.doc, test, val, spec, resamples, seed, level)
                    advance(1)
            present = [c for c in columns[key] if c.folder in preds]
            pairs, ranked = compare_column(present, results, preds, resamples, seed, level)
            paired += pairs
            within += [ranked] if ranked else []
    across, notes = across_datasets(cells)
    return Evidence(
        list(cells),
        results,
        paired,
        within,
        across,
        notes,
        spec,
        available,
        sorted(set(absent)),
        resamples,
        seed,
        level,
    )


def _load(doc: dict, log: Callable[[str], None], absent: list[str]) -> tuple[Predictions, Predictions | None] | None:
    data = check_predictions(doc)
    if data is None:
        if doc["folder"] not in absent:
            log(f"warning: {doc['folder']} has no predictions.npz; its cell is shown but it is not in the bootstrap")
        absent.append(doc["folder"])
        return None
    splits = load_splits(doc["folder"], ("test", "val"), data)
    if splits.get("test") is None:
        absent.append(doc["folder"])
        return None
    return splits["test"], splits.get("val")
