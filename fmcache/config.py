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
