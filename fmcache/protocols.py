"""The one list of evaluation protocols, as data: each protocol's name and the traits its consumers read.

The CLI, the grid, its dry run and cost model, :mod:`fmcache.results` and :mod:`fmcache.report` tell protocols
apart only by these traits (what a protocol reads, whether it trains the foundation, which paper outputs its results
may fill, how its results compete, which cost model estimates it), never by comparing names. The spec class and the
runner of each protocol are bound to its name in :mod:`fmcache.runners`, above the runners, where import-linter sees
the arrows; this table sits at the bottom of the package so the results contract and the report read it without
loading torch.

Adding a protocol is one row here (or :func:`register` from a plugin or a test), one spec and one runner
(:func:`fmcache.runners.bind`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fmcache.errors import FmcacheError

READS = ("pooled", "tokens", "images")  # cached pooled features, cached token layers, the images themselves
SUMMARIES = ("grid", "rows", "matrix")  # a head grid (best LR, mean ± std), k-NN rows + best, a CKA matrix
# fmcache.cost estimators; "applying": another result's heads applied to a cache (inference only)
COST_MODELS = ("neighbours", "pooled_heads", "token_heads", "similarity", "end_to_end", "applying")
HEAD_LABELS = {"linear": "linear", "deit": "DeiT", "attentive": "attentive"}


@dataclass(frozen=True)
class Protocol:
    """One protocol: its result-folder / job name and its traits."""

    name: str  # result folder prefix (<name>-<settings_hash12>) and grid job kind
    command: str  # the CLI command that runs it (knn, probe, cka, finetune)
    reads: str  # one of READS
    summary: str  # one of SUMMARIES: the shape of result.json's summary, and so how results compete
    cost: str  # one of COST_MODELS
    head: str | None = None  # the head of a head grid (linear, deit, attentive); None: no trained head
    trains_foundation: bool = False  # the foundation runs in the loop and its trainable parts learn
    pairs: bool = False  # compares two caches: may name a second model or a fine-tuned export of the same one
    fills: tuple[str, ...] = ()  # paper outputs its results may fill (report.paper's rules decide per result)
    per_layer: tuple[str, str] | None = None  # (figure stem, caption) of its metric-vs-layer curve
    predictions: bool = True  # writes predictions.npz
    records: tuple[str, ...] = ()  # further top-level result.json objects every result of it carries (the contract)
    # applies the heads of another protocol's result (its ``from`` job in a grid) to its own cache: no training
    applies: bool = False
    describes: str = ""  # one line for help texts and the report

    def __post_init__(self) -> None:
        for trait, value, allowed in (
            ("reads", self.reads, READS),
            ("summary", self.summary, SUMMARIES),
            ("cost", self.cost, COST_MODELS),
        ):
            if value not in allowed:
                raise FmcacheError(f"protocol {self.name}: {trait} '{value}' is not one of {', '.join(allowed)}")

    @property
    def label(self) -> str:
        """A short display name: the head's (``DeiT``), else the protocol's own (``k-NN``)."""
        if self.head is not None:
            return HEAD_LABELS.get(self.head, self.head)
        return {"rows": "k-NN", "matrix": "CKA"}.get(self.summary, self.name)

    @property
    def competes_by(self) -> str:
        """The summary value results of this protocol compete on for one output cell (the val metric)."""
        return "best.val" if self.summary == "rows" else "val_mean"


_TIME = "fig3_time"  # every protocol with per-run timings feeds the time figure
PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("knn", "knn", "pooled", "rows", "neighbours", fills=("fig2_knn", _TIME),
                 per_layer=("supp_knn_vs_layer", "k-NN per layer"),
                 describes="weighted k-NN on L2-normalised pooled features (paper Fig. 2)"),
        Protocol("probe_linear", "probe", "pooled", "grid", "pooled_heads", head="linear",
                 fills=("table1_frozen", "table3_1024px", "fig6_model_size", _TIME),
                 per_layer=("supp_linear_vs_layer", "linear probe per layer"),
                 describes="LR × seed grid of linear heads on frozen pooled features"),
        Protocol("probe_deit", "probe", "tokens", "grid", "token_heads", head="deit",
                 fills=("table1_frozen", "table3_1024px", "fig5_decapitation", "fig6_model_size", _TIME),
                 per_layer=("fig5_decapitation", "DeiT head per block (decapitation)"),
                 describes="the seed's stacked DeiT-B head on frozen cached tokens"),
        Protocol("probe_attentive", "probe", "tokens", "grid", "token_heads", head="attentive",
                 per_layer=("supp_attentive_vs_layer", "attentive head per layer"),
                 describes="an attentive-pooling head on frozen cached tokens"),
        Protocol("cka", "cka", "pooled", "matrix", "similarity", pairs=True, predictions=False,
                 fills=("fig7_cka_finetune", "fig8_cka_models"),
                 describes="linear CKA between layers of one or two caches (paper Figs. 7 and 8)"),
        Protocol("transfer", "transfer", "pooled", "grid", "applying", applies=True,
                 records=("source", "target", "label_map", "overlap"),
                 describes="a frozen result's heads applied to another cache of the same model (external validation)"),
        Protocol("finetune_linear", "finetune", "images", "grid", "end_to_end", head="linear", trains_foundation=True,
                 fills=("table1_frozen", "table2_unfrozen", "table3_1024px", "fig4_freeze", "fig5_decapitation",
                        "fig6_model_size", _TIME),
                 describes="end-to-end fine-tuning with a linear head"),
        Protocol("finetune_deit", "finetune", "images", "grid", "end_to_end", head="deit", trains_foundation=True,
                 fills=("table1_frozen", "table2_unfrozen", "table3_1024px", "fig4_freeze", "fig5_decapitation",
                        "fig6_model_size", _TIME),
                 describes="end-to-end fine-tuning with the stacked DeiT-B head"),
    )
}  # fmt: skip


def names() -> tuple[str, ...]:
    """Every protocol's name, in the table's order (registered ones included)."""
    return tuple(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise FmcacheError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}") from None


def head_protocol(command: str, head: str) -> Protocol:
    """The protocol of ``fmcache probe --head X`` or ``fmcache finetune --head X``."""
    found = [p for p in PROTOCOLS.values() if p.command == command and p.head == head]
    if not found:
        heads = [p.head for p in PROTOCOLS.values() if p.command == command and p.head]
        raise FmcacheError(f"unknown --head '{head}'; use {', '.join(heads)}")
    return found[0]


def register(protocol: Protocol) -> Protocol:
    """Add a protocol row (a plugin's or a test's); its spec and runner are bound with :func:`fmcache.runners.bind`."""
    if protocol.name in PROTOCOLS and PROTOCOLS[protocol.name] != protocol:
        raise FmcacheError(f"protocol {protocol.name} is registered already with other traits")
    PROTOCOLS[protocol.name] = protocol
    return protocol


def unregister(name: str) -> None:
    PROTOCOLS.pop(name, None)
