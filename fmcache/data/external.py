"""What the external-validation loaders share: their split modes and finding images by file name.

External datasets are evaluation sets for models trained on a paper dataset with the same task (transfer), so
their default split is ``external``: every sample is test. ``random`` splits them by ``fractions`` of their
independent units (patients, lesions, exams; images where the release has none), so no unit crosses splits;
``official`` (where the release has a train/test split) keeps it and moves ``val_fraction`` of the train units
to val, and ``file:FILE.csv`` reads an exported split, as for every loader.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from fmcache.data._io import SHOW_MISSING
from fmcache.data.index import TEST, TRAIN, VAL, DatasetIndex, build_index, check_fractions, check_seed, group_keys
from fmcache.data.splits import apply_split_file, group_split, parse_split
from fmcache.errors import FmcacheError

EXTERNAL = "external"


def parse_external_split(split: object, dataset: str, official: bool) -> tuple[str, Path | None]:
    """(mode, split file) of an external dataset's ``split`` option; "official" only where the release has one."""
    modes = (EXTERNAL, "random", "official") if official else (EXTERNAL, "random")
    return parse_split(split, modes, dataset)


def check_val_fraction(value: object, dataset: str) -> float:
    """A fraction in [0, 1) of the official train units that goes to val."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise FmcacheError(f"{dataset}: val_fraction must be a number in [0, 1), got {value!r}")
    return float(value)


def external_split(
    mode: str,
    groups: np.ndarray,
    *,
    order: str,
    unit: str | None,
    seed: object = 42,
    fractions: object = (0.8, 0.1, 0.1),
    official: np.ndarray | None = None,
    val_fraction: float = 0.1,
) -> tuple[np.ndarray, dict, list[str]]:
    """Split codes, ``split_info`` and problem lines for an external dataset (see the module docstring).

    ``groups`` holds each sample's unit (:meth:`DatasetIndex.groups` semantics: one key per sample); ``unit``
    names it for split_info (None: images). ``official`` holds the release's codes for mode "official".
    """
    seed, fractions = check_seed(seed), check_fractions(fractions)
    unit = unit or "image"
    if mode in (EXTERNAL, "file"):  # "file": replaced by the file's split afterwards
        return np.full(len(groups), TEST, dtype=np.int8), {"mode": EXTERNAL, "order": order}, []
    if mode == "random":
        info = {"mode": "random", "seed": seed, "fractions": list(fractions), "unit": unit, "order": order}
        return group_split(list(groups), fractions, seed), info, []
    if mode == "official" and official is not None:
        codes, problems = official_with_val(official, groups, val_fraction, seed, unit)
        info: dict = {"mode": "official", "unit": unit, "order": order}
        # A release with its own val split keeps it; otherwise val_fraction of its train units become val.
        info.update({"val": "release"} if np.any(official == VAL) else {"seed": seed, "val_fraction": val_fraction})
        return codes, info, problems
    raise FmcacheError(f"split mode {mode!r} is not available for this dataset; use external or random")


def external_index(
    *,
    mode: str,
    split_file: Path | None,
    order: str,
    seed: object = 42,
    fractions: object = (0.8, 0.1, 0.1),
    official: np.ndarray | None = None,
    val_fraction: float = 0.1,
    task: str | None = None,
    problems: Sequence[str] = (),
    **fields: object,
) -> DatasetIndex:
    """Build an external dataset's index: ``fields`` are :func:`build_index`'s (less split, split_info and
    problems), the rest :func:`external_split`'s; ``task`` (how labels were derived) goes into split_info."""
    unit = fields.get("group_unit")
    metadata: dict = fields.get("metadata") or {}  # type: ignore[assignment]
    groups = group_keys(metadata.get(unit) if unit else None, len(fields["paths"]), unit)  # type: ignore[arg-type]
    codes, info, notes = external_split(
        mode,
        groups,
        order=order,
        unit=unit,
        seed=seed,
        fractions=fractions,
        official=official,
        val_fraction=val_fraction,
    )
    if task:
        info["task"] = task
    index = build_index(split=codes, split_info=info, problems=[*problems, *notes], **fields)  # type: ignore[arg-type]
    return apply_split_file(index, split_file) if split_file else index


