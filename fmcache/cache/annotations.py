"""A cache's per-sample annotations: ``annotations.npz`` beside the shards, written once at extraction.

It holds what the release says about each cached sample, before any label policy, so stage two can choose the policy
(``--uncertain``) and the report can resample at the right unit and break results down by subgroup, all without
extracting again:

- ``ids`` (n,) int64: the samples' global ids (the shards' ``ids``), ``split`` (n,) int8;
- ``raw_labels`` (n, K): the label columns as released (float32, NaN = blank; or text), when the dataset has them;
- ``groups`` (n,) text: each sample's independent unit (``patient:00012``; ``image:<id>`` where none is known);
- ``meta__<column>`` (n,): per-sample metadata (text, or float64 with NaN = missing).

The manifest's ``annotations`` entry names the file, its sha256 (``fmcache verify`` checks it), the raw label columns,
the group unit, the metadata columns and the label policy the raw labels take (``uncertainty`` for CheXpert-style
observations). The cache format knows no dataset: the extractor hands the arrays over.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes
from fmcache.results import npz_bytes

ANNOTATIONS = "annotations.npz"
META = "meta__"


def write_annotations(folder: Path, arrays: Mapping[str, np.ndarray], facts: Mapping) -> dict:
    """Write ``annotations.npz`` (deterministic bytes) and return the manifest's ``annotations`` entry."""
    data = npz_bytes(arrays)
    atomic_write_bytes(Path(folder) / ANNOTATIONS, data)
    return {"file": ANNOTATIONS, "sha256": hashlib.sha256(data).hexdigest(), **facts}


def check_annotations(folder: Path, entry: Mapping) -> bytes:
    """The file's bytes, checked against the manifest's sha256; a missing or changed file is one line naming it."""
    path = Path(folder) / entry["file"]
    try:
        data = path.read_bytes()
    except OSError:
        raise FmcacheError(f"{path} is missing; rerun the same `fmcache extract` to write it again") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise FmcacheError(f"{path} does not match the sha256 the manifest records; rerun the same `fmcache extract`")
    return data


def read_annotations(folder: Path, entry: Mapping) -> dict[str, np.ndarray]:
    """The arrays of a cache's ``annotations.npz`` (checked)."""
    with np.load(io.BytesIO(check_annotations(folder, entry)), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
