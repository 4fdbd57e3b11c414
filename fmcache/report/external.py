"""External validation and corruption robustness, from the results tree's ``transfer`` results (``fmcache transfer``).

A transfer result scores a frozen *source* result's heads on another cache of the same model, transform and layer:
another dataset's (external validation) or a corrupted copy of a test split (``extract --corrupt NAME:SEVERITY``).
Its ``result.json`` names the source (folder, dataset, protocol, cache key, settings hash, test metric) and the
target (dataset, cache, samples evaluated, ``corruption``); its ``predictions.npz`` holds the target's test rows.

Which result is shown (one per cell, chosen the same way every time, the others named in a note):

* a clean transfer's cell is (source dataset, target dataset, model, source protocol); a corruption curve's is the
  same, and every point of one curve comes from one source result;
* of several transfers, the one whose source result fills the paper's Table 1 / Fig. 2 cell for its dataset (the
  paper's rule, :mod:`fmcache.report.paper`), else the one whose source has the best mean validation metric (as the
  tables choose), then the newest transfer, then the folder name.

Statistics, on the predictions (each file read once; a source that fills a paper cell reuses the evidence's draws):

* each result's seed-mean test metric is bootstrapped at its own unit (patients, lesions ... or images), stratified
  by class (:func:`fmcache.report.resampling.per_seed_values`), the source with the report's seed ``s`` (the draws
  of its CI in the CI section), a transfer with ``s + 1`` (:data:`TARGET_STREAM`): the target is another sample;
* Δ = target − source: its CI is the percentile interval of the difference of the two independent bootstraps;
  where the target is the source's own test rows (a transfer to the source's own cache) the two share the draws
  and Δ's CI is the paired one (:func:`fmcache.report.resampling.paired_from_values`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fmcache.errors import FmcacheError
from fmcache.protocols import get_protocol
from fmcache.report import resampling
from fmcache.report.evidence import Evidence, unit_of
from fmcache.report.predictions import LEVEL, RESAMPLES, SEED, Predictions, load_splits, seed_mean
from fmcache.report.tables import ordered_datasets, protocol_of, transferred
from fmcache.results import check_predictions

TARGET_STREAM = 1  # a transfer's resamples are drawn with the report's seed + this (the source's with the seed)
PAPER_SOURCES = ("table1_frozen", "fig2_knn")  # the paper cells whose result is the preferred source


@dataclass
class Boot:
    """One result's seed-mean test metric, bootstrapped at its unit: ``values`` (resamples,), NaN = undefined."""

    metric: str
    point: float
    values: np.ndarray
    ci: dict
    clusters: resampling.Clusters


@dataclass
class Transfer:
    """One transfer result and what the report knows of its source."""

    doc: dict
    source_doc: dict | None  # the source result, where the results tree holds it

    @property
    def folder(self) -> str:
        return self.doc["folder"]

    @property
    def source(self) -> dict:
        return self.doc.get("source") or {}

    @property
    def target(self) -> dict:
        return self.doc.get("target") or {}

    @property
    def model(self) -> str:
        return str(self.doc.get("model"))

    @property
    def source_protocol(self) -> str:
        return str(self.source.get("protocol"))

    @property
    def head(self) -> str:
        """The source's protocol as the tables name it (linear, DeiT, attentive, k-NN)."""
        try:
            return get_protocol(self.source_protocol).label
        except FmcacheError:
            return self.source_protocol

    @property
    def source_dataset(self) -> str:
        return str(self.source.get("dataset"))

    @property
    def target_dataset(self) -> str:
        return str(self.target.get("dataset") or self.doc.get("dataset"))

    @property
    def corruption(self) -> dict | None:
        found = self.target.get("corruption")
        return found if isinstance(found, dict) else None

    @property
    def source_identity(self) -> tuple:
        """What names the source result wherever its tree lies: its cache key, protocol and settings hash."""
        s = self.source
        return (s.get("cache_key"), s.get("protocol"), s.get("settings_hash"))

    @property
    def cell(self) -> tuple[str, str, str, str]:
        return (self.source_dataset, self.target_dataset, self.model, self.source_protocol)

    @property
    def pair(self) -> str:
        return f"{self.source_dataset} → {self.target_dataset}"

    @property
    def source_test(self) -> tuple[float | None, float | None]:
        """The source's test metric (mean, std over seeds) as the transfer recorded it."""
        return _number(self.source.get("test_mean")), _number(self.source.get("test_std"))

    @property
    def target_test(self) -> tuple[float | None, float | None]:
        summary = self.doc.get("summary") or {}
        return _number(summary.get("test_mean")), _number(summary.get("test_std"))


