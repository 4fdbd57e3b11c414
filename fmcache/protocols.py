"""The one list of evaluation protocols: name → spec class → runner, and what the paper calls each.

The CLI, the grid, :mod:`fmcache.results` and :mod:`fmcache.report` all read this table. It sits at the bottom of the
package, so it names the spec classes and runners (which live above it, in ``fmcache.frozen`` and
``fmcache.finetune``) as ``"module:attribute"`` text and imports them only when asked (:meth:`Protocol.spec_class`,
:meth:`Protocol.runner`): the results contract and the report read the names without loading torch or a runner.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from fmcache.errors import FmcacheError


@dataclass(frozen=True)
class Protocol:
    """One protocol: its result-folder/job name, where its numbers come from, its spec and runner."""

    name: str  # result folder prefix (<name>-<settings_hash12>) and grid job kind
    reads: str  # "cache" (stage two, from an extract's cache) or "images" (end-to-end fine-tuning)
    spec: str  # "module:Class" of the frozen spec dataclass the runner takes
    runner: str  # "module:function" taking (spec, progress=..., log=...) and returning a dict with "folder"
    fixed: tuple[tuple[str, object], ...] = ()  # spec fields this protocol fixes (the head of a shared spec)
    predictions: bool = True  # writes predictions.npz
    describes: str = ""  # one line for help texts and the report

    def spec_class(self) -> type:
        return _resolve(self.spec)

    def runner_fn(self):
        return _resolve(self.runner)

    def make_spec(self, **fields):
        """The protocol's spec from ``fields`` plus the fields it fixes; the spec checks every value."""
        return self.spec_class()(**fields, **dict(self.fixed))

    def run(self, spec, **kwargs) -> dict:
        return self.runner_fn()(spec, **kwargs)


def _resolve(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


_FROZEN = "fmcache.frozen.specs"
PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("knn", "cache", f"{_FROZEN}:KnnSpec", "fmcache.frozen.run:run_knn",
                 describes="weighted k-NN on L2-normalised pooled features (paper Fig. 2)"),
        Protocol("probe_linear", "cache", f"{_FROZEN}:ProbeSpec", "fmcache.frozen.run:run_probe",
                 fixed=(("head", "linear"),), describes="LR × seed grid of linear heads on frozen pooled features"),
        Protocol("probe_deit", "cache", f"{_FROZEN}:TokenProbeSpec", "fmcache.frozen.run_tokens:run_token_probe",
                 fixed=(("head", "deit"),), describes="the seed's stacked DeiT-B head on frozen cached tokens"),
        Protocol("probe_attentive", "cache", f"{_FROZEN}:TokenProbeSpec", "fmcache.frozen.run_tokens:run_token_probe",
                 fixed=(("head", "attentive"),), describes="an attentive-pooling head on frozen cached tokens"),
        Protocol("cka", "cache", f"{_FROZEN}:CkaSpec", "fmcache.frozen.run:run_cka", predictions=False,
                 describes="linear CKA between layers of one or two caches (paper Figs. 7 and 8)"),
        Protocol("finetune_linear", "images", "fmcache.finetune.spec:FinetuneSpec", "fmcache.finetune.run:run_finetune",
                 fixed=(("head", "linear"),), describes="end-to-end fine-tuning with a linear head"),
        Protocol("finetune_deit", "images", "fmcache.finetune.spec:FinetuneSpec", "fmcache.finetune.run:run_finetune",
                 fixed=(("head", "deit"),), describes="end-to-end fine-tuning with the stacked DeiT-B head"),
    )
}  # fmt: skip
NAMES = tuple(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise FmcacheError(f"unknown protocol {name!r}; valid: {', '.join(NAMES)}") from None


def head_protocol(stage: str, head: str) -> Protocol:
    """The protocol of ``fmcache probe --head X`` (stage ``probe``) or ``fmcache finetune --head X``."""
    name = f"{stage}_{head}"
    if name not in PROTOCOLS:
        heads = [n.split("_", 1)[1] for n in NAMES if n.startswith(f"{stage}_")]
        raise FmcacheError(f"unknown --head '{head}'; use {', '.join(heads)}")
    return PROTOCOLS[name]
