"""fmcache: extract frozen foundation-model features once, then evaluate from the cache in seconds."""

from __future__ import annotations


def _version() -> str:
    # single source: the installed package's metadata (pyproject.toml); a bare checkout reads the file itself
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fmcache")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "0+unknown"


__version__ = _version()