def _number(value: object) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def identity(doc: dict) -> tuple:
    return (doc.get("cache_key"), doc.get("protocol"), doc.get("settings_hash"))


def source_test_of(doc: dict) -> float | None:
    """A source result's own test metric now (what ``transfer`` records as the source's): the head grid's test mean,
    or k-NN's best k's test value."""
    summary = doc.get("summary") or {}
    if protocol_of(doc).summary == "rows":
        return _number((summary.get("best") or {}).get("test"))
    return _number(summary.get("test_mean"))


def source_val(doc: dict | None) -> float:
    """The val metric a source result competes on (its protocol's ``competes_by``); -inf where unknown."""
    value: object = (doc or {}).get("summary") or {}
    if doc is None:
        return -math.inf
    for part in protocol_of(doc).competes_by.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    number = _number(value)
    return -math.inf if number is None else number


def needed_folders(docs: Sequence[dict]) -> set[str]:
    """The folders whose predictions this module reads: every transfer result and the sources the tree holds."""
    index = {identity(d): d for d in docs}
    folders = set()
    for doc in docs:
        if transferred(doc):
            folders.add(doc["folder"])
            source = index.get(Transfer(doc, None).source_identity)
            if source is not None:
                folders.add(source["folder"])
    return folders


# ---------------------------------------------------------------------------------------------------------------
# choosing one result per cell


@dataclass
class Choice:
    """The transfer chosen for a cell, why, and the others that competed."""

    chosen: Transfer
    why: str
    others: list[Transfer] = field(default_factory=list)


def _rank(t: Transfer, paper: set[str]) -> tuple:
    in_paper = t.source_doc is not None and t.source_doc["folder"] in paper
    return (in_paper, source_val(t.source_doc), str(t.doc.get("written_at") or ""), t.folder)


def choose(candidates: Sequence[Transfer], paper: set[str]) -> Choice:
    """The module doc's rule: the paper cell's source, else the best source val, then the newest, then the folder."""
    chosen = max(candidates, key=lambda t: _rank(t, paper))
    if chosen.source_doc is not None and chosen.source_doc["folder"] in paper:
        why = "its source fills the paper's cell"
    elif math.isfinite(source_val(chosen.source_doc)):
        why = "its source has the best mean val metric"
    else:
        why = "the newest (no source val metric in this tree)"
    return Choice(chosen, why, [t for t in candidates if t is not chosen])


# ---------------------------------------------------------------------------------------------------------------
# bootstraps


def boot_of(doc: dict, pred: Predictions, metric: str, resamples: int, seed: int, level: float) -> Boot:
    """The seed-mean ``metric`` of ``pred`` bootstrapped at the result's unit, as the evidence bootstraps a cell."""
    unit, ids, _note = unit_of(doc, pred)
    clusters = resampling.make_clusters(len(pred.labels), ids, unit if ids is not None else None, labels=pred.labels)
    values = resampling.per_seed_values(metric, pred, clusters, resamples, seed).mean(axis=1)
    point = seed_mean(metric, pred)
    ci = {**resampling.ci_from_values(point, values, clusters, resamples, seed, level), "metric": metric}
    return Boot(metric, point, values, ci, clusters)


def same_draws(a: resampling.Clusters, b: resampling.Clusters) -> bool:
    """Equal clusters and strata: the same seed draws the same resamples of both."""
    return (
        a.n_rows == b.n_rows
        and a.unit == b.unit
        and np.array_equal(a.row_cluster, b.row_cluster)
        and np.array_equal(a.strata, b.strata)
    )


