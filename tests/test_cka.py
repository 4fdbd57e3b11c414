"""Linear CKA: reference values, invariances, feature space == gram matrices, streaming over caches, CLI and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fmcache.cache.reader import CacheReader
from fmcache.cache.shards import ShardWriter
from fmcache.cli import app
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_json
from fmcache.frozen.cka import ExactCka, MinibatchCka, compute_cka, linear_cka
from fmcache.frozen.cka_read import batch_bounds, select
from tests.conftest import cka

runner = CliRunner()


# -- a plain gram-matrix implementation, independent of the feature-space derivation --------------------------------


def _hsic(k: np.ndarray, m: np.ndarray, debiased: bool) -> float:
    n = len(k)
    if not debiased:
        h = np.eye(n) - 1.0 / n
        return float(np.trace(k @ h @ m @ h))
    k, m = k.copy(), m.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(m, 0.0)
    value = np.trace(k @ m) + k.sum() * m.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * k.sum(0) @ m.sum(0)
    return float(value / (n * (n - 3)))


def gram_cka(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    # both estimators are exactly invariant to a constant shift; centring keeps this reference accurate to 1e-12
    x, y = x - x.mean(0), y - y.mean(0)
    k, m = x @ x.T, y @ y.T
    return _hsic(k, m, debiased) / np.sqrt(_hsic(k, k, debiased) * _hsic(m, m, debiased))


def minibatch_reference(xs, ys, bounds) -> np.ndarray:
    """Σ_b HSIC_u(K_b, L_b) / √(Σ_b HSIC_u(K_b, K_b) · Σ_b HSIC_u(L_b, L_b)) for every pair, with grams."""
    out = np.zeros((len(xs), len(ys)))
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            parts = np.zeros(3)
            for lo, hi in bounds:
                xb, yb = x[lo:hi] - x[lo:hi].mean(0), y[lo:hi] - y[lo:hi].mean(0)  # exact invariance, accurate sums
                k, m = xb @ xb.T, yb @ yb.T
                parts += [_hsic(k, m, True), _hsic(k, k, True), _hsic(m, m, True)]
            out[i, j] = parts[0] / np.sqrt(parts[1] * parts[2])
    return out


def _kornblith_demo() -> tuple[np.ndarray, np.ndarray]:
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


# -- numbers --------------------------------------------------------------------------------------------------------


def test_kornblith_demo_values():
    x, y = _kornblith_demo()
    assert linear_cka(x, y) == pytest.approx(0.55761, abs=5e-6)
    assert linear_cka(x, y, debiased=True) == pytest.approx(0.51346, abs=5e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_self_similarity_is_one(debiased):
    x = np.random.default_rng(0).normal(size=(50, 7))
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(debiased):
    x, y = _kornblith_demo()
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(10, 10)))
    base = linear_cka(x, y, debiased)
    assert linear_cka(x @ q, y, debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, 7.5 * y, debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(0.01 * x @ q, 3.0 * y @ q.T, debiased) == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_exact_streamed_equals_gram_matrices(debiased):
    # uneven chunks, mixed widths and a large common offset: the one-pass sums must still match to 1e-10
    rng = np.random.default_rng(2)
    base = rng.normal(size=(61, 4))
    a = [base @ rng.normal(size=(4, d)) + rng.normal(size=(61, d)) + 50.0 for d in (3, 9, 6)]
    b = [base @ rng.normal(size=(4, d)) + 0.5 * rng.normal(size=(61, d)) - 20.0 for d in (5, 2)]
    self_acc, cross_acc = ExactCka([3, 9, 6]), ExactCka([3, 9, 6], [5, 2])
    for lo, hi in ((0, 7), (7, 30), (30, 31), (31, 61)):
        self_acc.update([x[lo:hi] for x in a])
        cross_acc.update([x[lo:hi] for x in a], [y[lo:hi] for y in b])
    expect_self = np.array([[gram_cka(x, y, debiased) for y in a] for x in a])
    expect_cross = np.array([[gram_cka(x, y, debiased) for y in b] for x in a])
    np.testing.assert_allclose(self_acc.matrix(debiased), expect_self, atol=1e-10, rtol=0)
    np.testing.assert_allclose(cross_acc.matrix(debiased), expect_cross, atol=1e-10, rtol=0)
    np.testing.assert_allclose(np.diag(self_acc.matrix(debiased)), 1.0, atol=1e-12)


def test_minibatch_with_one_batch_equals_exact_debiased():
    x, y = _kornblith_demo()
    acc = MinibatchCka(1, 1)
    acc.update([x], [y])
    assert acc.matrix()[0, 0] == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-12)


def test_minibatch_sums_hsic_over_batches_and_merges_a_tiny_last_batch():
    assert batch_bounds(10, 4) == [(0, 4), (4, 10)]  # a last batch of 2 joins the previous one
    assert batch_bounds(12, 4) == [(0, 4), (4, 8), (8, 12)]
    assert batch_bounds(3, 8) == [(0, 3)]
    with pytest.raises(FmcacheError, match="at least 4"):
        batch_bounds(10, 3)
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(42, d)) for d in (4, 6)]
    ys = [x @ rng.normal(size=(x.shape[1], 5)) + rng.normal(size=(42, 5)) for x in xs]
    bounds = batch_bounds(42, 10)
    acc = MinibatchCka(2, 2)
    for lo, hi in bounds:
        acc.update([x[lo:hi] for x in xs], [y[lo:hi] for y in ys])
    np.testing.assert_allclose(acc.matrix(), minibatch_reference(xs, ys, bounds), atol=1e-10, rtol=0)


# -- caches ---------------------------------------------------------------------------------------------------------


def write_cache(folder: Path, pooled: np.ndarray, ids: np.ndarray, split: np.ndarray, layer_dims, shard_size: int):
    """A complete cache of given (n, L, D) pooled cls features, written with the cache's own shard writer."""
    folder.mkdir(parents=True)
    key = "f" * 64
    entries = []
    for index, lo in enumerate(range(0, len(ids), shard_size)):
        hi = min(lo + shard_size, len(ids))
        writer = ShardWriter(folder, index, hi - lo, {"key": key, "schema": 1, "shard": index}, None)
        writer.append({"ids": ids[lo:hi], "split": split[lo:hi], "labels": np.zeros(hi - lo, np.int64),
                       "pooled/cls": pooled[lo:hi]})  # fmt: skip
        entries.append({**writer.commit({}), "index": index, "seconds": 0.0})
    manifest = {
        "schema": 1, "key": key, "status": "complete", "num_shards": len(entries), "shards": entries,
        "inputs": {"dataset": {"name": "csv", "split": {"mode": "file"}}}, "dtype": "fp32",
        "model": {"name": "synthetic", "num_layers": pooled.shape[1], "layer_dims": list(layer_dims),
                  "pools": ["cls"], "token_layers": [], "pooled_kind": "cls"},
        "dataset": {"name": "csv", "fingerprint": "x", "class_names": ["a"], "multilabel": False, "metric": "accuracy"},
    }  # fmt: skip
    atomic_write_json(folder / "manifest.json", manifest)
    return folder


