"""Rankings reproduce Demšar (2006)'s worked example; a duplicated model shares its twin's tier."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fmcache.errors import FmcacheError
from fmcache.report import ranking
from fmcache.report import resampling as rs
from fmcache.report.stats import Predictions

NAMES = ["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"]
# Demšar (2006), JMLR 7:1–30, Table 6: AUC of four C4.5 variants on 14 UCI data sets, as printed (3 decimals).
DEMSAR_TABLE_6 = np.array([
    [0.763, 0.768, 0.771, 0.798],  # adult (sample)
    [0.599, 0.591, 0.590, 0.569],  # breast cancer
    [0.954, 0.971, 0.968, 0.967],  # breast cancer wisconsin
    [0.628, 0.661, 0.654, 0.657],  # cmc
    [0.882, 0.888, 0.886, 0.898],  # ionosphere
    [0.936, 0.931, 0.916, 0.931],  # iris
    [0.661, 0.668, 0.609, 0.685],  # liver disorders
    [0.583, 0.583, 0.563, 0.625],  # lung cancer
    [0.775, 0.838, 0.866, 0.875],  # lymphography
    [1.000, 1.000, 1.000, 1.000],  # mushroom
    [0.940, 0.962, 0.965, 0.962],  # primary tumor
    [0.619, 0.666, 0.614, 0.669],  # rheum
    [0.972, 0.981, 0.975, 0.975],  # voting
    [0.957, 0.978, 0.946, 0.970],  # wine
])  # fmt: skip
VOTING = 12


def _as_ranked_in_the_paper() -> np.ndarray:
    # The paper ranks voting's two printed 0.975s as 2 (C4.5+cf) and 3 (C4.5+m+cf), and lists only iris, lung
    # cancer, mushroom and primary tumor as ties: the unrounded AUCs differ. Reproduce that order.
    table = DEMSAR_TABLE_6.copy()
    table[VOTING, 2] += 1e-4
    return table


def test_demsar_worked_example():
    out = ranking.compare_models(_as_ranked_in_the_paper(), NAMES, alpha=0.05)
    np.testing.assert_allclose(out["avg_ranks"], [3.143, 2.000, 2.893, 1.964], atol=5e-4)
    assert round(out["chi2"], 2) == 9.28 and round(out["ff"], 2) == 3.69
    assert (out["df1"], out["df2"]) == (3, 39)
    assert stats.f.ppf(0.95, 3, 39) == pytest.approx(2.85, abs=0.005) and out["ff_p"] < 0.05  # rejected
    assert round(out["cd"], 2) == 1.25
    assert out["groups"] == [["C4.5+m+cf", "C4.5+m", "C4.5+cf", "C4.5"]]  # nothing significant at 0.05
    at_10 = ranking.compare_models(_as_ranked_in_the_paper(), NAMES, alpha=0.10)
    assert round(at_10["cd"], 2) == 1.12
    # C4.5 is worse than C4.5+m and C4.5+m+cf; C4.5+cf belongs to neither group conclusively
    assert at_10["groups"] == [["C4.5+m+cf", "C4.5+m", "C4.5+cf"], ["C4.5+cf", "C4.5"]]


def test_printed_ties_get_midranks():
    # with the printed (rounded) voting row the two 0.975s tie at rank 2.5: ±0.5/14 on those two averages
    ranks = ranking.average_ranks(DEMSAR_TABLE_6)
    np.testing.assert_allclose(ranks, [44 / 14, 28 / 14, 41 / 14, 27 / 14], atol=1e-12)
    np.testing.assert_allclose(ranking.average_ranks(-DEMSAR_TABLE_6, higher_is_better=False), ranks)


def test_nemenyi_table_is_the_studentized_range_over_sqrt2():
    for alpha in (0.05, 0.10):
        for k in range(2, 11):
            computed = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
            assert ranking.nemenyi_q(k, alpha) == pytest.approx(computed, abs=2e-3)
    assert ranking.nemenyi_q(14) > ranking.nemenyi_q(10)
    with pytest.raises(FmcacheError, match=r"alpha 0\.05 and 0\.10"):
        ranking.nemenyi_q(4, 0.01)


def test_incomplete_table_is_refused():
    table = DEMSAR_TABLE_6.copy()
    table[3, 1] = np.nan
    with pytest.raises(FmcacheError, match="dataset 3, model 1"):
        ranking.friedman(table)


def _models(rng: np.random.Generator, y: np.ndarray, strengths: list[float], seeds: int = 3) -> list[np.ndarray]:
    """(seeds, n, 2) probabilities per model: a shared signal of the given strength plus seed noise."""
    out = []
    for strength in strengths:
        base = strength * (2 * y - 1) + rng.normal(size=len(y))
        logit = base[None] + 0.3 * rng.normal(size=(seeds, len(y)))
        p1 = 1 / (1 + np.exp(-logit))
        out.append(np.stack([1 - p1, p1], axis=-1))
    return out


def test_clear_best_model_is_alone_in_the_best_tier():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.5).astype(int)
    scores = _models(rng, y, [2.0, 0.3, 0.2])
    preds = {f"m{i}": Predictions(np.arange(400), y, s) for i, s in enumerate(scores)}
    out = ranking.within_dataset_ranking("auc", preds, resamples=200)
    assert out["best"] == "m0" and out["models"]["m0"]["tied_with_best"]
    assert not out["models"]["m1"]["tied_with_best"] and not out["models"]["m2"]["tied_with_best"]
    assert out["models"]["m0"]["rank_low"] == out["models"]["m0"]["rank_high"] == 1.0
    assert out["unit"] == "image" and out["failed"] == 0 and out["resamples_used"] == 200


def test_duplicated_model_lands_in_its_twins_tier():
    simulations, same = 100, 0
    rng = np.random.default_rng(2024)
    for k in range(simulations):
        n = 240
        patients = np.repeat(np.arange(n // 2), 2)
        y = np.repeat(rng.random(n // 2) < 0.4, 2).astype(int)
        scores = _models(rng, y, list(rng.uniform(0.3, 0.9, 4)))
        twin = int(rng.integers(4))
        jitter = 1e-9 * rng.normal(size=scores[twin].shape)  # tiny: may reorder exact ties, nothing else
        scores.append(np.clip(scores[twin] + jitter, 0, 1))
        preds = {f"m{i}": Predictions(np.arange(n), y, s) for i, s in enumerate(scores)}
        clusters = rs.make_clusters(n, patients, labels=y)
        out = ranking.within_dataset_ranking("auc", preds, clusters, resamples=200, seed=k)
        same += out["models"][f"m{twin}"]["tied_with_best"] == out["models"]["m4"]["tied_with_best"]
    assert same / simulations >= 0.95


def test_rank_intervals_refuse_mismatched_inputs():
    with pytest.raises(FmcacheError, match="do not describe one model set"):
        ranking.rank_intervals(np.zeros((10, 3)), [0.1, 0.2], ["a", "b"])
    y = np.array([0, 1] * 10)
    a = Predictions(np.arange(20), y, np.full((1, 20, 2), 0.5))
    b = Predictions(np.arange(1, 21), y, np.full((1, 20, 2), 0.5))
    with pytest.raises(FmcacheError, match="other test ids"):
        ranking.within_dataset_ranking("auc", {"a": a, "b": b})