def difference_ci(delta: float, target: np.ndarray, source: np.ndarray, level: float = LEVEL) -> dict:
    """Percentile CI of target − source from two bootstraps of equal length (independent samples: each drawn at
    its own unit); a resample undefined on either side is dropped and counted in ``failed``."""
    diff = np.asarray(target, dtype=np.float64) - np.asarray(source, dtype=np.float64)
    kept = diff[np.isfinite(diff)]
    if len(kept) == 0:
        raise FmcacheError("every bootstrap resample left the difference undefined")
    alpha = (1 - level) / 2
    low, high = np.quantile(kept, [alpha, 1 - alpha])
    return {
        "delta": float(delta),
        "low": float(low),
        "high": float(high),
        "level": level,
        "resamples": len(diff),
        "failed": int(len(diff) - len(kept)),
        "kind": "independent",
    }


class _Reader:
    """The test predictions of the folders this module needs, each file read (and checked against its sha256) once,
    and the bootstraps drawn from them."""

    def __init__(self, ev: Evidence):
        self.ev = ev
        self.sources: dict[str, Boot | str] = {}
        self.read: set[str] = set(ev.results)  # the folders whose predictions were read (the evidence's too)

    def test(self, doc: dict) -> Predictions | str:
        """A result's test predictions, or a line saying why there are none."""
        self.read.add(doc["folder"])
        data = check_predictions(doc)  # a damaged or swapped file is one error line
        if data is None:
            return f"{doc['folder']} has no predictions.npz"
        test = load_splits(doc["folder"], ("test",), data).get("test")
        return f"{doc['folder']}'s predictions.npz holds no test split" if test is None else test

    def boot(self, doc: dict, pred: Predictions | str, seed: int) -> Boot | str:
        if isinstance(pred, str):
            return pred
        try:
            return boot_of(doc, pred, str(doc.get("metric")), self.ev.resamples, seed, self.ev.level)
        except FmcacheError as exc:
            return f"{doc['folder']}: {exc}"

    def source(self, t: Transfer) -> Boot | str:
        """The source's bootstrap at the report's seed: the evidence's draws where it bootstrapped that result (the
        draws of its CI in the CI section), else from its predictions."""
        if t.source_doc is None:
            return f"the source result {t.source.get('folder')} is not among this report's results"
        folder = t.source_doc["folder"]
        if folder not in self.sources:
            found = self.ev.results.get(folder)
            if found is not None and found.values is not None and found.clusters is not None:
                values = found.values.mean(axis=1)
                self.sources[folder] = Boot(found.metric, float(found.ci["point"]), values, found.ci, found.clusters)
            else:
                self.sources[folder] = self.boot(t.source_doc, self.test(t.source_doc), self.ev.seed)
        return self.sources[folder]

    def target(self, t: Transfer, source: Boot | None) -> tuple[Boot | str, bool]:
        """A transfer's bootstrap and whether it is paired with the source's: on the source's own clean test rows
        (its own cache, the same clusters) both are drawn with the report's seed, else the transfer's with the seed
        + :data:`TARGET_STREAM`."""
        pred = self.test(t.doc)
        own = source is not None and t.corruption is None and t.target.get("cache_key") == t.source.get("cache_key")
        if own and not isinstance(pred, str):
            boot = self.boot(t.doc, pred, self.ev.seed)
            if isinstance(boot, Boot) and same_draws(source.clusters, boot.clusters):  # type: ignore[union-attr]
                return boot, True
        return self.boot(t.doc, pred, self.ev.seed + TARGET_STREAM), False


# ---------------------------------------------------------------------------------------------------------------
# the rows


@dataclass
class Row:
    """One transfer as the report shows it: the numbers of its result files and its bootstraps."""

    transfer: Transfer
    choice: Choice
    source: Boot | None = None
    target: Boot | None = None
    delta: dict | None = None  # {delta, low, high, kind, ...}; no low/high where no CI
    notes: list[str] = field(default_factory=list)


def _row(choice: Choice, ev: Evidence, reader: _Reader) -> Row:
    t = choice.chosen
    row = Row(t, choice)
    source = reader.source(t)
    if isinstance(source, str):
        row.notes.append(f"no CI of the source: {source}")
    row.source = source if isinstance(source, Boot) else None
    target, paired = reader.target(t, row.source)
    if isinstance(target, str):
        row.notes.append(f"no CI of the target: {target}")
    row.target = target if isinstance(target, Boot) else None
    row.delta = _delta(row, paired, ev)
    stored, now = t.source_test[0], None if t.source_doc is None else source_test_of(t.source_doc)
    if stored is not None and now is not None and abs(stored - now) > 1e-9:
        row.notes.append(
            f"the source result's test metric is now {now:.4f}, {stored:.4f} when the transfer ran: it was rerun since"
        )
    return row


