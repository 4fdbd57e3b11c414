"""The dataset index: one immutable list of images with labels and a split, shared by every stage.

Every loader returns a :class:`DatasetIndex`. Its order is canonical (sorted by the dataset's own id or path),
so caches of different models align sample by sample. The split is a pure function of the files on disk and the
split options (see :mod:`fmcache.data.splits`; the seed's split follows the label CSV's row order).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
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

    def select(self, keep: np.ndarray, **split_info_extra: object) -> DatasetIndex:
        """A new index with only the samples at the sorted global indices ``keep``."""
        keep = np.asarray(keep, dtype=np.int64)
        return replace(
            self,
            paths=tuple(self.paths[i] for i in keep),
            labels=self.labels[keep],
            split=self.split[keep],
            split_info={**self.split_info, **split_info_extra},
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
) -> DatasetIndex:
    """Assemble a :class:`DatasetIndex`, adding a problem line for every empty split."""
    split = np.asarray(split, dtype=np.int8)
    extra = [f"the {s} split is empty" for code, s in enumerate(SPLITS) if not np.any(split == code)]
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
    )


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
