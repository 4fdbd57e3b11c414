"""YAML configs: flat ``key: value`` files whose keys are the CLI option names (dashes or underscores)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from fmcache.errors import FmcacheError


def load_config(path: str | Path | None) -> dict:
    """Read a YAML config into a dict with underscore keys; a missing or malformed file is a clear error."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FmcacheError(f"config file {path} does not exist; see configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FmcacheError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise FmcacheError(f"config file {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge(defaults: dict, config: dict, flags: dict, allowed: set[str], source: str = "config") -> dict:
    """defaults ← config ← flags (flags that were given, i.e. not None). Unknown config keys are errors."""
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise FmcacheError(f"{source} has unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
    out = dict(defaults)
    out.update({k: v for k, v in config.items()})
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def check_int(name: str, value: object, low: int) -> None:
    """An option that must be an integer >= ``low``; the error names it as its flag."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FmcacheError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")


def as_float(name: str, value: object) -> float:
    """An option that must be one number (a YAML list or mapping, or text that is no number, is refused in one line
    naming it as its flag)."""
    if not isinstance(value, bool):
        try:
            if isinstance(value, int | float | str):
                return float(value)
        except ValueError:
            pass
    raise FmcacheError(f"--{name.replace('_', '-')} must be a number, got {value!r}")


# -- coercion at the spec boundary: flags arrive as text, YAML as lists or numbers, Python callers as either ------


def as_floats(name: str, value: object, *, example: str) -> tuple[float, ...]:
    """``1e-5,1e-4`` (text), ``[1e-5, 1e-4]`` or one number, as a non-empty tuple of floats; ``example`` is what the
    error suggests for this option (its own: fractions ``0.01,0.1,1.0``, LRs ``1e-5,1e-4``), so it has no default."""
    items = [t for t in value.split(",") if t.strip()] if isinstance(value, str) else value
    items = items if isinstance(items, (list, tuple)) else [items]
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise FmcacheError(f"bad --{_flag(name)} {value!r}; give comma-separated numbers, e.g. {example}") from None
    if not out:
        raise FmcacheError(f"--{_flag(name)} is empty; give comma-separated numbers, e.g. {example}")
    return out


def as_ints(name: str, value: object, low: int = 1, *, example: str) -> tuple[int, ...]:
    """Like :func:`as_floats` for integers >= ``low`` (seeds ``0,3,7``, ks ``10,20,100,200``)."""
    values = as_floats(name, value, example=example)
    if any(v != int(v) or v < low for v in values):
        raise FmcacheError(f"bad --{_flag(name)} {value!r}; give integers >= {low}, e.g. {example}")
    return tuple(int(v) for v in values)


def as_seeds(value: object) -> tuple[int, ...]:
    """``--seeds``: a count N (seeds 0..N-1) or an explicit list of seeds, as a non-empty tuple without repeats."""
    if isinstance(value, bool):
        raise FmcacheError(f"--seeds must be a count or a list of seeds, got {value!r}")
    if isinstance(value, str) and "," not in value:
        value = value.strip()
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        count = int(value)
        if count < 1:
            raise FmcacheError(f"--seeds must be at least 1, got {count}")
        return tuple(range(count))
    seeds = as_ints("seeds", value, low=0, example="0,3,7")
    if len(set(seeds)) != len(seeds):
        raise FmcacheError(f"--seeds repeats a seed: {list(seeds)}")
    return seeds


def as_path(value: object) -> object:
    """A path-like option as ``Path`` (None stays None)."""
    from pathlib import Path

    return None if value is None else Path(str(value))


def as_text(value: object) -> str | None:
    """An option that is text even when YAML reads it as a number (``freeze: 4``), None stays None."""
    return None if value is None else str(value)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """An option that must be one of ``allowed``; the error lists the valid values."""
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed if a is not None)
        raise FmcacheError(f"unknown --{_flag(name)} '{value}'; use {shown}")


def default_text(value: object) -> str:
    """A default as a user would type it: ``1e-05,0.0001`` for a tuple of numbers, ``none`` for None."""
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(default_text(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


class Spec:
    """The base of every request: ``ExtractSpec``, ``KnnSpec``, ``ProbeSpec``, ``TokenProbeSpec``, ``CkaSpec``,
    ``FinetuneSpec``. A subclass is a frozen dataclass filled from flags, ``--config`` YAML or the grid.

    One idiom for all of them: the class names its path fields (:attr:`PATHS`), integer fields with their lowest
    value (:attr:`INTS`), number fields (:attr:`FLOATS`) and choice fields (:attr:`CHOICES`); ``__post_init__`` coerces and checks those, then calls
    :meth:`check` for what is particular to the spec. Every refusal is one ``FmcacheError`` line naming the option as
    its flag, before any file is read.
    """

    PATHS: ClassVar[tuple[str, ...]] = ()
    INTS: ClassVar[dict[str, int]] = {}
    FLOATS: ClassVar[tuple[str, ...]] = ()  # one number each (None allowed where the default is None)
    CHOICES: ClassVar[dict[str, tuple]] = {}

    def __post_init__(self) -> None:
        for name in self.PATHS:
            self.set(name, as_path(getattr(self, name)))
        for name in self.FLOATS:
            value = getattr(self, name)
            if isinstance(value, str) or (value is None and self.default(name) is not None):
                self.set(name, as_float(name, value))  # text from a flag or YAML: its number
            elif value is not None:
                as_float(name, value)  # a number stays as given (an int keeps its settings hash)
        for name, low in self.INTS.items():
            value = getattr(self, name)
            if value is not None or self.default(name) is not None:  # an optional count may stay None
                check_int(name, value, low)
        for name, allowed in self.CHOICES.items():
            check_choice(name, getattr(self, name), allowed)
        self.check()

    def check(self) -> None:
        """Coercions and cross-field rules the class attributes cannot express."""

    def set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # the dataclass is frozen; only checking may normalise a field

    @classmethod
    def default(cls, name: str) -> object:
        """A field's default (``dataclasses.MISSING`` when it has none)."""
        found = {f.name: f for f in dataclasses.fields(cls)}[name]  # type: ignore[arg-type]
        if found.default is not dataclasses.MISSING:
            return found.default
        if found.default_factory is not dataclasses.MISSING:
            return found.default_factory()
        return dataclasses.MISSING

    @classmethod
    def default_help(cls, name: str) -> str:
        """``(default X)`` for a help text, from the field itself, so help and behaviour cannot drift apart."""
        return f"(default {default_text(cls.default(name))})"
