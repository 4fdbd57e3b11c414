"""The dataset index: one immutable list of images with labels and a split, shared by every stage.

Every loader returns a :class:`DatasetIndex`. Its order is canonical (sorted by the dataset's own id or path),
so caches of different models align sample by sample. The split is a pure function of the files on disk and the
split options (see :mod:`fmcache.data.splits`; the seed's split follows the label CSV's row order).

Besides the labels a task trains on, an index carries what the release says about each image: ``raw_labels``
(the label columns as released, before any label policy) and ``metadata`` (patient, lesion, view, age, ...), with
``group_unit`` naming the metadata column that is the independent unit for bootstrap and grouped splits. These
never enter :meth:`DatasetIndex.labels_fingerprint` (every cache key hangs on it); they have their own
:meth:`DatasetIndex.annotations_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fmcache.errors import FmcacheError

SPLITS: tuple[str, ...] = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2


def split_code(split: str) -> int:
    """Integer code of a split name (train=0, val=1, test=2)."""
    if split not in SPLITS:
        raise FmcacheError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return SPLITS.index(split)


@dataclass(frozen=True, eq=False)
class DatasetIndex:
    """Images of one dataset with their labels and split, in canonical order.

    ``labels`` is int64 ``(N,)`` for single-label data and float32 ``(N, C)`` for multi-label data, where NaN
    marks an unknown label that metrics and losses must ignore. ``split`` holds 0/1/2 for train/val/test.
    ``split_info`` and ``options`` are JSON-able and, with :meth:`fingerprint`, identify the data for a cache.

    ``metadata`` maps a column name to one value per sample: text columns are numpy unicode arrays (``""`` when
    the release leaves the cell blank), number columns float64 (NaN when blank). ``raw_labels`` is ``(N, K)``
    with ``raw_label_names`` naming the K columns as released: float32 (NaN = blank cell) or unicode (categorical
    releases, several values of one merged sample joined by ``"|"``); None when the loader has none.
    ``group_unit`` names the metadata column whose values are the independent units (patient, lesion); None means
    every image is its own unit (see :meth:`groups`). All arrays are read-only.
    """

    name: str
    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray
    split: np.ndarray
    class_names: tuple[str, ...]
    multilabel: bool
    split_info: dict
    options: dict
    problems: tuple[str, ...] = ()
    metadata: dict[str, np.ndarray] = field(default_factory=dict)
    raw_labels: np.ndarray | None = None
    raw_label_names: tuple[str, ...] = ()
    group_unit: str | None = None

    def __post_init__(self) -> None:
        # Loaders pass lists; freeze them here so every index has the documented types.
        object.__setattr__(self, "paths", tuple(p if isinstance(p, Path) else Path(p) for p in self.paths))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "problems", tuple(self.problems))
        dtype = np.float32 if self.multilabel else np.int64
        object.__setattr__(self, "labels", np.ascontiguousarray(self.labels, dtype=dtype))
        object.__setattr__(self, "split", np.ascontiguousarray(self.split, dtype=np.int8))
        n = len(self.paths)
        assert self.split.shape == (n,), "split must have one entry per path"
        assert self.labels.shape[0] == n, "labels must have one row per path"
        assert self.labels.ndim == (2 if self.multilabel else 1), "labels rank does not match multilabel"
        self._freeze_annotations(n)

    def _freeze_annotations(self, n: int) -> None:
        """Metadata columns and raw labels as read-only arrays of the documented types, checked against ``n``."""
        object.__setattr__(self, "metadata", {str(k): _column(v, n, k) for k, v in self.metadata.items()})
        object.__setattr__(self, "raw_label_names", tuple(str(c) for c in self.raw_label_names))
        if self.raw_labels is not None:
            object.__setattr__(self, "raw_labels", _raw_table(self.raw_labels, n, len(self.raw_label_names)))
        if self.group_unit is not None:
            unit = self.metadata.get(self.group_unit)
            assert unit is not None and unit.dtype.kind == "U", "group_unit must name a text metadata column"

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of classes (single-label) or label columns (multi-label)."""
        return len(self.class_names)

    def indices(self, split: str) -> np.ndarray:
        """Sorted global indices (int64) of the samples in ``split`` ("train", "val" or "test")."""
        return np.flatnonzero(self.split == split_code(split)).astype(np.int64)

    def relative(self, path: Path) -> str:
        """``path`` relative to the root as a POSIX string; absolute when it lies outside the root."""
        # String slicing, not Path.relative_to: fingerprint() calls this for every image (224k for CheXpert).
        text, prefix = str(path), str(self.root).rstrip(os.sep) + os.sep
        rel = text[len(prefix) :] if text.startswith(prefix) else text
        return rel.replace(os.sep, "/")

    def fingerprint(self) -> str:
        """sha256 hex over (relative path, size, mtime_ns) of every image, in index order.

        Any added, removed, replaced or touched image changes it. Labels are covered by
        :meth:`labels_fingerprint`.
        """
        digest = hashlib.sha256()
        for path in self.paths:
            try:
                stat = os.stat(path)
            except OSError as exc:
                raise FmcacheError(
                    f"cannot fingerprint dataset {self.name}: {path} is not readable ({exc.strerror}); "
                    "restore the file or reload the dataset"
                ) from exc
            digest.update(f"{self.relative(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def labels_fingerprint(self) -> str:
        """sha256 hex over the labels, split, class names, split_info and options (not the image files)."""
        meta = {
            "name": self.name,
            "class_names": list(self.class_names),
            "multilabel": self.multilabel,
            "split_info": self.split_info,
            "options": self.options,
        }
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        digest.update(self.labels.tobytes())
        digest.update(self.split.tobytes())
        return digest.hexdigest()

    def annotations_fingerprint(self) -> str:
        """sha256 hex over the raw labels, the metadata columns and the group unit (not in any cache key yet)."""
        digest = hashlib.sha256(json.dumps([list(self.raw_label_names), self.group_unit]).encode())
        if self.raw_labels is not None:
            digest.update(f"raw\t{self.raw_labels.dtype.str}\n".encode())
            digest.update(self.raw_labels.tobytes())
        for name in sorted(self.metadata):
            digest.update(f"column\t{name}\t{self.metadata[name].dtype.str}\n".encode())
            digest.update(self.metadata[name].tobytes())
        return digest.hexdigest()

    def groups(self) -> np.ndarray:
        """The independent unit of every sample (unicode array): its ``group_unit`` value, or ``image:<i>`` when
        the dataset has no unit or the sample's cell is blank, so every sample belongs to exactly one group."""
        return group_keys(self.metadata.get(self.group_unit) if self.group_unit else None, len(self), self.group_unit)

    def select(self, keep: np.ndarray, **split_info_extra: object) -> DatasetIndex:
        """A new index with only the samples at the sorted global indices ``keep`` (metadata and raw labels too)."""
        keep = np.asarray(keep, dtype=np.int64)
        return replace(
            self,
            paths=tuple(self.paths[i] for i in keep),
            labels=self.labels[keep],
            split=self.split[keep],
            split_info={**self.split_info, **split_info_extra},
            metadata={name: column[keep] for name, column in self.metadata.items()},
            raw_labels=None if self.raw_labels is None else self.raw_labels[keep],
        )

    def subset(self, limit: int) -> DatasetIndex:
        """The first ``limit`` samples of each split (by global order), for quick looks and smoke tests.

        The limit is recorded in ``split_info["subset_limit"]`` so a cache of a subset never passes for a cache
        of the whole dataset.
        """
        if isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1:
            raise FmcacheError(f"subset limit must be a positive integer, got {limit!r}")
        keep = np.sort(np.concatenate([self.indices(s)[:limit] for s in SPLITS]))
        return self.select(keep, subset_limit=int(limit))


def build_index(
    *,
    name: str,
    root: Path,
    paths: Sequence[Path],
    labels: np.ndarray,
    split: np.ndarray,
    class_names: Sequence[str],
    multilabel: bool,
    split_info: dict,
    options: dict | None = None,
    problems: Sequence[str] = (),
    metadata: dict[str, np.ndarray] | None = None,
    raw_labels: np.ndarray | None = None,
    raw_label_names: Sequence[str] = (),
    group_unit: str | None = None,
) -> DatasetIndex:
    """Assemble a :class:`DatasetIndex`, adding a problem line for every empty split.

    An external evaluation set (``split_info["mode"] == "external"``: every sample is test by design) gets one
    line saying so instead of the empty train and val lines.
    """
    split = np.asarray(split, dtype=np.int8)
    extra = [f"the {s} split is empty" for code, s in enumerate(SPLITS) if not np.any(split == code)]
    if split_info.get("mode") == "external":
        extra = [EXTERNAL_NOTE]
    return DatasetIndex(
        name=name,
        root=root,
        paths=tuple(paths),
        labels=labels,
        split=split,
        class_names=tuple(class_names),
        multilabel=multilabel,
        split_info=split_info,
        options=options or {},
        problems=(*problems, *extra),
        metadata=metadata or {},
        raw_labels=raw_labels,
        raw_label_names=tuple(raw_label_names),
        group_unit=group_unit,
    )


def group_keys(values: np.ndarray | None, n: int, unit: str | None) -> np.ndarray:
    """The unit key of each of ``n`` samples: ``<unit>:<value>``, or ``image:<i>`` where ``values`` is None or
    blank (see :meth:`DatasetIndex.groups`)."""
    own = np.char.add("image:", np.arange(n).astype(str))
    if values is None:
        return own
    # The prefix keeps a unit value from ever equalling an image key.
    return np.where(values == "", own, np.char.add(f"{unit}:", values))


EXTERNAL_NOTE = (
    "external evaluation set: every sample is test (split='external'); train on another dataset, or pass "
    "split='random' (or 'official' where the release has one) to split this one"
)


def _column(values: object, n: int, name: object) -> np.ndarray:
    """One metadata column as a read-only unicode or float64 array of length ``n``."""
    array = np.asarray(values)
    if array.dtype.kind in "biuf":
        array = array.astype(np.float64)
    elif array.dtype.kind != "U":  # object or bytes: text, with None as blank
        array = np.array(["" if v is None else str(v) for v in array.ravel()], dtype=str).reshape(array.shape)
    assert array.shape == (n,), f"metadata column {name!r} must hold one value per sample"
    array.setflags(write=False)
    return array


def _raw_table(values: np.ndarray, n: int, k: int) -> np.ndarray:
    """Raw labels as a read-only (n, k) float32 or unicode array."""
    array = np.asarray(values)
    array = array.astype(np.float32) if array.dtype.kind in "biuf" else array.astype(str)
    assert array.shape == (n, k), "raw_labels must be (samples, raw_label_names)"
    array.setflags(write=False)
    return array


# ---------------------------------------------------------------------------------------------------------
# Splits


def split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Sizes of train/val/test for ``n`` samples: val and test rounded half up, train takes the rest."""
    n_val = int(n * fractions[1] + 0.5)
    n_test = min(int(n * fractions[2] + 0.5), n - n_val)
    return n - n_val - n_test, n_val, n_test


def random_split(n: int, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split codes (int8) for ``n`` samples in canonical order.

    A private ``np.random.RandomState(seed)`` permutation (a stream numpy keeps stable across versions, and
    independent of any global RNG state) assigns its first positions to train, the next to val, the rest to test.
    """
    n_train, n_val, _ = split_counts(n, fractions)
    order = np.random.RandomState(seed).permutation(n)
    codes = np.full(n, TEST, dtype=np.int8)
    codes[order[:n_train]] = TRAIN
    codes[order[n_train : n_train + n_val]] = VAL
    return codes


def check_fractions(value: object, option: str = "fractions") -> tuple[float, float, float]:
    """Validate train/val/test fractions given as three numbers or a "0.8,0.1,0.1" string."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        fractions = tuple(float(v) for v in items)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        fractions = ()
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise FmcacheError(
            f"{option} must be three non-negative numbers (train, val, test) summing to 1, got {value!r}"
        )
    return fractions  # type: ignore[return-value]


def check_seed(value: object) -> int:
    """Validate a split seed (a non-negative integer)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise FmcacheError(f"split seed must be a non-negative integer, got {value!r}")
    return int(value)


def check_choice(value: object, choices: Sequence[str], option: str, dataset: str) -> str:
    """Validate an option that takes one of a few strings."""
    if value not in choices:
        raise FmcacheError(f"{dataset}: option {option}={value!r} is not valid; choose one of {', '.join(choices)}")
    return str(value)


def random_split_info(seed: int, fractions: Sequence[float], order: str) -> dict:
    """``split_info`` for a seeded random split over the canonical order described by ``order``."""
    return {"mode": "random", "seed": seed, "fractions": [float(f) for f in fractions], "order": order}
