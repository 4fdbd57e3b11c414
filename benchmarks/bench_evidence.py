"""Time per result of the report's evidence statistics on a CheXpert-sized test set.

A synthetic multi-label test set: 22,000 images × 14 labels (≈ 25 % of labels unknown, ≈ 20 % of the known ones
positive), ≈ 3 images per patient, 5 seeds of fp16-rounded probabilities (so scores tie as saved ones do). Timed:

- the patient-level stratified bootstrap CI (1,000 resamples) of the seed-mean mean AUC, the table's number
  (:func:`fmcache.report.resampling.metric_ci`), and one resample through the per-resample path with
  :func:`fmcache.metrics.evaluate` (what ``stats.bootstrap_ci`` does 1,000 times) for scale;
- DeLong's SE of the seed-mean mean AUC over the 14 labels, image level and patient level;
- the ECE summary (ECE, MCE, Brier, NLL per label, mean over labels and seeds).

The report bootstraps 748 results, so the first line is the one that matters. Absolute times on a shared CPU are
noisy; ``--resamples`` and ``--seeds`` scale the work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmcache.report import calibration, delong, resampling  # noqa: E402
from fmcache.report.stats import Predictions, seed_mean  # noqa: E402


def synthetic(n: int, labels: int, seeds: int, per_patient: float, rng: np.random.Generator):
    """Predictions and patient ids of a CheXpert-like test set."""
    patients = rng.integers(0, int(n / per_patient), n)
    y = (rng.random((n, labels)) < 0.2).astype(np.float64)
    y[rng.random((n, labels)) < 0.25] = np.nan
    logit = 1.2 * (2 * np.nan_to_num(y) - 1)[None] + rng.normal(size=(seeds, n, labels))
    p = (1 / (1 + np.exp(-logit))).astype(np.float16).astype(np.float64)
    return Predictions(np.arange(n), y, p), patients


def timed(fn):
    """``(fn(), wall seconds)``; the CPU seconds go to ``timed.cpu`` (on a shared machine the wall time also counts
    other people's work)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    timed.cpu = time.process_time() - cpu
    return out, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=22_000)
    parser.add_argument("--labels", type=int, default=14)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    pred, patients = synthetic(args.n, args.labels, args.seeds, 3.0, np.random.default_rng(0))
    clusters = resampling.make_clusters(args.n, patients, unit="patient", labels=pred.labels)
    print(f"test set: {args.n} images, {clusters.n_clusters} patients, {args.labels} labels, {args.seeds} seeds")

    ci, t_ci = timed(lambda: resampling.metric_ci("mean_auc", pred, clusters, resamples=args.resamples))
    cpu_ci = timed.cpu
    index = next(resampling.resample_indices(clusters, 1, 0))
    _, t_one = timed(lambda: seed_mean("mean_auc", pred, index))
    print(f"cluster bootstrap CI, {args.resamples} resamples: {t_ci:6.2f} s/result, {cpu_ci:.2f} s CPU "
          f"(mean AUC {ci['point']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}], failed {ci['failed']})")  # fmt: skip
    print(f"  per-resample evaluate path:       {t_one * args.resamples:6.2f} s/result (1 resample × {args.resamples})")

    scores = pred.scores
    image, t_image = timed(lambda: delong.multilabel_delong(pred.labels, scores)["mean"])
    print(f"DeLong SE of the mean AUC, image:   {t_image:6.2f} s/result, {timed.cpu:.2f} s CPU (SE {image['se']:.5f})")
    patient, t_patient = timed(lambda: delong.multilabel_delong(pred.labels, scores, cluster_ids=patients)["mean"])
    print(
        f"DeLong SE of the mean AUC, patient: {t_patient:6.2f} s/result, {timed.cpu:.2f} s CPU (SE {patient['se']:.5f})"
    )

    ece, t_ece = timed(lambda: calibration.summary(scores, pred.labels, multilabel=True))
    print(f"ECE/MCE/Brier/NLL summary:          {t_ece:6.2f} s/result, {timed.cpu:.2f} s CPU (ECE {ece['ece']:.4f})")


if __name__ == "__main__":
    main()
