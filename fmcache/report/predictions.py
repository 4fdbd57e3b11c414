"""The saved predictions of one result (``predictions.npz``) as the report's statistics read them.

A split's arrays (``<split>_ids``, ``<split>_labels``, ``<split>_scores``) and, where the run saved them, the
per-sample contract: ``<split>_groups`` (the independent unit of each sample, ``"patient:00012"``, or
``"image:<id>"`` where nothing else is known) and ``<split>_meta__<column>`` (per-sample metadata: unicode, or float
with NaN = missing). Results written before that contract have neither: they are image-level and have no subgroups.

This module is light (numpy only), so the CLI's start-up can name the statistics' defaults without loading scipy.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmcache import metrics
from fmcache.errors import FmcacheError

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
META = "_meta__"  # <split>_meta__<column>


@dataclass
class Predictions:
    """One split of a ``predictions.npz``: ids (n,), labels (n,) or (n, C), scores (n_seeds, n, C), and, when the
    run saved them, ``groups`` (n,) (the independent unit of each row) and ``meta`` ({column: (n,)})."""

    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    groups: np.ndarray | None = None
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def take(self, index: np.ndarray) -> Predictions:
        return Predictions(
            self.ids[index],
            self.labels[index],
            self.scores[:, index],
            None if self.groups is None else self.groups[index],
            {k: v[index] for k, v in self.meta.items()},
        )


def _split(npz, split: str) -> Predictions | None:
    if f"{split}_scores" not in npz:
        return None
    scores = np.asarray(npz[f"{split}_scores"], dtype=np.float64)
    if scores.ndim == 2:  # one run stored without its seed axis
        scores = scores[None]
    groups = np.asarray(npz[f"{split}_groups"]) if f"{split}_groups" in npz else None
    prefix = f"{split}{META}"
    meta = {key[len(prefix) :]: np.asarray(npz[key]) for key in npz.files if key.startswith(prefix)}
    return Predictions(np.asarray(npz[f"{split}_ids"]), np.asarray(npz[f"{split}_labels"]), scores, groups, meta)


def load_splits(
    folder: Path | str, splits: tuple[str, ...] = ("test", "val"), data: bytes | None = None
) -> dict[str, Predictions | None]:
    """{split: its predictions (None when the file holds none for it)} from one read of a result's
    ``predictions.npz`` (parsed from ``data``, its bytes, when the caller has read them already); {} when the
    evaluation saved no file (CKA). A file that cannot be read is one error line naming it."""
    path = Path(folder) / "predictions.npz"
    if data is None and not path.is_file():
        return {}
    try:
        with np.load(path if data is None else io.BytesIO(data)) as npz:
            return {split: _split(npz, split) for split in splits}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        what = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise FmcacheError(
            f"{path} is damaged ({what}); rerun the evaluation that wrote it, or remove its folder"
        ) from None


def load_predictions(folder: Path | str, split: str = "test", data: bytes | None = None) -> Predictions | None:
    """The saved predictions of ``split`` in a result folder, or None when the evaluation saved none (CKA)."""
    return load_splits(folder, (split,), data).get(split)


def seed_mean(metric: str, pred: Predictions, index: np.ndarray | None = None) -> float:
    """The metric on ``pred`` (rows ``index``, all by default), averaged over seeds."""
    labels = pred.labels if index is None else pred.labels[index]
    values = []
    for scores in pred.scores:
        s = scores if index is None else scores[index]
        values.append(metrics.evaluate(metric, labels, s, pred.multilabel)["value"])
    return float(np.mean(values))


def align(a: Predictions, b: Predictions) -> tuple[Predictions, Predictions]:
    """Both runs restricted to their common test ids, in one order; a paired test needs the same samples."""
    common = np.intersect1d(a.ids, b.ids)
    if len(common) == 0:
        raise FmcacheError("the two runs share no test ids; a paired test needs the same test samples")
    ia = np.searchsorted(a.ids, common, sorter=np.argsort(a.ids))
    ib = np.searchsorted(b.ids, common, sorter=np.argsort(b.ids))
    return a.take(np.argsort(a.ids)[ia]), b.take(np.argsort(b.ids)[ib])
