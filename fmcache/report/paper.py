"""The paper's tables and figures, and which evaluation feeds which: one catalogue for the report and the grid.

The report names every output after the paper's own number (``table1_frozen``, ``fig2_knn``, ...) with a one-line
caption; the grid's dry run groups its jobs by the same numbers. :func:`outputs_of` decides from what both know: the
protocol, its options (a job's YAML options or a result's settings) and the model, so a job and the result it writes
land under the same table or figure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fmcache.protocols import Protocol


@dataclass(frozen=True)
class PaperOutput:
    key: str  # file stem of the report output
    label: str  # the paper's own name
    caption: str  # one line: what it holds


OUTPUTS = {
    o.key: o
    for o in (
        PaperOutput("table1_frozen", "Table 1", "frozen foundations: linear and DeiT heads on the paper's features"),
        PaperOutput("table2_unfrozen", "Table 2", "fine-tuned (unfrozen) foundations: linear and DeiT heads"),
        PaperOutput("table3_1024px", "Table 3", "fine-tuned (unfrozen) foundations at 1024 px input"),
        PaperOutput("fig2_knn", "Fig. 2", "k-NN on the frozen paper feature, the seed's k = 200 and T = 0.1"),
        PaperOutput("fig3_time", "Fig. 3", "time: extraction per image, training, inference per sample"),
        PaperOutput("fig4_freeze", "Fig. 4", "fine-tuning with the first K blocks frozen, every model"),
        PaperOutput("fig5_decapitation", "Fig. 5", "decapitation: the DeiT head on block i, frozen and fine-tuned"),
        PaperOutput("fig6_model_size", "Fig. 6", "model size: DINOv2 S, B, L and g"),
        PaperOutput("fig7_cka_finetune", "Fig. 7", "CKA per layer between a foundation before and after fine-tuning"),
        PaperOutput("fig8_cka_models", "Fig. 8", "last-layer CKA across models"),
    )
}  # fmt: skip
HIGH_RES = 512  # inputs at least this large count as the paper's high-resolution study (Table 3)
MODEL_SIZE_FAMILY = ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def freeze_of(options: Mapping) -> str:
    """A fine-tune's ``freeze`` setting as text (``none`` when absent or null): ``none``, ``all`` or K."""
    freeze = options.get("freeze", "none")
    return "none" if freeze is None else str(freeze)


def _layers(options: Mapping) -> list[str]:
    return [str(x) for x in _as_list(options.get("layers", options.get("layer", "last")))]


def _paper_feature(protocol: Protocol, options: Mapping) -> bool:
    """A frozen result on the paper's feature: the paper's pooled feature at the last layer (pooled heads and k-NN),
    the DeiT head's paper tokens (token heads), or the whole frozen foundation (fine-tuning with ``--freeze all``)."""
    if protocol.reads == "images":
        return freeze_of(options) == "all" and options.get("drop_after") is None
    paper = options.get("paper_feature")
    if paper is None:  # a job, or a result written before the runner recorded it
        if protocol.reads == "tokens":
            paper = _layers(options) == ["paper"]
        else:  # the linear head and k-NN: pool "paper" (the last layer's only); the runner records the rest
            paper = _as_list(options.get("pool")) == ["paper"]
    return bool(paper)


def _unfrozen(protocol: Protocol, options: Mapping) -> bool:
    return protocol.trains_foundation and freeze_of(options) == "none" and options.get("drop_after") is None


def _pairs_models(options: Mapping, model: str) -> bool:
    return bool(options.get("across_models") or (options.get("model_b") and options.get("model_b") != model))


def _pairs_itself(options: Mapping, model: str) -> bool:
    return bool(options.get("same_model") or options.get("model_b") == model) and not _pairs_models(options, model)


# The seed's k-NN (Fig. 2): one k and one temperature, fixed in its trainer; DINO's k/T sweep is fmcache's option.
SEED_KNN_K, SEED_KNN_T = 200, 0.1


def seed_knn(options: Mapping) -> bool:
    """A k-NN run that scored the seed's setting (k = 200 among its ks, T = 0.1)."""
    ks = [int(k) for k in _as_list(options.get("ks"))]
    temperature = options.get("temperature")
    return SEED_KNN_K in ks and temperature is not None and abs(float(temperature) - SEED_KNN_T) < 1e-12


