"""Weighted k-NN on cached features (DINO protocol).

Features are L2-normalised, so inner product = cosine similarity. One exact FAISS search
(``IndexFlatIP``) at the largest k serves every k: the neighbours of a smaller k are a prefix of the
sorted list. The train bank is indexed once per call (the seed code rebuilt it every evaluation).

Each neighbour votes with weight exp(sim / T):

- single-label: score[c] = sum of the weights of neighbours of class c, divided by the sum of all
  weights (scores sum to 1; the prediction is the argmax, ties to the lowest class index);
- multi-label: score[c] = weighted average of the neighbours' labels for column c, over the neighbours
  whose label c is known (not NaN). If none of the k neighbours knows column c, the score falls back to
  the bank's prevalence of label c.

Defaults follow DINO/DINOv2 (k in 10, 20, 100, 200; T = 0.07); the seed's setting is ``ks=[200],
temperature=0.1``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from fmcache import metrics
from fmcache.errors import FmcacheError

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
# FAISS GPU's exact search supports at most this many neighbours per query.
_FAISS_GPU_MAX_K = 2048
# Upper bound on elements of the (rows, k, C) neighbour-label block built for multi-label votes.
_MULTILABEL_BLOCK = 1 << 22


def l2_normalise(x: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm, as contiguous float32 (all-zero rows stay zero); ``overwrite``
    normalises a float32 C-contiguous ``x`` in place. Norms are taken in row blocks: no (n, D) temporaries."""
    x = np.asarray(x, dtype=np.float32, order="C") if overwrite else np.array(x, dtype=np.float32, order="C")
    for start in range(0, len(x), 8192):
        block = x[start : start + 8192]
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return x


def _check_inputs(bank_x: np.ndarray, bank_y: np.ndarray, query_x: np.ndarray, ks: Sequence[int]) -> None:
    if bank_x.ndim != 2 or query_x.ndim != 2:
        raise FmcacheError(f"k-NN needs 2-D feature arrays (N, D), got bank {bank_x.shape} and queries {query_x.shape}")
    if len(bank_x) == 0:
        raise FmcacheError("the k-NN train bank is empty; check that the cache has a non-empty train split")
    if len(query_x) == 0:
        raise FmcacheError("no k-NN queries: the evaluated split is empty; check the cache's splits")
    if bank_x.shape[1] != query_x.shape[1]:
        raise FmcacheError(
            f"feature sizes differ: bank has d={bank_x.shape[1]}, queries d={query_x.shape[1]};"
            " use features of the same layer and kind"
        )
    if len(bank_y) != len(bank_x):
        raise FmcacheError(f"bank has {len(bank_x)} features but {len(bank_y)} labels")
    if max(ks) > len(bank_x):
        raise FmcacheError(f"k={max(ks)} is larger than the train bank (n={len(bank_x)}); choose k <= {len(bank_x)}")


def _as_ks(ks: Sequence[int]) -> list[int]:
    """``ks`` as a list of distinct positive ints, in the given order."""
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise FmcacheError(f"ks must be positive integers, got {ks}")
    return list(dict.fromkeys(int(k) for k in ks))


