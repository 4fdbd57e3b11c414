"""Linear CKA between layers of one or two caches, streamed over shards in one pass.

Two estimators:

- **exact** works in feature space. For centred features X (n, p) and Y (n, q), biased linear CKA (Kornblith et al.
  2019) is ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F), so only the p × q cross-products are accumulated, never an n × n gram. The
  debiased variant uses the unbiased HSIC of Song et al. (2012) on the grams K = XXᵀ, L = YYᵀ with zeroed diagonals,

      HSIC_u = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3)),

  and every term is a feature-space sum. With a_i = ‖x_i‖², b_i = ‖y_i‖², s_x = Xᵀ1, s_y = Yᵀ1:

      tr(K̃L̃)  = ‖XᵀY‖²_F - aᵀb
      1ᵀK̃1    = ‖s_x‖² - Σa
      1ᵀK̃L̃1  = (X s_x - a)ᵀ(Y s_y - b) = s_xᵀ(XᵀY)s_y - s_xᵀ(Xᵀb) - (Yᵀa)ᵀs_y + aᵀb.

  So one pass accumulates, in float64, XᵀY for every needed pair of layers, Xᵀ1, Xᵀ(norms of every layer), and the
  norms' own cross-products. Memory depends on the feature widths, not on n.
- **minibatch** (Nguyen, Raghu & Kornblith 2021) sums unbiased HSIC over batches and takes the ratio of the sums (not
  the mean of per-batch CKA, the seed's biased choice). Each layer's batch gram is computed once and serves every pair.
  Batches follow the canonical sample order; a last batch of fewer than 4 samples joins the previous one, since
  unbiased HSIC needs n ≥ 4. This serves token maps, too wide for feature space.

Features are shifted by the first block's mean before accumulating: CKA and unbiased HSIC are invariant to a constant
shift, and the shift keeps the float64 sums from cancelling when features have a large mean. What is read, and in
which order, is :mod:`fmcache.frozen.cka_read`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from fmcache.choices import CKA_ESTIMATORS
from fmcache.dist import synchronize
from fmcache.errors import FmcacheError
from fmcache.frozen.cka_read import (
    MIN_SAMPLES,
    Selection,
    aligned_ids,
    batch_bounds,
    paired_blocks,
    rebatch,
)

# Feature-space accumulators beyond this many float64 values (about 4 GB) are refused in favour of minibatch.
_MAX_EXACT_VALUES = 1 << 29


# -- estimators -----------------------------------------------------------------------------------------------------


class ExactCka:
    """Feature-space accumulators for the whole L × L' matrix (see the module doc); feed blocks, read the matrix.

    ``dims_b`` None means self-CKA: the second set of layers is the first, and only the upper triangle of pairs is
    accumulated. All sums are float64 on ``device``.
    """

    def __init__(self, dims_a: Sequence[int], dims_b: Sequence[int] | None = None, device: torch.device | None = None):
        self.same = dims_b is None
        self.la = len(dims_a)
        self.dims = [*dims_a, *([] if self.same else dims_b)]
        self.device = device or torch.device("cpu")
        self.offsets = np.concatenate([[0], np.cumsum(self.dims)]).astype(int)
        count = len(self.dims)
        if self.same:
            cross = sum(d * int(self.offsets[-1] - self.offsets[i]) for i, d in enumerate(self.dims))
        else:
            cross = sum(dims_a) * sum(dims_b) + sum(d * d for d in self.dims)
        if cross > _MAX_EXACT_VALUES:
            raise FmcacheError(
                f"exact CKA over these widths needs {cross * 8 / 2**30:.0f} GiB of float64 cross-products; "
                "use --estimator minibatch (the default for --pool tokens)"
            )
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.n = 0
        self.shift: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        # per-layer views into single vectors/matrices, so one in-place update per block serves every layer
        self.sum_all = zeros(int(self.offsets[-1]))
        self.norm_cross_all = zeros(int(self.offsets[-1]), count)  # Xᵀ(squared row norms of every layer)
        self.sums = [self.sum_all[self.offsets[k] : self.offsets[k + 1]] for k in range(count)]
        self.norm_cross = [self.norm_cross_all[self.offsets[k] : self.offsets[k + 1]] for k in range(count)]
        self.norm_gram = zeros(count, count)
        self.norm_sums = zeros(count)
        if self.same:  # row i holds Xᵢᵀ[Xᵢ … X_L]
            self.rows = [zeros(d, int(self.offsets[-1] - self.offsets[i])) for i, d in enumerate(self.dims)]
        else:  # row i holds Xᵢᵀ[Y₁ … Y_L'], plus every layer's own gram
            width_b = int(self.offsets[-1] - self.offsets[self.la])
            self.rows = [zeros(d, width_b) for d in self.dims[: self.la]]
            self.grams = [zeros(d, d) for d in self.dims]

    def update(self, blocks_a: Sequence[np.ndarray], blocks_b: Sequence[np.ndarray] | None = None) -> None:
        blocks = list(blocks_a)
        if not self.same:
            if blocks_b is None or len(blocks_b[0]) != len(blocks_a[0]):
                raise FmcacheError("CKA blocks of the two caches must have the same rows")
            blocks += list(blocks_b)
        z = self._stage(blocks)
        if self.shift is None:
            self.shift = z.mean(0)
        z.sub_(self.shift)
        feats = [z[:, self.offsets[k] : self.offsets[k + 1]] for k in range(len(self.dims))]
        norms = torch.stack([torch.linalg.vector_norm(f, dim=1).square_() for f in feats], dim=1)  # (rows, layers)
        self.n += len(z)
        # addmm_ accumulates in place: no product temporaries, whose changing sizes would fragment the heap and let
        # peak memory creep up with the number of blocks
        self.norm_gram.addmm_(norms.T, norms)
        self.norm_sums += norms.sum(0)
        self.sum_all += z.sum(0)
        self.norm_cross_all.addmm_(z.T, norms)
        if self.same:
            for i, f in enumerate(feats):
                self.rows[i].addmm_(f.T, z[:, self.offsets[i] :])
        else:
            z_b = z[:, self.offsets[self.la] :]
            for i in range(self.la):
                self.rows[i].addmm_(feats[i].T, z_b)
            for k, f in enumerate(feats):
                self.grams[k].addmm_(f.T, f)

    def _stage(self, blocks: Sequence[np.ndarray]) -> torch.Tensor:
        """The block's layers side by side as float64 in one buffer reused across blocks (converted while copied)."""
        rows = len(blocks[0])
        if self._buffer is None or len(self._buffer) < rows:
            self._buffer = torch.empty(rows, int(self.offsets[-1]), dtype=torch.float64, device=self.device)
        z = self._buffer[:rows]
        for k, x in enumerate(blocks):
            z[:, self.offsets[k] : self.offsets[k + 1]].copy_(torch.from_numpy(np.asarray(x)))
        return z

    def _cross(self, k1: int, k2: int) -> torch.Tensor:
        """Accumulated X_k1ᵀ X_k2 (feature indices over A then B)."""
        if k1 == k2 and not self.same:
            return self.grams[k1]
        if self.same:
            i, j = min(k1, k2), max(k1, k2)
            block = self.rows[i][:, self.offsets[j] - self.offsets[i] : self.offsets[j + 1] - self.offsets[i]]
            return block if i == k1 else block.T
        start = self.offsets[k2] - self.offsets[self.la]
        return self.rows[k1][:, start : start + self.dims[k2]]

    def hsic(self, k1: int, k2: int, debiased: bool) -> float:
        """HSIC of features k1 and k2 up to a factor common to every pair (it cancels in CKA)."""
        n, cross = self.n, self._cross(k1, k2)
        s1, s2 = self.sums[k1], self.sums[k2]
        if not debiased:
            centred = cross - torch.outer(s1, s2) / n
            return float((centred * centred).sum())
        if n < MIN_SAMPLES:
            raise FmcacheError(f"debiased CKA needs at least {MIN_SAMPLES} samples, got {n}")
        norms_dot = self.norm_gram[k1, k2]
        trace = (cross * cross).sum() - norms_dot
        sum_k = s1 @ s1 - self.norm_sums[k1]
        sum_l = s2 @ s2 - self.norm_sums[k2]
        row_dot = s1 @ cross @ s2 - s1 @ self.norm_cross[k1][:, k2] - self.norm_cross[k2][:, k1] @ s2 + norms_dot
        value = trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * row_dot
        return float(value / (n * (n - 3)))

    def matrix(self, debiased: bool = True) -> np.ndarray:
        """(L, L') CKA of every layer of A against every layer of B (or of A, for self-CKA)."""
        cols = range(self.la) if self.same else range(self.la, len(self.dims))
        own = {k: self.hsic(k, k, debiased) for k in range(len(self.dims))}
        out = np.empty((self.la, len(cols)))
        for i in range(self.la):
            for c, j in enumerate(cols):
                if self.same and j < i:
                    out[i, c] = out[c, i]
                    continue
                out[i, c] = _ratio(self.hsic(i, j, debiased), own[i], own[j])
        return out


