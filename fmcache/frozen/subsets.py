"""Label efficiency in stage two (``--train-fraction``, ``--train-per-class``): how train subsets are drawn (pure
numpy), and what every runner does with them (:func:`over_subsets`: one run per subset, then the curve's folder).
The curve's rows from finished results live in :mod:`fmcache.label_efficiency`, which the report shares.

How a subset is drawn, so that anyone can check or redo it (``subsets.npz`` records the result):

- **single-label (stratified)**: repeat ``r`` shuffles the samples of each class ``c`` with its own generator,
  ``numpy.random.default_rng([SALT, split, r, c])``; a subset takes the first ``n_c`` of each class's order, with
  ``n_c = floor(f · N_c + 0.5)`` for ``--train-fraction f`` (round half up, per class) or ``min(n, N_c)`` for
  ``--train-per-class n``. A class's order depends on nothing but (split, repeat, class), so within one repeat every
  larger subset contains every smaller one (fractions and per-class counts alike), and a subset depends only on its
  own (fraction, repeat): the folder a subset's run writes is named by those alone.
- **multi-label (random, documented)**: there is no single class to stratify by, so repeat ``r`` shuffles all rows
  (``default_rng([SALT, split, r])``) and a subset is the first ``floor(f · N + 0.5)``; nested the same way. A label
  that has a positive sample in the split but none in the subset is refused. (Iterative stratification would not
  keep the subsets nested, which is what makes a curve's points comparable.)
- A subset that leaves a class (or a label) present in the split without any sample is refused in one line that
  names the class and the smallest fraction that keeps it, printed rounded up so that, given back, it is accepted.

Positions are returned sorted, i.e. in the split's own order: the whole split (fraction 1.0) is exactly the plain
run's input, row for row, so its numbers equal the plain run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmcache.cache.reader import CacheReader
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes, ensure_writable_dir
from fmcache.label_efficiency import label_efficiency_folder, label_efficiency_rows
from fmcache.plots import plot_label_efficiency
from fmcache.results import RESULT_JSON, SUBSETS, ResultSource, base_settings, csv_bytes, npz_bytes, to_jsonable

SALT = 0x1ABE1  # separates these generators from every other seeded stream in fmcache
SPLIT_CODES = {"train": 0, "val": 1}
STRATIFIED, RANDOM = "stratified", "random"


@dataclass(frozen=True)
class Subset:
    """One point of a curve: a fraction (or a per-class count) and a repeat, as positions in the train (and val) split.

    ``train`` and ``val`` index the split's rows in order (``val`` is None unless ``--val-fraction-follows``).
    ``full`` marks the whole train split (and val): every repeat of it is the same, so it runs once.
    """

    fraction: float | None
    per_class: int | None
    repeat: int
    sampling: str
    val_follows: bool
    train: np.ndarray
    val: np.ndarray | None
    full: bool

    @property
    def axis(self) -> str:
        return "fraction" if self.fraction is not None else "per_class"

    @property
    def x(self) -> float:
        return float(self.fraction) if self.fraction is not None else float(self.per_class)

    def settings(self) -> dict:
        """What names the result folder besides the plain run's settings (see :mod:`fmcache.results`)."""
        amount = {"fraction": self.fraction} if self.fraction is not None else {"per_class": self.per_class}
        return {
            "train_subset": {
                **amount,
                "repeat": self.repeat,
                "sampling": self.sampling,
                "val_follows": self.val_follows,
            }
        }

    def tag(self) -> str:
        """``f0.01_r0`` or ``n5_r2``: the key of this subset's arrays in ``subsets.npz``."""
        amount = f"f{self.fraction:g}" if self.fraction is not None else f"n{self.per_class}"
        return f"{amount}_r{self.repeat}"


def _order(n: int, split: str, repeat: int, group: int | None = None) -> np.ndarray:
    key = [SALT, SPLIT_CODES[split], int(repeat)] + ([] if group is None else [int(group)])
    return np.random.default_rng(key).permutation(n)