# The paper's recipe (PROTOCOLS.md, "Training"): a result that departs from it fills no paper cell, whatever its
# numbers; each departure is (setting, the paper's value, what the report calls the departure). Settings a result
# does not record took the paper's value.
RECIPE = (
    ("method", "full", "method"),
    ("schedule", "constant", "schedule"),
    ("layer_decay", 1.0, "layer_decay"),
    ("from_cache", False, "from_cache"),
    ("standardize", False, "standardize"),
    ("best_epoch", "seed", "best_epoch"),
)


def departures(protocol: Protocol, options: Mapping, img_size: int | None = None) -> list[str]:
    """How a result or job departs from the paper's protocol, as ``name=value`` words (empty: it follows it)."""
    out = [f"{name}={options[key]}" for key, value, name in RECIPE if key in options and options[key] != value]
    if options.get("train_fraction") or options.get("train_per_class") or options.get("train_subset"):
        out.append("train_subset")  # label-efficiency runs: the report's own curve, never a paper cell
    if "fig2_knn" in protocol.fills and not seed_knn(options):
        out.append("knn_sweep")  # DINO's k and T: the sweep, not the seed's fixed k = 200, T = 0.1
    return out


# output → whether one result (its protocol's traits, its settings, its model, high resolution or not) may fill it
Rule = Callable[[Protocol, Mapping, str, bool], bool]
RULES: dict[str, Rule] = {
    "table1_frozen": lambda p, o, m, high: not high and _paper_feature(p, o),
    "table2_unfrozen": lambda p, o, m, high: not high and _unfrozen(p, o),
    # the paper's Table 3 is one scenario: the foundation fine-tuned (unfrozen) at 1024 px
    "table3_1024px": lambda p, o, m, high: high and _unfrozen(p, o),
    "fig2_knn": lambda p, o, m, high: not high and _paper_feature(p, o),
    "fig4_freeze": lambda p, o, m, high: not high and freeze_of(o).isdigit() and o.get("drop_after") is None,
    "fig5_decapitation": lambda p, o, m, high: (
        not high
        and (o.get("drop_after") is not None if p.reads == "images" else len(_layers(o)) > 1 or _layers(o) == ["all"])
    ),
    "fig7_cka_finetune": lambda p, o, m, high: not high and _pairs_itself(o, m),
    "fig8_cka_models": lambda p, o, m, high: not high and _pairs_models(o, m),
}
# outputs that follow from the others a result fills
DERIVED = {
    "fig6_model_size": lambda m, out: m in MODEL_SIZE_FAMILY and bool({"table1_frozen", "table2_unfrozen"} & set(out)),
    "fig3_time": lambda m, out: bool(out),
}


def outputs_of(protocol: Protocol, options: Mapping, model: str, img_size: int | None = None) -> list[str]:
    """The paper outputs an evaluation feeds: those its protocol may fill (its ``fills`` trait) whose rule holds, and
    none when it departs from the paper's recipe (:func:`departures`).

    ``options`` are a grid job's options or a result's ``settings`` (the same names: ``pool``, ``layer`` or
    ``layers``, ``freeze``, ``drop_after``, ``ks``, ``temperature``, the recipe's; ``paper_feature`` when the runner
    recorded it; ``model_b`` and ``same_model`` for CKA; ``across_models`` for the grid's pairwise CKA).
    """
    if departures(protocol, options, img_size):
        return []
    high = img_size is not None and img_size >= HIGH_RES
    out = [key for key in protocol.fills if key in RULES and RULES[key](protocol, options, model, high)]
    return out + [key for key in protocol.fills if key in DERIVED and DERIVED[key](model, out)]


def variation(protocol: Protocol, options: Mapping, model: str, img_size: int | None = None) -> str:
    """What a result that fills no paper output varies, as the stem of its supplementary output (``supp_<this>``):
    its departures from the recipe, else its resolution, else its protocol (an attentive head, a per-layer sweep)."""
    words = departures(protocol, options, img_size)
    if img_size is not None and img_size >= HIGH_RES:
        words.append(f"{img_size}px")
    if not words:
        words.append(protocol.name)
    return "_".join(w.replace("=", "_").replace(".", "p") for w in words)