def _ratio(cross: float, own_a: float, own_b: float) -> float:
    denom = np.sqrt(own_a * own_b) if own_a > 0 and own_b > 0 else 0.0
    return float(cross / denom) if denom > 0 else float("nan")  # a constant layer has no CKA


def unbiased_hsic_matrix(grams_a: torch.Tensor, grams_b: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) of every gram in ``grams_a`` (L, n, n) against every one in ``grams_b``."""
    n = grams_a.shape[-1]
    ka, kb = _zero_diagonal(grams_a), _zero_diagonal(grams_b)
    trace = ka.reshape(len(ka), -1) @ kb.reshape(len(kb), -1).T
    sums = torch.outer(ka.sum((1, 2)), kb.sum((1, 2)))
    rows = ka.sum(2) @ kb.sum(2).T
    return (trace + sums / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rows) / (n * (n - 3))


def _zero_diagonal(grams: torch.Tensor) -> torch.Tensor:
    out = grams.clone()
    out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


class MinibatchCka:
    """Nguyen et al.'s estimator: unbiased HSIC summed over minibatches, then the ratio of the sums."""

    def __init__(self, layers_a: int, layers_b: int | None = None, device: torch.device | None = None):
        self.same = layers_b is None
        self.device = device or torch.device("cpu")
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.cross = zeros(layers_a, layers_a if self.same else layers_b)
        self.own_a = zeros(layers_a)
        self.own_b = self.own_a if self.same else zeros(layers_b)
        self.batches = 0

    def _grams(self, batch: Sequence[np.ndarray]) -> torch.Tensor:
        # one gram per layer per batch, reused for every pair; each layer goes to float64 on its own (token maps).
        # Unbiased HSIC is exactly invariant to a constant shift, so centring the batch only removes cancellation.
        grams = []
        for x in batch:
            t = torch.as_tensor(np.asarray(x)).to(self.device, torch.float64)
            t = t - t.mean(0)
            grams.append(t @ t.T)
        return torch.stack(grams)

    def update(self, batch_a: Sequence[np.ndarray], batch_b: Sequence[np.ndarray] | None = None) -> None:
        if len(batch_a[0]) < MIN_SAMPLES:
            raise FmcacheError(f"a CKA minibatch needs at least {MIN_SAMPLES} samples, got {len(batch_a[0])}")
        grams_a = self._grams(batch_a)
        grams_b = grams_a if self.same else self._grams(batch_b)
        cross = unbiased_hsic_matrix(grams_a, grams_b)
        self.cross += cross
        self.own_a += cross.diagonal() if self.same else unbiased_hsic_matrix(grams_a, grams_a).diagonal()
        if not self.same:
            self.own_b += unbiased_hsic_matrix(grams_b, grams_b).diagonal()
        self.batches += 1

    def matrix(self) -> np.ndarray:
        cross, own_a, own_b = (t.cpu().numpy() for t in (self.cross, self.own_a, self.own_b))
        out = np.empty(cross.shape)
        for i in range(cross.shape[0]):
            for j in range(cross.shape[1]):
                out[i, j] = _ratio(cross[i, j], own_a[i], own_b[j])
        return out