def _delta(row: Row, paired: bool, ev: Evidence) -> dict | None:
    """Δ = target − source of the recorded test means, with its CI where both sides were bootstrapped."""
    t = row.transfer
    (source, _), (target, _) = t.source_test, t.target_test
    metric_s = t.source.get("metric") or (t.doc.get("summary") or {}).get("source_metric")
    metric_t = t.doc.get("metric")
    if metric_s != metric_t:
        row.notes.append(f"no Δ: the source's metric is {metric_s}, the target's {metric_t}")
        return None
    if source is None or target is None:
        return None
    delta = target - source
    if row.source is None or row.target is None:
        return {"delta": delta, "kind": None}
    try:
        if paired:
            diff = row.target.values - row.source.values
            out = resampling.paired_from_values(delta, diff, row.source.clusters, ev.resamples, ev.seed, ev.level)
            return {**out, "kind": "paired"}
        return difference_ci(delta, row.target.values, row.source.values, ev.level)
    except FmcacheError as exc:
        row.notes.append(f"no CI of Δ: {exc}")
        return {"delta": delta, "kind": None}


# ---------------------------------------------------------------------------------------------------------------
# corruption curves


@dataclass
class Curve:
    """One foundation's metric against severity for one corruption: severity 0 is the clean counterpart (the source
    result when the target is its own dataset, else the clean transfer to that dataset), 1..5 the corrupted caches."""

    source_dataset: str
    target_dataset: str
    model: str
    head: str
    corruption: str
    metric: str
    points: dict[int, dict] = field(default_factory=dict)  # severity → {mean, std, low, high, folder, ...}
    notes: list[str] = field(default_factory=list)

    @property
    def pair(self) -> str:
        same = self.source_dataset == self.target_dataset
        return self.target_dataset if same else f"{self.source_dataset} → {self.target_dataset}"

    @property
    def foundation(self) -> str:
        return f"{self.model} {self.head}"


def _point(mean: float | None, std: float | None, boot: Boot | None, folder: str | None) -> dict:
    ci = boot.ci if boot is not None else {}
    return {
        "mean": mean,
        "std": std,
        "low": ci.get("low"),
        "high": ci.get("high"),
        "unit": ci.get("unit"),
        "n": ci.get("n"),
        "folder": folder,
    }


def _curves(
    corrupted: list[Transfer], clean: dict[tuple, Row], paper: set[str], reader: _Reader
) -> tuple[list[Curve], list[str]]:
    """One curve per (cell, corruption), every point from the source result the module doc's rule chooses; of
    several transfers at one severity (other options), the newest."""
    groups: dict[tuple, list[Transfer]] = {}
    for t in corrupted:
        groups.setdefault(t.cell, []).append(t)
    curves, notes = [], []
    for cell in sorted(groups, key=_cell_order(corrupted)):
        choice = choose(groups[cell], paper)
        first = choice.chosen
        mine = [t for t in groups[cell] if t.source_identity == first.source_identity]
        left = sorted(t.folder for t in groups[cell] if t.source_identity != first.source_identity)
        if left:
            notes.append(
                f"{first.model} {first.head}, {first.pair}: the curves follow source {first.source.get('folder')} "
                f"({choice.why}); {len(left)} transfer(s) of other sources left out: {', '.join(left)}"
            )
        zero, why = _severity_zero(first, clean, reader)
        if why:
            notes.append(f"{first.model} {first.head}, {first.pair}, severity 0: {why}")
        by: dict[tuple[str, int], list[Transfer]] = {}
        for t in mine:
            c = t.corruption or {}
            severity = c.get("severity")
            if not isinstance(severity, int) or isinstance(severity, bool) or severity < 1:
                notes.append(f"{t.folder}: its target's corruption names no severity 1-5 ({c}); not on a curve")
                continue
            by.setdefault((str(c.get("name")), severity), []).append(t)
        for name in sorted({n for n, _ in by}):
            curve = Curve(
                first.source_dataset, first.target_dataset, first.model, first.head, name, first.doc["metric"]
            )
            curve.points[0] = zero
            for severity in sorted(s for n, s in by if n == name):
                ts = by[(name, severity)]
                chosen = max(ts, key=lambda t: (str(t.doc.get("written_at") or ""), t.folder))
                if len(ts) > 1:
                    notes.append(
                        f"{curve.foundation}, {curve.pair}, {name}:{severity}: {len(ts)} transfers, the newest shown "
                        f"({chosen.folder})"
                    )
                boot, _ = reader.target(chosen, None)
                if isinstance(boot, str):
                    notes.append(f"{curve.foundation}, {curve.pair}, {name}:{severity}: no CI ({boot})")
                mean, std = chosen.target_test
                point = _point(mean, std, boot if isinstance(boot, Boot) else None, chosen.folder)
                curve.points[severity] = {**point, "from": "corrupted transfer"}
            curves.append(curve)
    return curves, notes