def test_hierarchical_layers_use_their_true_width(tmp_path: Path):
    rng = np.random.default_rng(4)
    n, dims = 40, (3, 6)
    pooled = np.zeros((n, 2, 6), np.float32)
    pooled[:, 0, :3] = rng.normal(size=(n, 3))
    pooled[:, 0, 3:] = rng.normal(size=(n, 3)) * 100  # not real features: only layer_dims says where layer 1 ends
    pooled[:, 1] = rng.normal(size=(n, 6))
    split = np.full(n, 2, np.int8)
    cache = write_cache(tmp_path / "c", pooled, np.arange(n), split, dims, shard_size=16)
    result = compute_cka(select(CacheReader(cache), "all", "cls"), None, "test", "exact", True)
    expect = gram_cka(pooled[:, 0, :3], pooled[:, 1], True)
    assert result["matrix"][0, 1] == pytest.approx(expect, abs=1e-10) and result["n"] == n


@pytest.fixture(scope="module")
def other_caches(tmp_path_factory, aptos_root: Path, tiny_weights: Path) -> dict[str, Path]:
    """Caches of the same APTOS fixture as ``tiny_cache``: another shard size with tokens of layer 2, and a --limit."""
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import quiet, spec_kwargs

    root = tmp_path_factory.mktemp("cka_caches")
    kw = spec_kwargs(aptos_root, root, weights=tiny_weights)
    resharded = run_extract(ExtractSpec(**{**kw, "tokens": "2", "shard_size": 6}), progress=False, log=quiet)
    limited = run_extract(ExtractSpec(**{**kw, "tokens": "none", "limit": 3}), progress=False, log=quiet)
    return {"resharded": resharded, "limited": limited}


def test_exact_from_cache_equals_numpy_on_the_read_features(tiny_cache: Path):
    reader = CacheReader(tiny_cache)
    xs = [reader.pooled("test", n, "cls") for n in (1, 2)]
    for debiased in (False, True):
        got = compute_cka(select(reader, "all", "cls"), None, "test", "exact", debiased)["matrix"]
        expect = np.array([[gram_cka(x, y, debiased) for y in xs] for x in xs])
        np.testing.assert_allclose(got, expect, atol=1e-10, rtol=0)
    all_ids = compute_cka(select(reader, "last", "cls"), None, "all", "exact", True)
    assert all_ids["n"] == 40


def test_two_caches_align_across_shard_layouts(tiny_cache: Path, other_caches):
    # the same weights and samples in shards of 16 and of 6: layer by layer the features agree, so CKA is 1
    a, b = CacheReader(tiny_cache), CacheReader(other_caches["resharded"])
    result = compute_cka(select(a, "all", "mean"), select(b, "all", "mean"), "val", "exact", True)
    np.testing.assert_allclose(np.diag(result["matrix"]), 1.0, atol=1e-6)
    x1, x2 = a.pooled("val", 1, "mean"), b.pooled("val", 2, "mean")
    assert result["matrix"][0, 1] == pytest.approx(gram_cka(x1, x2, True), abs=1e-9)


