"""The registry's label maps as documents: one per external dataset whose task a paper dataset shares (its ``source``),
from its ``to_source``, and the YAML text that ``configs/label_maps/<source>_to_<target>.yaml`` ship and
``fmcache label-map`` prints (``tests/test_transfer.py`` holds the shipped files to this text, so they cannot drift).

The document format is :mod:`fmcache.frozen.label_map`'s: ``source``, ``target`` and ``classes`` (target class → list
of source classes). The registry maps one target class to one source class; a hand-written map may list several.
"""

from __future__ import annotations

import importlib

import yaml

from fmcache.data.registry import DATASETS
from fmcache.errors import FmcacheError

HEADER = (
    "# fmcache label map: which source classes score each target class (fmcache transfer --label-map).\n"
    "# classes: target class -> [source classes]; a target class left out is dropped (its samples, or its label\n"
    "# column for multi-label data), a source class no target class takes is unused.\n"
)


def shipped_pairs() -> list[tuple[str, str]]:
    """(source, target) of every registered dataset that names a source dataset and a class map, in registry order."""
    return [(spec.source, name) for name, spec in DATASETS.items() if spec.source and spec.to_source]


def registry_map(source: str, target: str) -> dict:
    """The registry's map from ``source`` to ``target`` as a document; an unknown pair is one line listing them."""
    if (source, target) not in shipped_pairs():
        pairs = ", ".join(f"{s} {t}" for s, t in shipped_pairs())
        raise FmcacheError(f"no shipped label map from {source} to {target}; shipped pairs: {pairs}")
    to_source = DATASETS[target].to_source
    return {"source": source, "target": target, "classes": {t: [s] for t, s in to_source.items()}}


def map_yaml(document: dict) -> str:
    """The YAML text of a map document: the header comment, then one ``TARGET: [SOURCE, ...]`` line per class and
    a comment naming the target classes the map drops."""
    lines = [HEADER.rstrip("\n"), f"source: {document['source']}", f"target: {document['target']}", "classes:"]
    lines += [
        f"  {_quoted(t)}: [{', '.join(_quoted(s) for s in sources)}]" for t, sources in document["classes"].items()
    ]
    dropped = [c for c in _class_names(document["target"]) if c not in document["classes"]]
    if dropped:
        lines.append(f"# dropped target classes: {', '.join(dropped)}")
    taken = {s for sources in document["classes"].values() for s in sources}
    unused = [c for c in _class_names(document["source"]) if c not in taken]
    if unused:
        lines.append(f"# unused source classes: {', '.join(unused)}")
    return "\n".join(lines) + "\n"


def _class_names(dataset: str) -> list[str]:
    """A dataset's class names as its loader's module declares them (the registry keeps their count only; none for
    a dataset whose classes depend on its layout, as CBIS-DDSM's)."""
    module = importlib.import_module(DATASETS[dataset].loader.__module__)
    return list(getattr(module, "CLASS_NAMES", None) or getattr(module, "OBSERVATIONS", ()))  # CheXpert: observations


def _quoted(name: str) -> str:
    """A class name as a YAML scalar: plain when YAML reads it back as the same text, else double-quoted."""
    plain = name.replace("-", "").replace("_", "").replace(" ", "").isalnum() and yaml.safe_load(name) == name
    return name if plain else '"' + name.replace('"', '\\"') + '"'


def id_namespaces() -> dict[str, str | None]:
    """Each registered dataset's image-id namespace (None: its ids are its own)."""
    return {name: spec.id_namespace for name, spec in DATASETS.items()}
