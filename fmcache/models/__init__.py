"""Model registry, backends and the Foundation wrapper."""

from fmcache.models.foundation import (
    RANDOM_INIT_SEED,
    Foundation,
    FoundationOutput,
    create_foundation,
    weights_available_locally,
)
from fmcache.models.registry import ModelSpec, get_spec, list_models

__all__ = [
    "RANDOM_INIT_SEED",
    "Foundation",
    "FoundationOutput",
    "ModelSpec",
    "create_foundation",
    "get_spec",
    "list_models",
    "weights_available_locally",
]