# -- arrays and caches ----------------------------------------------------------------------------------------------


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Exact linear CKA of two (n, p) and (n, q) feature arrays (Kornblith's ``feature_space_linear_cka``)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise FmcacheError(f"CKA needs two (n, d) arrays with the same n, got {x.shape} and {y.shape}")
    acc = ExactCka([x.shape[1]], [y.shape[1]])
    acc.update([x], [y])
    return float(acc.matrix(debiased)[0, 0])


def compute_cka(
    a: Selection,
    b: Selection | None,
    split: str = "test",
    estimator: str = "exact",
    debiased: bool = True,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> dict:
    """CKA of every selected layer of ``a`` against every one of ``b`` (of ``a`` when ``b`` is None), in one pass.

    Returns ``matrix`` (L, L'), ``n``, ``batches`` (minibatch) and ``timings`` (read and compute seconds).
    """
    if estimator not in CKA_ESTIMATORS:
        raise FmcacheError(f"unknown --estimator '{estimator}'; use {' or '.join(CKA_ESTIMATORS)}")
    if estimator == "minibatch" and not debiased:
        raise FmcacheError(
            "the minibatch estimator sums unbiased HSIC (Nguyen et al. 2021); --biased needs --estimator exact"
        )
    ids, masks_a, masks_b = aligned_ids(a, b, split)
    device = device or torch.device("cpu")
    dims_b = None if b is None else b.widths
    if estimator == "exact":
        acc = ExactCka(a.widths, dims_b, device)
        stream = paired_blocks(a, b, masks_a, masks_b)
    else:
        batch_bounds(len(ids), batch_size)  # rejects a bad batch size before any reading
        acc = MinibatchCka(len(a.layers), None if b is None else len(b.layers), device)
        stream = rebatch(paired_blocks(a, b, masks_a, masks_b), len(ids), batch_size)
    read_s = compute_s = 0.0
    start = time.perf_counter()
    for block_a, block_b in stream:
        got = time.perf_counter()
        read_s += got - start
        acc.update(block_a, block_b)
        synchronize(device)
        start = time.perf_counter()
        compute_s += start - got
    matrix = acc.matrix(debiased) if estimator == "exact" else acc.matrix()
    if estimator == "exact" and acc.n != len(ids):
        raise FmcacheError(f"read {acc.n} of {len(ids)} samples from the shards; run `fmcache verify` on the cache")
    out = {"matrix": matrix, "n": len(ids), "timings": {"read_seconds": read_s, "compute_seconds": compute_s}}
    if estimator == "minibatch":
        out["batches"] = acc.batches
    return out