def test_tokens_minibatch_equals_grams_of_flattened_token_maps(tiny_cache: Path, other_caches):
    a = CacheReader(tiny_cache)
    b = CacheReader(other_caches["resharded"])
    flat = [np.stack([t.numpy().astype(np.float64).ravel() for t, _, _ in a.tokens("train", n)]) for n in (1, 2)]
    result = compute_cka(select(a, "1,2", "tokens"), select(b, "2", "tokens"), "train", "minibatch", True, 8)
    bounds = batch_bounds(len(flat[0]), 8)  # 28 train samples: 8, 8, 8, 4 (a last 4 is a batch)
    expect = minibatch_reference(flat, [flat[1]], bounds)
    np.testing.assert_allclose(result["matrix"], expect, atol=1e-9, rtol=0)
    assert result["batches"] == len(bounds)


def test_cli_writes_matrix_csv_and_heatmap(tiny_cache: Path, other_caches, tmp_path: Path):
    out = tmp_path / "r"
    result = runner.invoke(app, ["cka", str(tiny_cache), "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    folder = next(out.rglob("result.json")).parent
    assert folder.parent == out / "aptos2019" / "dinov2_vits14" / CacheReader(tiny_cache).key[:12]
    assert folder.name.startswith("cka-")
    doc = json.loads((folder / "result.json").read_text())
    payload = doc["details"]
    matrix = np.array(payload["matrix"])
    assert matrix.shape == (2, 2) and np.allclose(np.diag(matrix), 1.0)
    assert doc["summary"]["matrix"] == payload["matrix"] and doc["summary"]["layers_a"] == [1, 2]
    assert doc["protocol"] == "cka" and doc["cache_key"] == CacheReader(tiny_cache).key
    assert payload["row_layers"] == [1, 2] and payload["n"] == 6 and payload["split"] == "test"
    assert payload["cache_a"]["cache_key"] == payload["cache_b"]["cache_key"] == CacheReader(tiny_cache).key
    assert not (folder / "predictions.npz").exists()
    lines = (folder / "result.csv").read_text().splitlines()
    assert lines[0] == "layer_a,layer_b,cka" and len(lines) == 5 and lines[1].startswith("1,1,")
    assert (folder / "cka_heatmap.png").stat().st_size > 0

    argv = ["cka", str(tiny_cache), str(other_caches["resharded"]), "--layers", "2", "--layers-b", "1,2",
            "--biased", "--split", "val", "--out", str(out), "--no-plots"]  # fmt: skip
    result = runner.invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    pair = next(p for p in out.rglob("result.json") if p.parent != folder)
    assert pair.parent.parent == folder.parent  # cache A's folder; B is in the settings
    doc = json.loads(pair.read_text())
    payload = doc["details"]
    assert doc["settings"]["cache_b_key"] == CacheReader(other_caches["resharded"]).key
    assert payload["row_layers"] == [2] and payload["col_layers"] == [1, 2] and doc["settings"]["debiased"] is False
    assert payload["matrix"][0][1] == pytest.approx(1.0, abs=1e-6)
    assert not (pair.parent / "cka_heatmap.png").exists()


def _partial_copy(tiny_cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "partial"
    shutil.copytree(tiny_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["status"] = "partial"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _other_dataset_copy(tiny_cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "other"
    shutil.copytree(tiny_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["dataset"]["name"] = "isic2019"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "no cache at"),
        (["{partial}"], "incomplete"),
        (["{cache}", "--pool", "paper", "--layers", "1"], "last layer"),
        (["{cache}", "--pool", "vlad"], "unknown --pool"),
        (["{cache}", "--layers", "9"], "layers 1..2"),
        (["{resharded}", "--pool", "tokens", "--layers", "1"], "--tokens 1"),
        (["{cache}", "{limited}"], "lacks 3 of the 6 'test' samples"),
        (["{cache}", "{other}"], "different datasets (aptos2019 vs isic2019)"),
        (["{limited}"], "has 3 samples; CKA needs at least 4"),
        (["{cache}", "--split", "dev"], "unknown --split"),
        (["{cache}", "--estimator", "minibatch", "--biased"], "--biased needs --estimator exact"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_cache, other_caches, tmp_path, args, message):
    paths = {"cache": tiny_cache, "missing": tmp_path / "nope", **other_caches}
    if "{partial}" in args:
        paths["partial"] = _partial_copy(tiny_cache, tmp_path)
    if "{other}" in args:
        paths["other"] = _other_dataset_copy(tiny_cache, tmp_path)
    out = tmp_path / "r"
    result = runner.invoke(app, ["cka", *(a.format(**paths) for a in args), "--out", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_run_cka_returns_the_written_matrix(tiny_cache: Path, tmp_path: Path):
    result = cka(CacheReader(tiny_cache), out=tmp_path, layers="last", pool="cls", split="val", plots=False)
    assert result["matrix"].shape == (1, 1) and result["matrix"][0, 0] == pytest.approx(1.0)
    assert [r["layer_a"] for r in result["rows"]] == [2]
