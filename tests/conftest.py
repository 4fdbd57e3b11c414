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
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec

    root = tmp_path_factory.mktemp("tiny_cache")
    spec = ExtractSpec(**spec_kwargs(aptos_root, root, weights=tiny_weights, tokens="1,2", shard_size=16))
    return run_extract(spec, progress=False, log=quiet)


# -- stage-two runners called as tests like to call them: a reader (or cache path) and keyword options -------------


def _cache_path(reader_or_path) -> Path:
    return Path(getattr(reader_or_path, "path", reader_or_path))


def knn(reader, out: Path, **kw) -> dict:
    from fmcache.frozen.run import run_knn
    from fmcache.frozen.specs import KnnSpec

    return run_knn(KnnSpec(_cache_path(reader), out=out, **kw))


def probe(reader, out: Path, **kw) -> dict:
    from fmcache.frozen.run import run_probe
    from fmcache.frozen.specs import ProbeSpec

    return run_probe(ProbeSpec(_cache_path(reader), out=out, **kw))


def token_probe(reader, out: Path, **kw) -> dict:
    from fmcache.frozen.run_tokens import run_token_probe
    from fmcache.frozen.specs import TokenProbeSpec

    return run_token_probe(TokenProbeSpec(_cache_path(reader), out=out, **kw))


def cka(reader, reader_b=None, out: Path = Path("results"), **kw) -> dict:
    from fmcache.frozen.run import run_cka
    from fmcache.frozen.specs import CkaSpec

    cache_b = None if reader_b is None else _cache_path(reader_b)
    return run_cka(CkaSpec(_cache_path(reader), cache_b=cache_b, out=out, **kw))


@pytest.fixture(scope="session")
def demo_grid_run(tmp_path_factory):
    """configs/demo_grid.yaml as shipped, run once for the whole session (paths relative to the YAML: the copy writes
    under a temporary folder): ``(config, run_grid's answer, its log lines)``. The grid's and the cost model's tests
    share this one run, the slowest thing the suite does."""
    import shutil

    from fmcache.grid.config import GridOptions
    from fmcache.grid.main import run_grid

    folder = tmp_path_factory.mktemp("demo_grid")
    (folder / "configs").mkdir()
    config = folder / "configs" / "demo_grid.yaml"
    shutil.copy(Path(__file__).resolve().parents[1] / "configs" / "demo_grid.yaml", config)
    messages: list[str] = []
    answer = run_grid(config, GridOptions(), log=messages.append)
    return config, answer, messages
