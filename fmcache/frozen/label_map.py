"""Label maps: which of a source result's classes score each class of a transfer target.

A map is a YAML document (``configs/label_maps/<source>_to_<target>.yaml`` ship one per registered pair;
``fmcache label-map SOURCE TARGET`` prints it)::

    source: isic2019          # the dataset the heads were trained on
    target: pad_ufes20        # the dataset they are applied to
    classes:                  # target class: [the source classes whose scores it takes]
      ACK: [AK]
      SEK: [BKL]

A target class the map leaves out is dropped (its samples, or for multi-label data its label column); a source class
no target class takes is unused. Scores (:meth:`CheckedMap.scores`):

- single-label: the source's class probabilities (softmax; k-NN's vote shares); a target class's score is the sum of
  its source classes' probabilities, renormalised over the mapped source classes (the probability of the class given
  that the sample is one of the mapped classes); a class with one source class takes its probability as it is, and
  with every source class mapped the sums need no renormalisation;
- multi-label: each target label gets its source label's score (sigmoid; k-NN's vote share), the largest if it
  names several.

Every name is checked against both caches' class names, each problem on its own line, before anything is computed.
This module is light (YAML and numpy): the CLI and the registry's shipped maps share it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmcache.errors import FmcacheError

MAP_KEYS = ("source", "target", "classes")


@dataclass(frozen=True)
class LabelMap:
    """A parsed map: dataset names and, per target class (in the document's order), its source classes."""

    source: str
    target: str
    classes: dict[str, tuple[str, ...]]
    origin: str  # where it came from, for messages and the result: a file, the registry, or the identity

    def document(self) -> dict:
        """The YAML document form (what a result's settings record, so a changed map gets its own folder)."""
        return {"source": self.source, "target": self.target, "classes": {t: list(s) for t, s in self.classes.items()}}


@dataclass(frozen=True)
class DatasetFacts:
    """What the dataset registry knows that a transfer needs (stage two reads no registry; the runner binding passes
    it): the shipped map of each (source, target) pair, as documents, and each dataset's image-id namespace."""

    maps: Mapping[tuple[str, str], Mapping] = field(default_factory=dict)
    namespaces: Mapping[str, str | None] = field(default_factory=dict)

    def namespace(self, dataset: str) -> str:
        """The namespace of a dataset's ``image_id`` values: the registry's, else the dataset's own (a dataset always
        shares ids with itself)."""
        return self.namespaces.get(dataset) or dataset


def parse_map(document: object, origin: str) -> LabelMap:
    """A map document (YAML's mapping) as a :class:`LabelMap`; a malformed one is one line naming ``origin``."""
    if not isinstance(document, Mapping):
        raise FmcacheError(f"label map {origin} must be a mapping with {', '.join(MAP_KEYS)}")
    unknown = sorted(str(k) for k in document if k not in MAP_KEYS)
    if unknown or any(k not in document for k in MAP_KEYS):
        raise FmcacheError(
            f"label map {origin} must have exactly the keys {', '.join(MAP_KEYS)} (e.g. `source: isic2019`, "
            f"`target: pad_ufes20`, `classes: {{ACK: [AK]}}`); found {', '.join(map(str, document)) or 'none'}"
        )
    classes = document["classes"]
    if not isinstance(classes, Mapping) or not classes:
        raise FmcacheError(f"label map {origin}: 'classes' must map each target class to a list of source classes")
    parsed: dict[str, tuple[str, ...]] = {}
    for target, sources in classes.items():
        sources = [sources] if isinstance(sources, str) else sources
        if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
            raise FmcacheError(
                f"label map {origin}: target class {target!r} must list its source classes, e.g. {target}: [NAME]"
            )
        parsed[str(target)] = tuple(sources)
    return LabelMap(str(document["source"]), str(document["target"]), parsed, origin)


def read_map(path: Path) -> LabelMap:
    """A map from a YAML file (``--label-map``)."""
    import yaml

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError:
        raise FmcacheError(f"--label-map {path} does not exist or cannot be read") from None
    except yaml.YAMLError as exc:
        raise FmcacheError(f"--label-map {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_map(document, str(path))


def identity_map(dataset: str, classes: Sequence[str]) -> LabelMap:
    """Every class to itself: a source applied to another cache of its own dataset (re-extracted, corrupted)."""
    return LabelMap(dataset, dataset, {c: (c,) for c in classes}, "identity (same dataset)")


def choose_map(
    label_map: Path | None, source: str, target: str, source_classes: Sequence[str], facts: DatasetFacts
) -> LabelMap:
    """The map a transfer uses: ``--label-map`` when given; else the identity for the same dataset, or the shipped
    map of the registry's pair; else one line saying that ``--label-map`` is needed."""
    if label_map is not None:
        return read_map(label_map)
    if source == target:
        return identity_map(source, source_classes)
    shipped = facts.maps.get((source, target))
    if shipped is not None:
        return parse_map(shipped, f"shipped {source} -> {target}")
    raise FmcacheError(
        f"no shipped label map from {source} to {target}: pass --label-map MAP.yaml (source: {source}, target: "
        f"{target}, classes: {{TARGET_CLASS: [SOURCE_CLASS, ...]}}; see `fmcache label-map`)"
    )


@dataclass(frozen=True)
class CheckedMap:
    """A map held to both caches: the kept target classes (in the target's order) and the source columns each takes."""

    label_map: LabelMap
    multilabel: bool
    kept: list[str]  # target classes kept, in the target cache's order
    columns: list[list[int]]  # per kept class, the source class indices it takes
    target_index: list[int]  # per kept class, its index among the target cache's classes
    dropped: list[str]  # target classes the map leaves out
    unused: list[str]  # source classes no target class takes
    renormalised: bool  # single-label: the mapped source classes do not cover every source class

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """(..., n, K) target scores from (..., n, C) source probabilities (softmax or sigmoid); see the module doc."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.multilabel:
            parts = [probs[..., c[0]] if len(c) == 1 else probs[..., c].max(axis=-1) for c in self.columns]
            return np.stack(parts, axis=-1)
        # one source class: its probability as it is (no sum), so an identity map changes no number
        parts = [probs[..., c[0]] if len(c) == 1 else probs[..., c].sum(axis=-1) for c in self.columns]
        out = np.stack(parts, axis=-1)
        if self.renormalised:
            total = out.sum(axis=-1, keepdims=True)
            # a row with no probability left on the mapped classes (all underflowed, or a k-NN vote entirely for
            # unused classes) says nothing about them: uniform, never 0/0; counted by :meth:`no_mass`
            out = np.where(total > 0, out / np.where(total > 0, total, 1.0), 1.0 / out.shape[-1])
        return out

    def no_mass(self, probs: np.ndarray) -> int:
        """How many (seed, sample) rows put no probability on any mapped class (scored uniform by :meth:`scores`)."""
        if self.multilabel or not self.renormalised:
            return 0
        columns = sorted({c for group in self.columns for c in group})
        return int((np.asarray(probs, dtype=np.float64)[..., columns].sum(axis=-1) <= 0).sum())

    def labels(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels in the kept classes' indices, mask of the samples kept): single-label samples of a dropped class
        are dropped; multi-label samples keep the kept label columns."""
        y = np.asarray(y)
        if self.multilabel:
            return y[:, self.target_index], np.ones(len(y), bool)
        position = np.full(len(self.kept) + len(self.dropped), -1, np.int64)  # target class -> kept index
        position[self.target_index] = np.arange(len(self.target_index))
        mapped = position[y.astype(np.int64)]
        keep = mapped >= 0
        return mapped[keep], keep

    def facts(self) -> dict:
        """What a result records about the map."""
        return {
            "origin": self.label_map.origin,
            "document": self.label_map.document(),
            "kept": self.kept,
            "dropped_classes": self.dropped,
            "unused_source_classes": self.unused,
            "scores": self.describe_scores(),
        }

    def describe_scores(self) -> str:
        if self.multilabel:
            return (
                "each target label takes its source label's score (sigmoid, or k-NN vote share; the largest of several)"
            )
        summed = (
            "the source's class probabilities (softmax, or k-NN vote shares) summed over each target class's sources"
        )
        if self.renormalised:
            return f"{summed}, renormalised over the mapped source classes (unused: {', '.join(self.unused)})"
        return f"{summed} (every source class is mapped: they sum to one as they are)"


def check_map(
    label_map: LabelMap,
    source: str,
    target: str,
    source_classes: Sequence[str],
    target_classes: Sequence[str],
    multilabel: bool,
    log: Callable[[str], None],
) -> CheckedMap:
    """``label_map`` against the source result's dataset and classes and the target cache's: every problem is logged
    on its own line, then one error line says how many there are; a map that fits is returned checked."""
    problems = []
    if label_map.source != source:
        problems.append(f"its source is {label_map.source!r}, but the result was trained on {source!r}")
    if label_map.target != target:
        problems.append(f"its target is {label_map.target!r}, but the target cache holds {target!r}")
    taken: dict[str, str] = {}
    for name, sources in label_map.classes.items():
        if name not in target_classes:
            problems.append(f"target class {name!r} is not a class of {target} ({', '.join(target_classes)})")
        for s in sources:
            if s not in source_classes:
                problems.append(
                    f"source class {s!r} (for {name!r}) is not a class of {source} ({', '.join(source_classes)})"
                )
            elif s in taken and taken[s] != name:
                problems.append(f"source class {s!r} feeds both {taken[s]!r} and {name!r}; give it to one target class")
            taken.setdefault(s, name)
    if not problems and not label_map.classes:
        problems.append("it keeps no target class")
    if problems:
        for problem in problems:
            log(f"label map {label_map.origin}: {problem}")
        more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
        raise FmcacheError(f"label map {label_map.origin} does not fit the caches: {problems[0]}{more}")
    kept = [c for c in target_classes if c in label_map.classes]
    columns = [[list(source_classes).index(s) for s in label_map.classes[c]] for c in kept]
    used = {s for c in kept for s in label_map.classes[c]}
    unused = [s for s in source_classes if s not in used]
    return CheckedMap(
        label_map=label_map,
        multilabel=multilabel,
        kept=kept,
        columns=columns,
        target_index=[list(target_classes).index(c) for c in kept],
        dropped=[c for c in target_classes if c not in label_map.classes],
        unused=unused,
        # with every source class taken, the target scores already sum to one
        renormalised=not multilabel and bool(unused),
    )
