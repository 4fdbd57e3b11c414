"""Train subsets for label-efficiency curves (``--train-fraction``, ``--train-per-class``): pure numpy, no cache.

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
  names the class and the smallest fraction that keeps it.

Positions are returned sorted, i.e. in the split's own order: the whole split (fraction 1.0) is exactly the plain
run's input, row for row, so its numbers equal the plain run's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fmcache.errors import FmcacheError

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
        return {"train_subset": {**amount, "repeat": self.repeat, "sampling": self.sampling,
                                 "val_follows": self.val_follows}}  # fmt: skip

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


def _amount(fraction: float | None, per_class: int | None) -> str:
    return f"--train-fraction {fraction:g}" if fraction is not None else f"--train-per-class {per_class}"


def stratified(
    labels: np.ndarray, class_names: Sequence[str], repeat: int, fraction: float | None = None,
    per_class: int | None = None, split: str = "train",
) -> np.ndarray:  # fmt: skip
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
                f"{fraction:g} rounds to 0); use a fraction >= {0.5 / smallest:.3g} or --train-per-class 1"
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
    labels: np.ndarray, class_names: Sequence[str], multilabel: bool, repeat: int, fraction: float | None = None,
    per_class: int | None = None, split: str = "train",
) -> np.ndarray:  # fmt: skip
    """One subset's sorted positions: stratified for single-label data, random for multi-label data."""
    if multilabel:
        if per_class is not None:
            raise FmcacheError("--train-per-class needs single-label data; use --train-fraction for multi-label data")
        return random_rows(labels, class_names, repeat, fraction, split)
    return stratified(labels, class_names, repeat, fraction, per_class, split)


def plan(
    train_labels: np.ndarray, val_labels: np.ndarray, class_names: Sequence[str], multilabel: bool,
    fractions: Sequence[float] = (), per_class: Sequence[int] = (), repeats: int = 1, val_follows: bool = False,
) -> list[Subset]:  # fmt: skip
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
