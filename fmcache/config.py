"""YAML configs: flat ``key: value`` files whose keys are the CLI option names (dashes or underscores)."""

from __future__ import annotations

from pathlib import Path

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


# -- coercion at the spec boundary: flags arrive as text, YAML as lists or numbers, Python callers as either ------


def as_floats(name: str, value: object) -> tuple[float, ...]:
    """``1e-5,1e-4`` (text), ``[1e-5, 1e-4]`` or one number, as a non-empty tuple of floats."""
    items = [t for t in value.split(",") if t.strip()] if isinstance(value, str) else value
    items = items if isinstance(items, (list, tuple)) else [items]
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise FmcacheError(f"bad --{_flag(name)} {value!r}; give comma-separated numbers, e.g. 1e-5,1e-4") from None
    if not out:
        raise FmcacheError(f"--{_flag(name)} is empty")
    return out


def as_ints(name: str, value: object, low: int = 1) -> tuple[int, ...]:
    """Like :func:`as_floats` for integers >= ``low``, e.g. ``10,20,100,200``."""
    values = as_floats(name, value)
    if any(v != int(v) or v < low for v in values):
        raise FmcacheError(f"bad --{_flag(name)} {value!r}; give integers >= {low}, e.g. 10,20,100,200")
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
    seeds = as_ints("seeds", value, low=0)
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