def _severity_zero(t: Transfer, clean: dict[tuple, Row], reader: _Reader) -> tuple[dict, str | None]:
    """The clean point of a curve (the source result on its own test set, or the clean transfer to the target from
    the same source result) and why it has no CI or no value (None: it has both)."""
    if t.source_dataset == t.target_dataset:
        boot = reader.source(t)
        mean, std = t.source_test
        folder = t.source_doc["folder"] if t.source_doc is not None else t.source.get("folder")
        point = {**_point(mean, std, boot if isinstance(boot, Boot) else None, folder), "from": "source"}
        return point, None if isinstance(
            boot, Boot
        ) else f"the source's test metric as the transfer recorded it, no CI ({boot})"
    row = clean.get(t.cell)
    if row is None or row.transfer.source_identity != t.source_identity:
        why = f"no clean transfer from the same source to {t.target_dataset}: no clean point"
        return {**_point(None, None, None, None), "from": None}, why
    mean, std = row.transfer.target_test
    point = {**_point(mean, std, row.target, row.transfer.folder), "from": "clean transfer"}
    return point, None if row.target is not None else "the clean transfer has no CI"


def _cell_order(transfers: Sequence[Transfer]) -> Callable[[tuple], tuple]:
    datasets = ordered_datasets(
        [{"dataset": t.source_dataset} for t in transfers] + [{"dataset": t.target_dataset} for t in transfers]
    )

    def key(cell: tuple) -> tuple:
        source, target, model, protocol = cell
        return (datasets.index(source), datasets.index(target), model, protocol)

    return key


# ---------------------------------------------------------------------------------------------------------------
# the whole


@dataclass
class External:
    """The external-validation rows (clean targets) and the corruption curves, with the report's notes."""

    rows: list[Row] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    curve_notes: list[str] = field(default_factory=list)
    resamples: int = RESAMPLES
    seed: int = SEED
    level: float = LEVEL


def compute(docs: Sequence[dict], ev: Evidence) -> External:
    """Every transfer result of ``docs``: one row per clean cell, one curve per corrupted cell and corruption."""
    out = External(resamples=ev.resamples, seed=ev.seed, level=ev.level)
    index = {identity(d): d for d in docs if not transferred(d)}
    transfers = [Transfer(d, None) for d in docs if transferred(d)]
    for t in transfers:
        t.source_doc = index.get(t.source_identity)
    if not transfers:
        return out
    paper = {c.folder for c in ev.cells if c.output in PAPER_SOURCES}
    reader = _Reader(ev)
    clean_groups: dict[tuple, list[Transfer]] = {}
    for t in transfers:
        if t.corruption is None:
            clean_groups.setdefault(t.cell, []).append(t)
    clean: dict[tuple, Row] = {}
    for cell in sorted(clean_groups, key=_cell_order(transfers)):
        clean[cell] = _row(choose(clean_groups[cell], paper), ev, reader)
    out.rows = list(clean.values())
    corrupted = [t for t in transfers if t.corruption is not None]
    out.curves, out.curve_notes = _curves(corrupted, clean, paper, reader)
    # the transfers and sources no row or curve shows: checked against their sha256 and parsed once all the same,
    # so a damaged file is an error whether or not a table shows it (as every other result's)
    unread = needed_folders(docs) - reader.read
    for doc in docs:
        if doc["folder"] in unread and protocol_of(doc).predictions:
            data = check_predictions(doc)
            if data is not None:
                load_splits(doc["folder"], ("test",), data)
    return out
