"""The paper's tables and figures, and which evaluation feeds which: one catalogue for the report and the grid.

The report names every output after the paper's own number (``table1_frozen``, ``fig2_knn``, ...) with a one-line
caption; the grid's dry run groups its jobs by the same numbers. :func:`outputs_of` decides from what both know: the
protocol, its options (a job's YAML options or a result's settings) and the model, so a job and the result it writes
land under the same table or figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


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
        PaperOutput("table3_1024px", "Table 3", "the same protocols at 1024 px input"),
        PaperOutput("fig2_knn", "Fig. 2", "k-NN on the frozen features"),
        PaperOutput("fig3_time", "Fig. 3", "time: extraction per image, training, inference per sample"),
        PaperOutput("fig4_freeze", "Fig. 4", "fine-tuning with the first K blocks frozen, every model"),
        PaperOutput("fig5_decapitation", "Fig. 5", "the DeiT head on the tokens of each block (decapitation)"),
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


def outputs_of(protocol: str, options: Mapping, model: str, img_size: int | None = None) -> list[str]:
    """The paper outputs an evaluation feeds.

    ``options`` are a grid job's options or a result's ``settings`` (the same names: ``pool``, ``layer`` or
    ``layers``, ``freeze``, ``drop_after``; ``paper_feature`` when the runner recorded it; ``model_b`` and
    ``same_model`` for CKA; ``across_models`` for the grid's pairwise CKA).
    """
    if options.get("train_fraction") or options.get("train_per_class") or options.get("train_subset"):
        return []  # label-efficiency runs train on subsets: the report's own curve, never a paper cell
    high = img_size is not None and img_size >= HIGH_RES
    out: list[str] = []
    layers = [str(x) for x in _as_list(options.get("layers", options.get("layer", "last")))]
    if protocol == "knn":
        out.append("fig2_knn")
    elif protocol == "probe_linear":
        paper = options.get("paper_feature")
        if paper is None:  # a job, or a result written before the runner recorded it; pool paper is last-layer only
            paper = _as_list(options.get("pool")) == ["paper"]
        if paper:
            out.append("table3_1024px" if high else "table1_frozen")
    elif protocol == "probe_deit":
        paper = options.get("paper_feature")
        if paper is None:
            paper = layers == ["paper"]
        if paper:
            out.append("table3_1024px" if high else "table1_frozen")
        if len(layers) > 1 or layers == ["all"]:
            out.append("fig5_decapitation")
    elif protocol.startswith("finetune"):
        freeze = freeze_of(options)
        if options.get("drop_after") is not None:
            out.append("fig5_decapitation")
        elif freeze == "none":
            out.append("table3_1024px" if high else "table2_unfrozen")
        elif freeze == "all":
            out.append("table3_1024px" if high else "table1_frozen")
        if freeze.isdigit() and options.get("drop_after") is None:
            out.append("fig4_freeze")
    elif protocol == "cka":
        if options.get("across_models") or (options.get("model_b") and options.get("model_b") != model):
            out.append("fig8_cka_models")
        elif options.get("same_model") or options.get("model_b") == model:
            out.append("fig7_cka_finetune")
    if model in MODEL_SIZE_FAMILY and any(o in ("table1_frozen", "table2_unfrozen") for o in out):
        out.append("fig6_model_size")
    if protocol != "cka" and out:
        out.append("fig3_time")
    return out