def official_with_val(
    official: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int, unit: str = "unit"
) -> tuple[np.ndarray, list[str]]:
    """The release's train/test codes with ``val_fraction`` of the train units moved to val.

    A unit with any official test sample goes to test entirely (the official test set keeps every sample it
    had, and nothing trained on is tested). A release that has its own val split keeps it as is.
    """
    codes = np.asarray(official, dtype=np.int8).copy()
    in_test = np.isin(groups, np.unique(groups[codes == TEST]))
    moved = int(np.sum(in_test & (codes != TEST)))
    codes[in_test] = TEST
    problems = (
        [f"{moved} official train sample(s) share their {unit} with the test set: moved to test"] if moved else []
    )
    if np.any(official == VAL):
        return codes, problems
    train_units = np.unique(groups[codes == TRAIN])
    n_val = int(len(train_units) * val_fraction + 0.5)
    chosen = train_units[np.random.RandomState(seed).permutation(len(train_units))[:n_val]]
    codes[(codes == TRAIN) & np.isin(groups, chosen)] = VAL
    return codes, problems


class FileTable:
    """Every file below some folders, found by name (case-insensitively as a reported fallback).

    Releases ship images in several folders (``imgs_part_1/``, ``images_001/images/``) and their label files
    name images without a folder; this resolves those names. A name present twice is an error, since either
    file could be the one the labels mean.
    """

    def __init__(self, folders: Iterable[Path], suffixes: Sequence[str], dataset: str) -> None:
        self.dataset = dataset
        self.by_name: dict[str, Path] = {}
        for folder in folders:
            for path in _walk(folder, tuple(s.lower() for s in suffixes)):
                self._add(path)
        self.by_lower: dict[str, Path | None] = {}
        for name, path in self.by_name.items():
            # None marks a lower-case name shared by two files: no fallback for it.
            self.by_lower[name.lower()] = None if name.lower() in self.by_lower else path
        self.casefolded = 0

    def _add(self, path: Path) -> None:
        other = self.by_name.setdefault(path.name, path)
        if other != path:
            raise FmcacheError(f"{self.dataset}: image {path.name} exists twice ({other} and {path}); keep one copy")

    def find(self, name: str) -> Path | None:
        """The file called ``name``, or the only one whose name matches it case-insensitively, or None."""
        path = self.by_name.get(name)
        if path is None and self.by_lower.get(name.lower()) is not None:
            self.casefolded += 1
            return self.by_lower[name.lower()]
        return path

    def resolve(self, names: Sequence[str], source: str, hint: str) -> tuple[list[Path], list[str]]:
        """The file of every name and problem lines; missing files are one error naming the first few."""
        found = [self.find(n) for n in names]
        missing = [n for n, p in zip(names, found, strict=True) if p is None]
        if missing:
            raise FmcacheError(
                f"{self.dataset}: {len(missing)} of {len(names)} images listed in {source} are missing "
                f"(e.g. {', '.join(missing[:SHOW_MISSING])}); {hint}"
            )
        problems = []
        if self.casefolded:
            problems.append(f"{self.casefolded} image name(s) matched only ignoring case (e.g. .JPG for .jpg)")
        return [p for p in found if p is not None], problems

    def unlisted(self, names: Iterable[str]) -> int:
        """How many files the table holds that ``names`` do not mention (exactly or ignoring case)."""
        wanted = {n.lower() for n in names}
        return sum(1 for name in self.by_name if name.lower() not in wanted)


def _walk(folder: Path, suffixes: tuple[str, ...]) -> Iterable[Path]:
    # os.walk, not Path.rglob: ChestX-ray14 has 112k files and this runs before every load.
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(suffixes) and not name.startswith("."):
                yield Path(parent) / name


def existing(folders: Iterable[Path]) -> list[Path]:
    """The folders that exist, in order."""
    return [f for f in folders if f.is_dir()]
