"""Bootstrap confidence intervals and paired bootstrap tests from the saved test predictions.

The statistic is the one the tables report: the dataset's metric on the test split, averaged over the seeds that
were run (a resample draws test samples, the same ones for every seed). Every resample is scored with
:func:`fmcache.metrics.evaluate`, so the CI measures exactly the number in the table. A resample on which the metric
is undefined (an AUC whose resample holds one class) is dropped and counted, never scored 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmcache import metrics
from fmcache.errors import FmcacheError

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


@dataclass
class Predictions:
    """The test split of one ``predictions.npz``: ids (n,), labels (n,) or (n, C), scores (n_seeds, n, C)."""

    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def take(self, index: np.ndarray) -> Predictions:
        return Predictions(self.ids[index], self.labels[index], self.scores[:, index])


def load_predictions(folder: Path | str, split: str = "test", data: bytes | None = None) -> Predictions | None:
    """The saved predictions of ``split`` in a result folder (parsed from ``data``, its bytes, when the caller has
    read them already), or None when the evaluation saved none (CKA).

    A file that cannot be read (a flipped byte, a truncated copy) is one error line naming it.
    """
    import io
    import zipfile
    import zlib

    path = Path(folder) / "predictions.npz"
    if data is None and not path.is_file():
        return None
    try:
        with np.load(path if data is None else io.BytesIO(data)) as npz:
            if f"{split}_scores" not in npz:
                return None
            scores = np.asarray(npz[f"{split}_scores"], dtype=np.float64)
            if scores.ndim == 2:  # one run stored without its seed axis
                scores = scores[None]
            return Predictions(np.asarray(npz[f"{split}_ids"]), np.asarray(npz[f"{split}_labels"]), scores)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        what = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise FmcacheError(
            f"{path} is damaged ({what}); rerun the evaluation that wrote it, or remove its folder"
        ) from None


def seed_mean(metric: str, pred: Predictions, index: np.ndarray | None = None) -> float:
    """The metric on ``pred`` (rows ``index``, all by default), averaged over seeds."""
    labels = pred.labels if index is None else pred.labels[index]
    values = []
    for scores in pred.scores:
        s = scores if index is None else scores[index]
        values.append(metrics.evaluate(metric, labels, s, pred.multilabel)["value"])
    return float(np.mean(values))


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    # one generator per call, seeded: the same seed gives the same resamples on every machine
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _bootstrap(fn, n: int, resamples: int, seed: int) -> tuple[np.ndarray, int]:
    values, failed = [], 0
    for index in _resample_indices(n, resamples, seed):
        try:
            values.append(fn(index))
        except FmcacheError:
            failed += 1
    return np.asarray(values, dtype=np.float64), failed


def bootstrap_ci(
    metric: str, pred: Predictions, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> dict:
    """Percentile bootstrap CI of the seed-mean test metric: ``{point, low, high, n, resamples, failed}``."""
    if len(pred.ids) == 0:
        raise FmcacheError("no test predictions to bootstrap")
    point = seed_mean(metric, pred)
    values, failed = _bootstrap(lambda idx: seed_mean(metric, pred, idx), len(pred.ids), resamples, seed)
    if len(values) == 0:
        raise FmcacheError(f"every bootstrap resample left {metric} undefined; the test split is too small")
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return {
        "point": point,
        "low": float(low),
        "high": float(high),
        "n": len(pred.ids),
        "resamples": resamples,
        "failed": failed,
        "level": level,
        "seed": seed,
    }


def align(a: Predictions, b: Predictions) -> tuple[Predictions, Predictions]:
    """Both runs restricted to their common test ids, in one order; a paired test needs the same samples."""
    common = np.intersect1d(a.ids, b.ids)
    if len(common) == 0:
        raise FmcacheError("the two runs share no test ids; a paired test needs the same test samples")
    ia = np.searchsorted(a.ids, common, sorter=np.argsort(a.ids))
    ib = np.searchsorted(b.ids, common, sorter=np.argsort(b.ids))
    return a.take(np.argsort(a.ids)[ia]), b.take(np.argsort(b.ids)[ib])


def paired_bootstrap(
    metric: str, a: Predictions, b: Predictions, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> dict:
    """Paired bootstrap test of A against B on the same test samples.

    Each resample draws test ids once and scores both runs on them, so the difference keeps the pairing. The
    p-value is two-sided for "no difference", from the bootstrap distribution of the difference shifted to zero
    mean: p = (1 + #{|d_b − d| ≥ |d|}) / (B + 1), which is never 0 and is 1 for identical runs.
    """
    a, b = align(a, b)
    if not np.array_equal(
        np.asarray(a.labels, dtype=np.float64), np.asarray(b.labels, dtype=np.float64), equal_nan=True
    ):
        raise FmcacheError("the two runs disagree on the labels of the same test ids; they are not the same split")
    delta = seed_mean(metric, a) - seed_mean(metric, b)

    def diff(idx: np.ndarray) -> float:
        return seed_mean(metric, a, idx) - seed_mean(metric, b, idx)

    values, failed = _bootstrap(diff, len(a.ids), resamples, seed)
    if len(values) == 0:
        raise FmcacheError(f"every bootstrap resample left {metric} undefined; the test split is too small")
    extreme = int(np.sum(np.abs(values - delta) >= abs(delta) - 1e-12))
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return {
        "delta": float(delta),
        "low": float(low),
        "high": float(high),
        "p_value": (1 + extreme) / (len(values) + 1),
        "n": len(a.ids),
        "resamples": resamples,
        "failed": failed,
    }


def _loaded(doc: dict, predictions: Mapping[str, Predictions | None] | None) -> Predictions | None:
    # a report loads each predictions.npz once and hands the arrays to both the CIs and the paired tests
    if predictions is not None and doc["folder"] in predictions:
        return predictions[doc["folder"]]
    return load_predictions(doc["folder"])


def cell_cis(
    cells: Sequence[dict],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    predictions: Mapping[str, Predictions | None] | None = None,
) -> dict[str, dict]:
    """{result folder: bootstrap CI} for every result among ``cells`` that saved test predictions.

    ``predictions`` ({folder: test predictions}) spares reading a folder's ``predictions.npz`` again.
    """
    out = {}
    for doc in cells:
        pred = _loaded(doc, predictions)
        if pred is None or not doc.get("metric"):
            continue
        try:
            out[doc["folder"]] = bootstrap_ci(doc["metric"], pred, resamples, seed)
        except FmcacheError as exc:  # a split too small for the metric: reported, not fatal to the report
            out[doc["folder"]] = {"error": str(exc)}
    return out


def paired_tests(
    groups: dict[tuple[str, str], list[dict]],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    predictions: Mapping[str, Predictions | None] | None = None,
) -> list[dict]:
    """Per (dataset, column): the model with the best test mean against each other model with predictions."""
    rows = []
    for (dataset, column), docs in sorted(groups.items()):
        with_pred = [(d, _loaded(d, predictions)) for d in docs]
        with_pred = [(d, p) for d, p in with_pred if p is not None]
        if len(with_pred) < 2:
            continue
        best_doc, best_pred = max(with_pred, key=lambda dp: _test_mean(dp[0]))
        for doc, pred in with_pred:
            if doc is best_doc:
                continue
            row = {
                "dataset": dataset,
                "column": column,
                "metric": doc["metric"],
                "best": best_doc["model"],
                "other": doc["model"],
            }
            try:
                row.update(paired_bootstrap(doc["metric"], best_pred, pred, resamples, seed))
            except FmcacheError as exc:
                row["error"] = str(exc)
            rows.append(row)
    return rows


def _test_mean(doc: dict) -> float:
    summary = doc.get("summary") or {}
    value = summary.get("test_mean")
    if value is None and summary.get("best"):
        value = summary["best"].get("test")
    return -np.inf if value is None else float(value)
