"""Cache keys: sha256 of canonical JSON over every input that changes the cached numbers."""

from __future__ import annotations

import hashlib
import json

SCHEMA_VERSION = 2  # 2: the optional views/ group (cache/views.py); schema-1 caches read unchanged


def canonical_json(obj: object) -> str:
    """Key-order independent, whitespace-free JSON; tuples and lists serialise alike."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def cache_key(inputs: dict) -> str:
    """The full hex key; directories use its first 12 characters."""
    return hashlib.sha256(canonical_json({"schema": SCHEMA_VERSION, **inputs}).encode()).hexdigest()
