"""FAISS k-NN equals a brute-force numpy k-NN for every k (single- and multi-label)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from fmcache.errors import FmcacheError
from fmcache.frozen import knn

KS = [1, 5, 10, 20, 100, 200]


def _brute_force(bank_x, bank_y, query_x, k, temperature, num_classes, multilabel):
    """Reference: full similarity matrix in float64, argsort, exp(sim/T) weights."""
    b = bank_x / np.linalg.norm(bank_x, axis=1, keepdims=True)
    q = query_x / np.linalg.norm(query_x, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ b.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    weights = np.exp(np.take_along_axis(sims, order, axis=1) / temperature)
    if not multilabel:
        votes = np.zeros((len(q), num_classes))
        for i in range(len(q)):
            for j in range(k):
                votes[i, bank_y[order[i, j]]] += weights[i, j]
        return votes / votes.sum(1, keepdims=True)
    prior = np.nanmean(bank_y, axis=0)
    scores = np.empty((len(q), num_classes))
    for i in range(len(q)):
        for c in range(num_classes):
            labels = bank_y[order[i], c]
            known = ~np.isnan(labels)
            w = weights[i][known]
            scores[i, c] = (w * labels[known]).sum() / w.sum() if known.any() else prior[c]
    return scores


def _clustered(seed, n_bank=400, n_query=60, d=32, c=4):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    bank_y = rng.integers(0, c, n_bank)
    query_y = rng.integers(0, c, n_query)
    bank_x = centers[bank_y] + 1.5 * rng.normal(size=(n_bank, d))
    query_x = centers[query_y] + 1.5 * rng.normal(size=(n_query, d))
    return bank_x.astype(np.float32), bank_y, query_x.astype(np.float32), query_y


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("temperature", [0.07, 0.1])
def test_single_label_matches_brute_force(seed, temperature):
    bank_x, bank_y, query_x, _ = _clustered(seed)
    out = knn.knn_predict(
        bank_x, bank_y, query_x, KS, temperature=temperature, num_classes=4, batch_size=16, use_gpu=False
    )
    assert set(out) == set(KS)
    for k in KS:
        ref = _brute_force(bank_x, bank_y, query_x, k, temperature, 4, False)
        np.testing.assert_allclose(out[k], ref, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(out[k].argmax(1), ref.argmax(1))


@pytest.mark.parametrize("seed", [0, 1])
def test_multilabel_matches_brute_force_with_unknown_labels(seed):
    rng = np.random.default_rng(seed)
    bank_x, _, query_x, _ = _clustered(seed)
    bank_y = (rng.random((len(bank_x), 5)) < 0.3).astype(np.float64)
    bank_y[rng.random(bank_y.shape) < 0.3] = np.nan
    bank_y[:, 4] = np.nan
    bank_y[:3, 4] = 1.0  # column 4 is mostly unknown: small k falls back to the prior
    out = knn.knn_predict(bank_x, bank_y, query_x, KS, temperature=0.07, num_classes=5, multilabel=True, use_gpu=False)
    for k in KS:
        ref = _brute_force(bank_x, bank_y, query_x, k, 0.07, 5, True)
        np.testing.assert_allclose(out[k], ref, rtol=1e-4, atol=1e-7)


def test_exact_vote_tie_goes_to_lowest_class():
    bank_x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    bank_y = np.array([2, 1, 0])
    out = knn.knn_predict(bank_x, bank_y, np.array([[1.0, 0.0]], dtype=np.float32), [2], num_classes=3)
    np.testing.assert_allclose(out[2], [[0.0, 0.5, 0.5]])
    assert out[2].argmax(1)[0] == 1


def test_small_temperature_does_not_overflow():
    bank_x, bank_y, query_x, _ = _clustered(3)
    out = knn.knn_predict(bank_x, bank_y, query_x, [200], temperature=1e-3, num_classes=4)
    assert np.all(np.isfinite(out[200]))
    np.testing.assert_allclose(out[200].sum(1), 1.0)


def test_k_larger_than_bank_is_an_error():
    bank_x, bank_y, query_x, _ = _clustered(0, n_bank=50)
    with pytest.raises(FmcacheError, match=r"k=100 is larger than the train bank \(n=50\)"):
        knn.knn_predict(bank_x, bank_y, query_x, [10, 100], num_classes=4)


def test_empty_bank_or_queries_is_an_error():
    bank_x, bank_y, query_x, _ = _clustered(0)
    with pytest.raises(FmcacheError, match="train bank is empty"):
        knn.knn_predict(bank_x[:0], bank_y[:0], query_x, [1], num_classes=4)
    with pytest.raises(FmcacheError, match="split is empty"):
        knn.knn_predict(bank_x, bank_y, query_x[:0], [1], num_classes=4)


def test_bad_ks_and_temperature_are_errors():
    bank_x, bank_y, query_x, _ = _clustered(0)
    with pytest.raises(FmcacheError, match="positive integers"):
        knn.knn_predict(bank_x, bank_y, query_x, [0, 5], num_classes=4)
    with pytest.raises(FmcacheError, match="temperature"):
        knn.knn_predict(bank_x, bank_y, query_x, [5], temperature=0.0, num_classes=4)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the CPU-only error path")
def test_gpu_requested_without_gpu_is_an_error():
    bank_x, bank_y, query_x, _ = _clustered(0)
    with pytest.raises(FmcacheError, match="no GPU"):
        knn.knn_predict(bank_x, bank_y, query_x, [5], num_classes=4, use_gpu=True)


def test_knn_evaluate_structure_and_metrics():
    bank_x, bank_y, val_x, val_y = _clustered(0)
    _, _, test_x, test_y = _clustered(1)
    out = knn.knn_evaluate(
        bank_x,
        bank_y,
        {"val": (val_x, val_y), "test": (test_x, test_y)},
        [10, 200],
        temperature=0.1,
        metric="macro_recall",
        num_classes=4,
        use_gpu=False,
    )
    assert out["device"] == "cpu"
    assert out["ks"] == [10, 200] and out["temperature"] == 0.1 and out["bank_size"] == 400
    assert set(out["splits"]) == {"val", "test"}
    scores = knn.knn_predict(bank_x, bank_y, val_x, [10], temperature=0.1, num_classes=4)[10]
    m = out["splits"]["val"][10]
    assert m["metric"] == "macro_recall"
    assert m["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == val_y))
    assert m["value"] > 0.4  # clustered data: well above chance (0.25)
    timings = out["timings"]
    assert set(timings["search_seconds"]) == {"val", "test"}
    assert timings["inference_seconds_per_sample"] > 0
    rows = knn.knn_rows(out, layer=11)
    assert len(rows) == 4 and rows[0]["layer"] == 11 and {"split", "k", "value"} <= set(rows[0])


def test_knn_results_are_written_and_plotted(tmp_path):
    import json

    from fmcache import plots, results

    bank_x, bank_y, val_x, val_y = _clustered(0)
    out = knn.knn_evaluate(bank_x, bank_y, {"val": (val_x, val_y)}, [5, 10], metric="accuracy", num_classes=4)
    doc = json.loads(json.dumps(results.to_jsonable({"knn": out})))
    assert doc["knn"]["splits"]["val"]["5"]["metric"] == "accuracy"
    csv = results.csv_bytes(knn.knn_rows(out, layer=11)).decode()
    assert csv.splitlines()[0] == "layer,split,k,temperature,metric,value,accuracy"
    png = plots.plot_knn_vs_k(tmp_path / "out" / "k.png", out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = plots.plot_knn_vs_layer(tmp_path / "out" / "layers.png", {10: out, 11: out})
    assert png.stat().st_size > 0


def test_unwritable_results_folder_is_an_error(tmp_path):
    from fmcache.files import ensure_writable_dir

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FmcacheError, match=r"cannot write .*writable folder"):
        ensure_writable_dir(blocker / "out")
