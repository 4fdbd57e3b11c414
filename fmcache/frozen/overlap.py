"""Leakage between a source result's train/val samples and a transfer target's samples, found three ways.

- **ids**: both datasets name their images in one namespace (ISIC's ``ISIC_00xxxxx`` for ISIC 2019 and HAM10000, or
  a dataset and itself): a target sample whose ``image_id`` the source trained or selected on is the same image.
- **exact pixels**: equal ``content_sha256`` (the sha256 digest of the decoded, transformed input the cache was made
  from), so a lossless re-encoding or a copy under another name is caught whatever the ids say.
- **near duplicates**: ``content_dhash`` (a 256-bit difference hash packed into 32 bytes) within ``max_bits`` bits: a
  lossy re-encoding, a resize or a mild intensity change flips few bits.

Near duplicates are found without comparing every pair. The 256 bits are cut into 16 bands of 16 bits; a pair within
``d`` bits differs in at most ``d`` bands, so for ``d <= 15`` it agrees exactly on at least ``16 - d`` of them (6 at
the default 10) and in particular on one: every such pair is a candidate of some band (none is missed), and each
candidate is then verified by its exact Hamming distance. Identical hashes are collapsed first (a data set's blank or
constant images would otherwise be every band's candidates at once), and candidates are verified in fixed-size
blocks, so memory stays bounded at any size (200k × 400k hashes: about 20 million candidates for uniform hashes).

Plain numpy: the transfer runner reads the arrays from the caches (``CacheReader.fingerprints``, written by the
extraction; :mod:`fmcache.frozen.transfer`).
"""

from __future__ import annotations

import numpy as np

from fmcache.errors import FmcacheError

HASH_BYTES = 32  # 256 bits
BANDS = 16
MAX_NEAR_BITS = BANDS - 1  # pigeonhole: within 15 bits a pair still agrees exactly on one of the 16 bands
DEFAULT_NEAR_BITS = 10
_BLOCK = 1 << 21  # candidate pairs verified at once (each gathers 2 × 32 bytes)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_MISSING_IDS = ("", "nan", "none")


def id_overlap(source_ids: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
    """Per target sample: does the source hold its image id (blank ids, a missing value, match nothing)."""
    source = np.asarray(source_ids).astype(str)
    target = np.asarray(target_ids).astype(str)
    known = ~np.isin(np.char.lower(target), _MISSING_IDS)
    return known & np.isin(target, source[~np.isin(np.char.lower(source), _MISSING_IDS)])


def exact_overlap(source_sha256: np.ndarray, target_sha256: np.ndarray) -> np.ndarray:
    """Per target sample: does a source sample have the same pixel hash ((n, 32) uint8 digests, or hex text)."""
    return np.isin(_digest_keys(target_sha256), _digest_keys(source_sha256))


def _digest_keys(digests: np.ndarray) -> np.ndarray:
    """One comparable value per sample: a digest's 32 bytes as one opaque item, or the hex text as it is."""
    digests = np.asarray(digests)
    if digests.ndim == 2 and digests.dtype == np.uint8:
        return np.ascontiguousarray(digests).view(np.dtype((np.void, digests.shape[1]))).ravel()
    return digests.astype(str)


def _check_hashes(hashes: np.ndarray, side: str) -> np.ndarray:
    hashes = np.asarray(hashes)
    if hashes.ndim != 2 or hashes.shape[1] != HASH_BYTES or hashes.dtype != np.uint8:
        raise FmcacheError(
            f"{side} content_dhash must be (n, {HASH_BYTES}) uint8 (a packed 256-bit hash), got {hashes.shape} "
            f"{hashes.dtype}"
        )
    return np.ascontiguousarray(hashes)


def check_near_bits(max_bits: int) -> int:
    if isinstance(max_bits, bool) or not isinstance(max_bits, (int, np.integer)) or not 0 <= max_bits <= MAX_NEAR_BITS:
        raise FmcacheError(
            f"--near-duplicate-bits must be an integer in 0..{MAX_NEAR_BITS} ({BANDS} bands of 16 bits find every "
            f"pair within {MAX_NEAR_BITS} bits), got {max_bits!r}"
        )
    return int(max_bits)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between rows of packed hashes ``a`` and ``b`` (same shape (n, 32))."""
    xor = np.bitwise_xor(a, b)
    if hasattr(np, "bitwise_count"):  # numpy >= 2: one popcount per 64-bit word
        return np.bitwise_count(xor.view(np.uint64)).sum(axis=1, dtype=np.int64)
    return _POPCOUNT[xor].sum(axis=1, dtype=np.int64)


def near_duplicates(source: np.ndarray, target: np.ndarray, max_bits: int = DEFAULT_NEAR_BITS) -> np.ndarray:
    """Per target hash: is some source hash within ``max_bits`` bits (Hamming distance); see the module doc."""
    max_bits = check_near_bits(max_bits)
    source, target = _check_hashes(source, "source"), _check_hashes(target, "target")
    found_per_target = np.zeros(len(target), bool)
    if not len(source) or not len(target):
        return found_per_target
    source = np.unique(source, axis=0)
    target_unique, back = np.unique(target, axis=0, return_inverse=True)
    found = np.zeros(len(target_unique), bool)
    source_bands = source.view(np.uint16)  # (n, 16): two bytes per band
    target_bands = target_unique.view(np.uint16)
    for band in range(BANDS):
        todo = np.flatnonzero(~found)  # a target found in an earlier band needs no more candidates
        if not todo.size:
            break
        # the sources of each 16-bit value are a run of ``order``: where it starts and how long it is, by value
        order = np.argsort(source_bands[:, band], kind="stable")
        per_value = np.bincount(source_bands[:, band], minlength=1 << 16)
        value = target_bands[todo, band]
        counts = per_value[value]
        lo = (np.cumsum(per_value) - per_value)[value]
        ends = np.cumsum(counts)
        # candidate pair p (0 <= p < ends[-1]) is target todo[t] with the (p - start of t)-th source of its band value
        for first in range(0, int(ends[-1]), _BLOCK):
            pairs = np.arange(first, min(first + _BLOCK, int(ends[-1])))
            t = np.searchsorted(ends, pairs, "right")
            s = order[lo[t] + pairs - (ends[t] - counts[t])]
            close = hamming(source[s], target_unique[todo[t]]) <= max_bits
            found[todo[t[close]]] = True
    found_per_target[:] = found[back.reshape(-1)]
    return found_per_target
