"""``fmcache conformance``: a user's weights file checked against the official implementation, and the verdict
kept in the manifest of the cache extracted from that file (:mod:`fmcache.models.conformance` does the check)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fmcache.cache.manifest import read_manifest, record_conformance
from fmcache.config import Spec
from fmcache.errors import FmcacheError
from fmcache.files import sha256_file
from fmcache.models.conformance import TOLERANCE, check_conformance


@dataclass(frozen=True)
class ConformanceSpec(Spec):
    """What ``fmcache conformance`` checks: a registry model, a release file (or random weights in the release's
    layout), an input size (default: the cache's, else the model's) and, optionally, the cache to record it in."""

    model: str
    weights: Path | None = None
    random_init: bool = False
    img_size: int | None = None
    tolerance: float = TOLERANCE
    cache: Path | None = None

    PATHS: ClassVar[tuple[str, ...]] = ("weights", "cache")
    INTS: ClassVar[dict[str, int]] = {"img_size": 1}

    def check(self) -> None:
        if not self.tolerance > 0:
            raise FmcacheError(f"--tolerance must be > 0, got {self.tolerance}")
        if self.cache is not None and self.weights is None:
            raise FmcacheError("--cache records a check of the file the cache was extracted from: pass --weights FILE")
        if self.weights is not None and not self.weights.is_file():
            raise FmcacheError(f"weights file {self.weights} does not exist; check the --weights path")


def run_conformance(spec: ConformanceSpec) -> dict:
    """Check ``spec.model`` with its weights against the official implementation; with ``spec.cache``, write the
    verdict into that cache's manifest. Returns the verdict (``passed``, ``layers`` with their max |diff|, ...)."""
    img_size = spec.img_size
    if spec.cache is not None and img_size is None:
        manifest = read_manifest(spec.cache) or {}
        img_size = (manifest.get("model") or {}).get("img_size")
    verdict = check_conformance(
        spec.model, spec.weights, img_size, random_init=spec.random_init, tolerance=spec.tolerance
    )
    if spec.cache is not None:
        record_conformance(spec.cache, verdict, sha256_file(spec.weights))
        verdict = {**verdict, "recorded_in": str(spec.cache)}
    return verdict