def _count(size: int, fraction: float | None, per_class: int | None) -> int:
    if fraction is not None:
        return min(size, math.floor(fraction * size + 0.5 + 1e-9))  # round half up; 1e-9 absorbs 0.1 · 50 = 4.999…
    return min(size, int(per_class))


def smallest_fraction(size: int) -> str:
    """The smallest fraction that keeps one of ``size`` samples, as the error prints it: three significant digits,
    rounded UP, so that the printed value, given back, keeps the class (0.5 / 6 = 0.08333 prints as 0.0834; 0.0833
    would round 6 × 0.0833 down to 0)."""
    exact = 0.5 / size
    places = 2 - math.floor(math.log10(exact))  # decimal places of three significant digits
    units = math.ceil(exact * 10**places - 1e-6)
    while _count(size, float(f"{units / 10**places:.3g}"), None) == 0:  # just below the half: one unit more
        units += 1
    return f"{units / 10**places:.3g}"


def _amount(fraction: float | None, per_class: int | None) -> str:
    return f"--train-fraction {fraction:g}" if fraction is not None else f"--train-per-class {per_class}"


def stratified(
    labels: np.ndarray,
    class_names: Sequence[str],
    repeat: int,
    fraction: float | None = None,
    per_class: int | None = None,
    split: str = "train",
) -> np.ndarray:
    """Sorted positions of a class-stratified subset of single-label ``labels`` (see the module doc)."""
    labels = np.asarray(labels).astype(np.int64)
    chosen = []
    for c, name in enumerate(class_names):
        members = np.flatnonzero(labels == c)
        n_c = _count(len(members), fraction, per_class)
        if len(members) and n_c == 0:  # only a fraction rounds a present class down to nothing
            smallest = min(int((labels == k).sum()) for k in range(len(class_names)) if (labels == k).any())
            raise FmcacheError(
                f"{_amount(fraction, per_class)} leaves class '{name}' with no {split} sample ({len(members)} × "
                f"{fraction:g} rounds to 0); use a fraction >= {smallest_fraction(smallest)} or --train-per-class 1"
            )
        chosen.append(members[_order(len(members), split, repeat, c)[:n_c]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def random_rows(
    labels: np.ndarray, class_names: Sequence[str], repeat: int, fraction: float, split: str = "train"
) -> np.ndarray:
    """Sorted positions of a random subset of multi-label ``labels`` (N, C; NaN unknown), nested per repeat."""
    labels = np.asarray(labels, dtype=np.float64)
    n = _count(len(labels), fraction, None)
    if n == 0:
        raise FmcacheError(f"--train-fraction {fraction:g} leaves no {split} sample of {len(labels)}; use a larger one")
    rows = np.sort(_order(len(labels), split, repeat)[:n])
    positive = np.nan_to_num(labels) > 0
    lost = np.flatnonzero(positive.any(0) & ~positive[rows].any(0))
    if len(lost):
        raise FmcacheError(
            f"--train-fraction {fraction:g} (repeat {repeat}) leaves label '{class_names[lost[0]]}' with no positive "
            f"{split} sample (multi-label subsets are drawn at random); use a larger fraction"
        )
    return rows


def draw(
    labels: np.ndarray,
    class_names: Sequence[str],
    multilabel: bool,
    repeat: int,
    fraction: float | None = None,
    per_class: int | None = None,
    split: str = "train",
) -> np.ndarray:
    """One subset's sorted positions: stratified for single-label data, random for multi-label data."""
    if multilabel:
        if per_class is not None:
            raise FmcacheError("--train-per-class needs single-label data; use --train-fraction for multi-label data")
        return random_rows(labels, class_names, repeat, fraction, split)
    return stratified(labels, class_names, repeat, fraction, per_class, split)


def plan(
    train_labels: np.ndarray,
    val_labels: np.ndarray,
    class_names: Sequence[str],
    multilabel: bool,
    fractions: Sequence[float] = (),
    per_class: Sequence[int] = (),
    repeats: int = 1,
    val_follows: bool = False,
) -> list[Subset]:
    """Every (amount, repeat) subset, smallest amount first; a subset that is the whole split runs once (repeat 0).

    Every subset is drawn (and checked) before any run starts, so a fraction that leaves a class empty fails first.
    """
    amounts = [(float(f), None) for f in fractions] + [(None, int(n)) for n in per_class]
    sampling = RANDOM if multilabel else STRATIFIED
    subsets = []
    for fraction, count in amounts:
        for repeat in range(repeats):
            train = draw(train_labels, class_names, multilabel, repeat, fraction, count, "train")
            val = draw(val_labels, class_names, multilabel, repeat, fraction, count, "val") if val_follows else None
            full = len(train) == len(train_labels) and (val is None or len(val) == len(val_labels))
            if full and repeat > 0:  # the same rows in every repeat: one run says it all
                continue
            subsets.append(Subset(fraction, count, repeat, sampling, val_follows, train, val, full))
    return subsets


# -- label efficiency (--train-fraction / --train-per-class): what every runner does with its subsets ---------------


def _subset_plan(reader: CacheReader, spec) -> list[Subset] | None:
    """The spec's subsets, every one drawn and checked before any run; None for a plain run (no subset option)."""
    if spec.train_fraction is None and spec.train_per_class is None:
        return None
    return plan(
        reader.labels("train"),
        reader.labels("val"),
        reader.class_names,
        reader.multilabel,
        spec.train_fraction or (),
        spec.train_per_class or (),
        spec.subset_repeats,
        spec.val_fraction_follows,
    )


def over_subsets(reader: CacheReader, spec, protocol: str, run_one: Callable[[Subset | None], dict], log) -> dict:
    """A runner's whole answer: ``run_one(None)`` for a plain run; with ``--train-fraction``/``--train-per-class``,
    ``run_one`` per planned subset (all drawn and checked first), then the label-efficiency curve."""
    subsets = _subset_plan(reader, spec)
    if subsets is None:
        return run_one(None)
    folders = [run_one(subset)["folder"] for subset in subsets]
    return finish_label_efficiency(reader, spec, protocol, folders, subsets, log)


def rows_of(subset: Subset | None, split: str) -> np.ndarray | None:
    """A split's positions under ``subset`` (train, or val when it follows); None: every row, as a plain run."""
    if subset is None:
        return None
    return subset.train if split == "train" else subset.val if split == "val" else None


def take(values: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """``values`` at ``rows`` (None: all of them, the array itself, so a plain run's input is untouched)."""
    return values if rows is None else values[rows]


def subset_settings(subset: Subset | None) -> dict:
    """What a subset adds to the folder-naming settings: nothing for a plain run, so its folder keeps its name."""
    return {} if subset is None else subset.settings()


def subset_drop_last(subset: Subset | None, batch_size: int, drop_last: bool, log) -> bool:
    """A subset smaller than one batch trains on itself as one batch per epoch: drop_last would drop it all."""
    if subset is None or not drop_last or len(subset.train) >= batch_size:
        return drop_last
    log(
        f"note: subset {subset.tag()} has {len(subset.train)} train samples, fewer than the batch size "
        f"{batch_size}: one batch of all of them per epoch (drop_last does not apply)"
    )
    return False


def subset_source(source: ResultSource, subset: Subset | None) -> ResultSource:
    """The result source of a run on ``subset``: val ids and labels cut to the subset when val follows."""
    rows = rows_of(subset, "val")
    if rows is None or "val" not in source.ids:
        return source
    ids, labels, groups, meta = dict(source.ids), dict(source.labels), dict(source.groups), dict(source.meta)
    ids["val"], labels["val"] = ids["val"][rows], labels["val"][rows]
    if "val" in groups:
        groups["val"] = groups["val"][rows]
    if "val" in meta:
        meta["val"] = {name: column[rows] for name, column in meta["val"].items()}
    return dataclasses.replace(source, ids=ids, labels=labels, groups=groups, meta=meta)


def write_subset(folder: Path, reader: CacheReader, subset: Subset | None) -> dict:
    """``subsets.npz`` in a subset run's folder (positions and sample ids, so anyone can re-run exactly these rows)
    and what ``result.json`` records about it (the facts and the file's sha256); nothing for a plain run."""
    if subset is None:
        return {}
    arrays = {"train_rows": subset.train, "train_ids": reader.ids("train")[subset.train]}
    if subset.val is not None:
        arrays.update(val_rows=subset.val, val_ids=reader.ids("val")[subset.val])
    data = npz_bytes(arrays)
    atomic_write_bytes(folder / SUBSETS, data)
    facts = {"n_train": len(subset.train), "n_train_split": len(reader.rows("train")), "file": SUBSETS}
    if not reader.multilabel:
        labels = reader.labels("train")[subset.train].astype(np.int64)
        facts["train_per_class"] = np.bincount(labels, minlength=len(reader.class_names)).tolist()
    if subset.val is not None:
        facts["n_val"] = len(subset.val)
    # as predictions_sha256: the report and the grid refuse a subsets.npz that is not the one the run wrote
    return {"subset": facts, "subsets_sha256": hashlib.sha256(data).hexdigest()}


def finish_label_efficiency(
    reader: CacheReader, spec, protocol: str, folders: list[Path], subsets: list[Subset], log
) -> dict:
    """After every subset run of a curve: its ``label_efficiency/`` folder (CSV, PNG, all subsets, JSON last), and
    the runner's answer: ``folder`` is the last run's (the grid's ledger records it; it is written last, so it is
    complete only when every run is), ``folders`` every run's."""
    docs = [json.loads((Path(f) / RESULT_JSON).read_text()) for f in folders]
    curve = {
        "train_fraction": spec.train_fraction,
        "train_per_class": spec.train_per_class,
        "subset_repeats": spec.subset_repeats,
        "val_fraction_follows": spec.val_fraction_follows,
    }
    settings = {**base_settings(docs[0]), "label_efficiency": curve}
    folder = ensure_writable_dir(
        label_efficiency_folder(spec.out, reader.dataset, reader.model, reader.key, protocol, settings)
    )
    (folder / "label_efficiency.json").unlink(missing_ok=True)  # written last: its presence vouches for the rest
    rows = label_efficiency_rows(docs)
    atomic_write_bytes(folder / "label_efficiency.csv", csv_bytes(rows))
    arrays = {}
    for s in subsets:
        arrays[f"{s.tag()}_train_rows"], arrays[f"{s.tag()}_train_ids"] = s.train, reader.ids("train")[s.train]
        if s.val is not None:
            arrays[f"{s.tag()}_val_rows"], arrays[f"{s.tag()}_val_ids"] = s.val, reader.ids("val")[s.val]
    atomic_write_bytes(folder / SUBSETS, npz_bytes(arrays))
    metric = docs[0]["metric"]
    if spec.plots:
        lines: dict[str, list] = {}
        for row in rows:
            lines.setdefault(f"{protocol} layer {row['layer']}", []).append(row)
        plot_label_efficiency(
            folder / "label_efficiency.png", lines, metric, f"{reader.dataset}, {reader.model}: {protocol}"
        )
    document = {
        "protocol": protocol,
        "dataset": reader.dataset,
        "model": reader.model,
        "cache_key": reader.key,
        "metric": metric,
        "settings": settings,
        "rows": rows,
        "folders": [str(f) for f in folders],
    }
    atomic_write_bytes(folder / "label_efficiency.json", (json.dumps(to_jsonable(document), indent=2) + "\n").encode())
    log(f"label efficiency: {len(folders)} runs; curve in {folder}")
    return {
        "folder": folders[-1],
        "folders": folders,
        "label_efficiency": folder,
        "rows": rows,
        "metric": metric,
        "protocol": protocol,
    }
