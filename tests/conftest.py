"""Shared fixtures for the extraction and cache tests: a small APTOS fixture, tiny model weights and a cache."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from tests.fixtures_data import make_aptos

TINY_MODEL = "dinov2_vits14"
TINY_SIZE = 56
TINY_OVERRIDES = {"depth": 2}


def spec_kwargs(data_root: Path, cache_root: Path, **kw) -> dict:
    """ExtractSpec arguments for the tiny dinov2 (random init unless ``weights`` is given), fast loader settings."""
    base = {
        "dataset": "aptos2019",
        "data_root": Path(data_root),
        "model": TINY_MODEL,
        "img_size": TINY_SIZE,
        "arch_overrides": dict(TINY_OVERRIDES),
        "random_init": kw.get("weights") is None,
        "batch_size": 4,
        "shard_size": 8,
        "workers": 0,
        "cache_root": Path(cache_root),
    }
    return {**base, **kw}


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, as torchrun gives its workers (OMP_NUM_THREADS=1), so bytes compare across runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet(_message: str) -> None:
    """A log function that drops the extractor's messages."""


@pytest.fixture(scope="session")
def aptos_root(tmp_path_factory) -> Path:
    """40 APTOS images (28 train / 6 val / 6 test); shared, so copy it before changing any file."""
    return make_aptos(tmp_path_factory.mktemp("aptos"), n=40)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A weights file holding one random init of the tiny dinov2, so a test can rebuild the extracted model."""
    from fmcache.models import create_foundation

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = create_foundation(TINY_MODEL, random_init=True, img_size=TINY_SIZE, arch_overrides=TINY_OVERRIDES)
    path = tmp_path_factory.mktemp("weights") / "tiny_dinov2.pt"
    torch.save(model.adapter.model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, aptos_root, tiny_weights) -> Path:
    """A complete fp16 cache of the APTOS fixture: tiny dinov2 from ``tiny_weights``, tokens of layers 1 and 2."""
    from fmcache.extract import ExtractSpec, run_extract

    root = tmp_path_factory.mktemp("tiny_cache")
    spec = ExtractSpec(**spec_kwargs(aptos_root, root, weights=tiny_weights, tokens="1,2", shard_size=16))
    return run_extract(spec, progress=False, log=quiet)