def _check_labels(bank_y: np.ndarray, num_classes: int, multilabel: bool) -> np.ndarray:
    y = np.asarray(bank_y)
    if multilabel:
        if y.ndim != 2 or y.shape[1] != num_classes:
            raise FmcacheError(f"multi-label bank labels must be (N, {num_classes}), got shape {y.shape}")
        return y.astype(np.float64)
    if y.ndim != 1 or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise FmcacheError(f"single-label bank labels must be (N,) class indices, got shape {y.shape}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise FmcacheError(f"bank labels must lie in 0..{num_classes - 1} (num_classes={num_classes})")
    return y


def _use_gpu(use_gpu: bool | None, kmax: int) -> bool:
    import faiss

    has_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu and not has_gpu:
        raise FmcacheError("k-NN on GPU was requested but FAISS sees no GPU; drop the GPU option to run on CPU")
    # FAISS GPU caps k; larger k runs exactly on CPU instead.
    return bool(has_gpu and use_gpu is not False and kmax <= _FAISS_GPU_MAX_K)


def build_index(bank_x: np.ndarray, use_gpu: bool):
    """What :func:`search` searches for L2-normalised ``bank_x``: on GPU an exact inner-product FAISS index on GPU 0;
    on CPU the array itself, which ``faiss.knn`` searches in place (no second copy of the bank)."""
    if not use_gpu:
        return bank_x
    import faiss

    index = faiss.IndexFlatIP(bank_x.shape[1])
    resources = faiss.StandardGpuResources()
    index = faiss.index_cpu_to_gpu(resources, 0, index)
    # The GPU index does not own its resources; keep them alive as long as the index.
    index.referenced_objects = [resources]
    index.add(bank_x)
    return index


def search(index, query_x: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (similarities, bank indices) per normalised query, most similar first, searched in batches."""
    if batch_size < 1:
        raise FmcacheError(f"batch_size must be >= 1, got {batch_size}")
    import faiss

    sims = np.empty((len(query_x), k), dtype=np.float32)
    ids = np.empty((len(query_x), k), dtype=np.int64)
    for start in range(0, len(query_x), batch_size):
        stop = start + batch_size
        if isinstance(index, np.ndarray):
            found = faiss.knn(query_x[start:stop], index, k, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            found = index.search(query_x[start:stop], k)
        sims[start:stop], ids[start:stop] = found
    return sims, ids


def _vote_weights(sims: np.ndarray, temperature: float) -> np.ndarray:
    # exp(sim/T) scaled by exp(-max_sim/T) per row: the scores are normalised per row, so this changes
    # nothing but keeps small temperatures from overflowing.
    s = sims.astype(np.float64)
    return np.exp((s - s[:, :1]) / temperature)


def _single_label_scores(
    weights: np.ndarray, neighbour_y: np.ndarray, ks: Sequence[int], num_classes: int
) -> dict[int, np.ndarray]:
    n = len(weights)
    rows = np.arange(n)[:, None] * num_classes
    out = {}
    for k in ks:
        flat = (rows + neighbour_y[:, :k]).ravel()
        votes = np.bincount(flat, weights=weights[:, :k].ravel(), minlength=n * num_classes)
        votes = votes.reshape(n, num_classes)
        out[k] = votes / votes.sum(1, keepdims=True)
    return out


def _multilabel_scores(
    weights: np.ndarray, neighbour_y: np.ndarray, ks: Sequence[int], prior: np.ndarray
) -> dict[int, np.ndarray]:
    known = ~np.isnan(neighbour_y)
    labels = np.where(known, neighbour_y, 0.0)
    out = {}
    for k in ks:
        num = np.einsum("nk,nkc->nc", weights[:, :k], labels[:, :k])
        den = np.einsum("nk,nkc->nc", weights[:, :k], known[:, :k].astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = np.where(den > 0, num / den, prior[None, :])
    return out


def scores_from_neighbours(
    sims: np.ndarray,
    ids: np.ndarray,
    bank_y: np.ndarray,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    multilabel: bool,
) -> dict[int, np.ndarray]:
    """Per-k (N, C) scores from neighbour lists sorted by decreasing similarity (see the module doc)."""
    weights = _vote_weights(sims, temperature)
    if not multilabel:
        return _single_label_scores(weights, bank_y[ids], ks, num_classes)
    prior = _label_prior(bank_y)
    # Gathering (rows, k, C) neighbour labels at once can be large; do it in blocks of rows.
    step = max(1, _MULTILABEL_BLOCK // (ids.shape[1] * num_classes))
    parts = [
        _multilabel_scores(weights[i : i + step], bank_y[ids[i : i + step]], ks, prior)
        for i in range(0, len(ids), step)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in ks}


def _label_prior(bank_y: np.ndarray) -> np.ndarray:
    known = ~np.isnan(bank_y)
    counts = known.sum(0)
    if np.any(counts == 0):
        column = int(np.flatnonzero(counts == 0)[0])
        raise FmcacheError(
            f"label column {column} has no known label in the k-NN train bank; drop it or change the"
            " uncertain-label policy"
        )
    return np.where(known, bank_y, 0.0).sum(0) / counts


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise FmcacheError(f"temperature must be > 0, got {temperature}")


def _resolve_num_classes(bank_y: np.ndarray, num_classes: int | None, multilabel: bool) -> int:
    if num_classes is not None:
        return int(num_classes)
    y = np.asarray(bank_y)
    if multilabel:
        return int(y.shape[1]) if y.ndim == 2 else 0
    return int(y.max()) + 1


def knn_predict(
    bank_x: np.ndarray,
    bank_y: np.ndarray,
    query_x: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    multilabel: bool = False,
    batch_size: int = 4096,
    use_gpu: bool | None = None,
) -> dict[int, np.ndarray]:
    """Weighted k-NN class scores for every k in ``ks`` from one search.

    ``bank_x`` (n, D) and ``query_x`` (N, D) are raw features (normalised here); ``bank_y`` is (n,) class
    indices, or (n, C) 0/1 with NaN = unknown when ``multilabel``. ``num_classes`` defaults to
    ``max(bank_y) + 1`` (single-label) or C; pass it when a class may be absent from the bank.
    ``use_gpu``: None = GPU if FAISS has one, False = CPU, True = GPU or error; FAISS GPU handles
    k <= 2048, a larger k searches on CPU.

    Returns ``{k: (N, C) float64 scores}`` as described in the module doc; ``metrics.evaluate`` turns
    them into predictions and metrics.
    """
    bank_x, query_x, ks = np.asarray(bank_x), np.asarray(query_x), _as_ks(ks)
    _check_inputs(bank_x, np.asarray(bank_y), query_x, ks)
    _check_temperature(temperature)
    num_classes = _resolve_num_classes(bank_y, num_classes, multilabel)
    labels = _check_labels(bank_y, num_classes, multilabel)
    kmax = max(ks)
    index = build_index(l2_normalise(bank_x), _use_gpu(use_gpu, kmax))
    sims, ids = search(index, l2_normalise(query_x), kmax, batch_size)
    return scores_from_neighbours(sims, ids, labels, ks, temperature, num_classes, multilabel)


def knn_evaluate(
    bank_x: np.ndarray,
    bank_y: np.ndarray,
    queries: dict[str, tuple[np.ndarray, np.ndarray]],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    metric: str,
    multilabel: bool = False,
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    batch_size: int = 4096,
    use_gpu: bool | None = None,
    keep_scores: bool = False,
    overwrite: bool = False,
) -> dict:
    """k-NN metrics for each query split (e.g. ``{"val": (x, y), "test": (x, y)}``) and each k.

    The bank is indexed once and each split searched once at ``max(ks)``. Returns::

        {"ks": [...], "temperature": T, "metric": name, "multilabel": bool, "num_classes": C,
         "device": "gpu" | "cpu", "bank_size": n,
         "splits": {split: {k: metrics.evaluate(...) dict}},
         "timings": {"index_seconds": s, "search_seconds": {split: s}, "vote_seconds": {split: s},
                     "total_seconds": s, "inference_seconds_per_sample": s}}

    ``inference_seconds_per_sample`` is search + vote time over all query samples (all ks together).
    ``keep_scores`` adds ``"scores": {split: {k: (N, C) float32}}`` (for predictions.npz).
    """
    metrics.check_metric(metric)
    bank_x, ks = np.asarray(bank_x), _as_ks(ks)
    if not queries:
        raise FmcacheError("no query splits given to k-NN; pass at least one split, e.g. val or test")
    for split, (qx, _qy) in queries.items():
        try:
            _check_inputs(bank_x, np.asarray(bank_y), np.asarray(qx), ks)
        except FmcacheError as err:
            raise FmcacheError(f"split {split!r}: {err}") from None
    _check_temperature(temperature)
    num_classes = _resolve_num_classes(bank_y, num_classes, multilabel)
    labels = _check_labels(bank_y, num_classes, multilabel)
    kmax = max(ks)
    gpu = _use_gpu(use_gpu, kmax)

    start = time.perf_counter()
    bank = l2_normalise(bank_x, overwrite)
    index = build_index(bank, gpu)
    timings: dict = {"index_seconds": time.perf_counter() - start, "search_seconds": {}, "vote_seconds": {}}
    splits, kept = {}, {}
    for split, (qx, qy) in queries.items():
        t0 = time.perf_counter()
        sims, ids = search(index, l2_normalise(np.asarray(qx), overwrite), kmax, batch_size)
        t1 = time.perf_counter()
        scores = scores_from_neighbours(sims, ids, labels, ks, temperature, num_classes, multilabel)
        timings["search_seconds"][split] = t1 - t0
        timings["vote_seconds"][split] = time.perf_counter() - t1
        splits[split] = {k: metrics.evaluate(metric, qy, scores[k], multilabel, label_names) for k in ks}
        if keep_scores:
            kept[split] = {k: v.astype(np.float32) for k, v in scores.items()}
    timings["total_seconds"] = time.perf_counter() - start
    n_queries = sum(len(qx) for qx, _ in queries.values())
    query_seconds = sum(timings["search_seconds"].values()) + sum(timings["vote_seconds"].values())
    timings["inference_seconds_per_sample"] = query_seconds / n_queries
    result = {
        "ks": [int(k) for k in ks],
        "temperature": float(temperature),
        "metric": metric,
        "multilabel": bool(multilabel),
        "num_classes": num_classes,
        "device": "gpu" if gpu else "cpu",
        "bank_size": len(bank_x),
        "splits": splits,
        "timings": timings,
    }
    if keep_scores:
        result["scores"] = kept
    return result


def knn_rows(result: dict, **extra) -> list[dict]:
    """Flatten a :func:`knn_evaluate` result into CSV rows: one per (split, k) with metric, value and
    accuracy; ``extra`` (e.g. ``layer=11``) is prepended to every row."""
    rows = []
    for split, per_k in result["splits"].items():
        for k, m in per_k.items():
            row = {**extra, "split": split, "k": k, "temperature": result["temperature"]}
            row.update({"metric": m["metric"], "value": m["value"], "accuracy": m["accuracy"]})
            if "macro_recall_seed" in m:  # the seed's variant, beside ours (README: where fmcache differs)
                row["macro_recall_seed"] = m["macro_recall_seed"]
            if m.get("skipped"):
                row["skipped"] = ";".join(m["skipped"])
            rows.append(row)
    return rows
