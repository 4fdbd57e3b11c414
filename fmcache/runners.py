"""Each protocol's spec class and runner, bound to its name (:mod:`fmcache.protocols` holds the traits).

The binding lives above the runners it names, so import-linter sees every arrow. The spec classes are light and
imported here; each runner is imported on first use: the runners import torch (and faiss, timm ...), which the
CLI's ``--help``, a YAML check and a dry run should not pay for.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from fmcache.errors import FmcacheError
from fmcache.finetune.spec import FinetuneSpec
from fmcache.frozen.label_map import DatasetFacts
from fmcache.frozen.specs import CkaSpec, KnnSpec, ProbeSpec, TokenProbeSpec, TransferSpec
from fmcache.protocols import Protocol, get_protocol, register, unregister


@dataclass(frozen=True)
class Binding:
    spec: type  # the frozen spec dataclass the runner takes
    run: Callable[..., dict]  # runner(spec, progress=..., log=...) -> dict with "folder"


def _knn() -> Binding:
    from fmcache.frozen.run import run_knn  # deferred: torch, faiss

    return Binding(KnnSpec, run_knn)


def _linear() -> Binding:
    from fmcache.frozen.run import run_probe  # deferred: torch

    return Binding(ProbeSpec, run_probe)


def _tokens() -> Binding:
    from fmcache.frozen.run_tokens import run_token_probe  # deferred: torch, timm

    return Binding(TokenProbeSpec, run_token_probe)


def _cka() -> Binding:
    from fmcache.frozen.run import run_cka  # deferred: torch

    return Binding(CkaSpec, run_cka)


def _transfer() -> Binding:
    from fmcache.data.label_maps import id_namespaces, registry_map, shipped_pairs  # deferred: torch (every loader)
    from fmcache.frozen.transfer import run_transfer  # deferred: torch, faiss

    # stage two reads no dataset registry: what a transfer needs of it (shipped maps, id namespaces) is handed over
    facts = DatasetFacts({pair: registry_map(*pair) for pair in shipped_pairs()}, id_namespaces())
    return Binding(TransferSpec, functools.partial(run_transfer, datasets=facts))


def _finetune() -> Binding:
    from fmcache.finetune.run import run_finetune  # deferred: torch, timm

    return Binding(FinetuneSpec, run_finetune)


_BINDINGS: dict[str, Callable[[], Binding]] = {
    "knn": _knn,
    "probe_linear": _linear,
    "probe_deit": _tokens,
    "probe_attentive": _tokens,
    "cka": _cka,
    "transfer": _transfer,
    "finetune_linear": _finetune,
    "finetune_deit": _finetune,
}


def binding(name: str) -> Binding:
    protocol = get_protocol(name)  # an unknown name is one line listing the valid ones
    try:
        return _BINDINGS[protocol.name]()
    except KeyError:
        raise FmcacheError(f"protocol {name} has no spec and runner bound; call fmcache.runners.bind") from None


def spec_class(name: str) -> type:
    return binding(name).spec


def make_spec(name: str, **fields):
    """The protocol's spec from ``fields``, with the head its row names; the spec checks every value."""
    protocol = get_protocol(name)
    spec = spec_class(name)
    if protocol.head is not None and "head" in {f.name for f in dataclasses.fields(spec)}:
        fields = {**fields, "head": protocol.head}
    return spec(**fields)


def run(name: str, spec, **kwargs) -> dict:
    return binding(name).run(spec, **kwargs)


def bind(protocol: Protocol, spec: type, runner: Callable[..., dict]) -> None:
    """Register a protocol row with its spec class and runner: all a new protocol needs."""
    register(protocol)
    _BINDINGS[protocol.name] = lambda: Binding(spec, runner)


def unbind(name: str) -> None:
    _BINDINGS.pop(name, None)
    unregister(name)
