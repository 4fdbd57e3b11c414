"""Stage two's commands, from a cache: ``knn``, ``probe``, ``cka``, and their result tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fmcache.choices import CKA_SPLITS, DEIT_DEPTH
from fmcache.cli.app import BEST_EPOCH_HELP, app, cli_command, console, log_line, protocol_spec
from fmcache.config import load_config
from fmcache.frozen.specs import CkaSpec, KnnSpec, ProbeSpec, TokenProbeSpec, TransferSpec
from fmcache.protocols import head_protocol
from fmcache.runners import run

# -- stage two ---------------------------------------------------------------------------------------------------


# options that knn and probe share, declared once
TrainFraction = Annotated[
    str | None,
    typer.Option(help="Label efficiency: comma-separated train fractions (e.g. 0.01,0.1,1.0), one run each."),
]
TrainPerClass = Annotated[
    str | None, typer.Option(help="Label efficiency: train samples per class instead (e.g. 1,5,10).")
]
SubsetRepeats = Annotated[
    int | None,
    typer.Option(
        help=f"Label efficiency: subsets drawn per fraction, seeded 0..R-1 {KnnSpec.default_help('subset_repeats')}."
    ),
]
ValFractionFollows = Annotated[
    bool | None,
    typer.Option("--val-fraction-follows", help="Label efficiency: cut val like train (default: val stays full)."),
]
Plots = Annotated[bool | None, typer.Option("--plots/--no-plots", help="PNG plots beside the results.")]
Uncertain = Annotated[
    str | None,
    typer.Option(
        help="CheXpert-style uncertain labels from the cache's raw annotations: zeros (U-Zeros, the seed's; default), "
        "ones or ignore (masked out of the loss and the metric)."
    ),
]
Config = Annotated[Path | None, typer.Option(help="YAML file of these options; flags override it.")]


def print_folder(result: dict) -> None:
    """The result folder on a line of its own: in a table title it wraps mid-hash on an 80-column terminal."""
    console.print(f"→ {result['folder']}", markup=False, highlight=False, soft_wrap=True)


def print_knn(result: dict) -> None:
    table = Table(title=f"k-NN ({result['metric']})")
    extra = result["metric"] != "accuracy"  # accuracy is always reported; don't show it twice
    for col in ("layer", "split", "k", result["metric"], *(["accuracy"] if extra else [])):
        table.add_column(col)
    for row in result["rows"]:
        cells = [str(row["layer"]), row["split"], str(row["k"]), f"{row['value']:.4f}"]
        table.add_row(*cells, *([f"{row['accuracy']:.4f}"] if extra else []))
    console.print(table)
    print_folder(result)
    skipped = sorted({name for row in result["rows"] for name in row.get("skipped", "").split(";") if name})
    if skipped:  # never scored 0.5 silently: say which labels had a single class in some split
        console.print(
            f"[yellow]labels left out of the mean AUC in some split (one class only): {', '.join(skipped)}[/]"
        )


def print_probe(result: dict) -> None:
    table = Table(
        title=f"{result.get('head', 'linear')} probe ({result['metric']}, test mean ± std over seeds at the best val LR)"
    )
    for col in ("layer", "best lr", "val", "test", "train s"):
        table.add_column(col)
    for layer, r in result["layers"].items():
        table.add_row(
            str(layer),
            f"{r['best_lr']:g}",
            f"{r['val_mean']:.4f} ± {r['val_std']:.4f}",
            f"{r['test_mean']:.4f} ± {r['test_std']:.4f}",
            f"{r['timings']['train_seconds']:.1f}",
        )
        if "sklearn" in r:
            ref = r["sklearn"]
            table.add_row(str(layer), f"sklearn C={ref['best_C']:g}", f"{ref['val']:.4f}", f"{ref['value']:.4f}", "")
    console.print(table)
    print_folder(result)


@app.command("knn")
@cli_command
def knn_cmd(
    cache: Annotated[Path, typer.Argument(help="A cache directory (see `fmcache ls`).")],
    k: Annotated[
        str | None, typer.Option("--k", help="Comma-separated k values; one search at the largest serves all.")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help=f"Vote weight exp(sim/T) {KnnSpec.default_help('temperature')}; the seed used k=200, T=0.1."),
    ] = None,
    layer: Annotated[
        str | None, typer.Option(help=f"last, all or a 1-based layer number {KnnSpec.default_help('layer')}.")
    ] = None,
    pool: Annotated[
        str | None, typer.Option(help="auto (the model's paper feature), cls, mean, paper or cls+mean.")
    ] = None,
    eval: Annotated[str | None, typer.Option("--eval", help="Splits to evaluate: val, test or val,test.")] = None,
    metric: Annotated[str | None, typer.Option(help="Override the dataset's paper metric.")] = None,
    out: Annotated[Path | None, typer.Option(help=f"Results root {CkaSpec.default_help('out')}.")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Force the FAISS CPU index even when a GPU exists.")] = False,
    uncertain: Uncertain = None,
    train_fraction: TrainFraction = None,
    train_per_class: TrainPerClass = None,
    subset_repeats: SubsetRepeats = None,
    val_fraction_follows: ValFractionFollows = None,
    plots: Plots = None,
    config: Config = None,
) -> None:
    """Weighted k-NN from a cache (FAISS, exact inner product on L2-normalised features). Defaults: k
    10,20,100,200, T 0.07, the last layer."""
    flags = {
        "ks": k,
        "temperature": temperature,
        "layer": layer,
        "pool": pool,
        "eval_splits": eval,
        "metric": metric,
        "out": out,
        "use_gpu": False if cpu else None,
        "uncertain": uncertain,
        "plots": plots,
        "train_fraction": train_fraction,
        "train_per_class": train_per_class,
        "subset_repeats": subset_repeats,
        "val_fraction_follows": val_fraction_follows,
    }
    result = run("knn", protocol_spec("knn", config, flags, cache=cache), log=log_line)
    if "label_efficiency" in result:
        _print_label_efficiency(result)
        return
    print_knn(result)
    if result.get("views_note"):
        console.print(f"note: {result['views_note']}", markup=False)


@app.command("probe")
@cli_command
def probe_cmd(
    cache: Annotated[Path, typer.Argument(help="A cache directory (see `fmcache ls`).")],
    head: Annotated[
        str | None,
        typer.Option(help="linear (pooled features; default), deit (the seed's stacked DeiT-B) or attentive (tokens)."),
    ] = None,
    lrs: Annotated[
        str | None, typer.Option(help=f"Comma-separated learning rates {ProbeSpec.default_help('lrs')}.")
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(help=f"Seeds per learning rate: a count N (0..N-1) or a list {ProbeSpec.default_help('seeds')}."),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help=f"Epochs {ProbeSpec.default_help('epochs')}; the best epoch per head is chosen on val."),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help=f"Batch size {ProbeSpec.default_help('batch_size')}.")] = None,
    drop_last: Annotated[
        bool | None,
        typer.Option(
            "--drop-last/--keep-last", help="Drop the last partial train batch (default, as the seed's loader)."
        ),
    ] = None,
    layer: Annotated[
        str | None,
        typer.Option(
            help=f"last, all or a 1-based layer {ProbeSpec.default_help('layer')}; token heads also take lists such as 4,8,12."
        ),
    ] = None,
    pool: Annotated[str | None, typer.Option(help="Linear head: auto, cls, mean, paper or cls+mean.")] = None,
    metric: Annotated[str | None, typer.Option(help="Override the dataset's paper metric.")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help=f"AdamW weight decay {ProbeSpec.default_help('weight_decay')}.")
    ] = None,
    schedule: Annotated[
        str | None, typer.Option(help="After the linear warmup: constant (the seed's, the paper's code) or cosine.")
    ] = None,
    sklearn: Annotated[
        bool | None, typer.Option("--sklearn", help="Linear head: also fit scikit-learn LogisticRegression (C sweep).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    standardize: Annotated[
        bool | None,
        typer.Option(
            "--standardize/--no-standardize",
            help="Linear head: z-score features with train statistics (not the seed's: it trains on the raw feature) "
            f"{ProbeSpec.default_help('standardize')}.",
        ),
    ] = None,
    best_epoch: Annotated[str | None, typer.Option(help=BEST_EPOCH_HELP)] = None,
    head_weights: Annotated[
        str | None,
        typer.Option(help="DeiT head init: imagenet (timm's DeiT-B/16, the seed's; default) or a checkpoint FILE."),
    ] = None,
    head_random_init: Annotated[
        bool | None,
        typer.Option("--head-random-init", help="DeiT head: random init (explicit; reported in every output)."),
    ] = None,
    head_depth: Annotated[
        int | None,
        typer.Option(
            help=f"DeiT head: the first N blocks of DeiT-B (1..{DEIT_DEPTH}) {TokenProbeSpec.default_help('head_depth')}."
        ),
    ] = None,
    token_norm: Annotated[
        str | None,
        typer.Option(
            help=f"Tokens fed to token heads: seed (the seed's per model), none or final {TokenProbeSpec.default_help('token_norm')}."
        ),
    ] = None,
    preload: Annotated[
        str | None, typer.Option(help="Token heads: tokens in RAM: auto (when they fit), yes or no.")
    ] = None,
    heads_per_pass: Annotated[
        int | None, typer.Option(help="Token heads: at most N heads trained together (0: the whole grid).")
    ] = None,
    resume: Annotated[
        bool | None,
        typer.Option("--resume/--no-resume", help="Token heads: continue from the per-epoch checkpoint (default)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Token heads: DataLoader workers when tokens are streamed.")
    ] = None,
    plots: Plots = None,
    out: Annotated[Path | None, typer.Option(help=f"Results root {CkaSpec.default_help('out')}.")] = None,
    views: Annotated[
        str | None,
        typer.Option(help="Train on the cache's augmented views: on or off (default: on when the cache has them)."),
    ] = None,
    uncertain: Uncertain = None,
    train_fraction: TrainFraction = None,
    train_per_class: TrainPerClass = None,
    subset_repeats: SubsetRepeats = None,
    val_fraction_follows: ValFractionFollows = None,
    config: Config = None,
) -> None:
    """Train every LR × seed head at once from the cache (linear on pooled features; deit or attentive on tokens)."""
    flags = {k: v for k, v in locals().items() if k not in ("cache", "config", "head")}
    protocol = head_protocol("probe", head or str(load_config(config).get("head") or "linear"))
    spec = protocol_spec(protocol.name, config, flags, cache=cache)
    result = run(protocol.name, spec, progress=True, log=log_line)
    if "label_efficiency" in result:
        _print_label_efficiency(result)
        return
    if result.get("head_weights", {}).get("source") == "random" and spec.head == "deit":
        console.print("[bold yellow]the deit head started from random weights (--head-random-init)[/]")
    print_probe(result)
    if spec.head == "linear":
        _print_views(result)


def _print_label_efficiency(result: dict) -> None:
    """The curve: test (and val) mean ± std over repeats × seeds per train amount and layer, then where it went."""
    rows = result["rows"]
    axis = rows[0]["axis"] if rows else "fraction"
    table = Table(title=f"label efficiency, {result['protocol']} ({result['metric']}, mean ± std over repeats × seeds)")
    for col in (axis.replace("_", " "), "n train", "layer", "repeats", "val", "test"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            f"{r[axis]:g}",
            f"{r['n_train']:g}" if r["n_train"] is not None else "",
            str(r["layer"]),
            str(r["repeats"]),
            _mean_std(r["val_mean"], r["val_std"]),
            _mean_std(r["test_mean"], r["test_std"]),
        )
    console.print(table)
    console.print(
        f"→ {len(result['folders'])} result folders; curve: {result['label_efficiency']}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _mean_std(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean:.4f} ± {std or 0.0:.4f}"


def _print_views(result: dict) -> None:
    """Which inputs the heads trained on: cached augmented views, or center crops only."""
    used = result.get("views") or {}
    if used.get("used"):
        console.print(f"train: one of {used['k']} cached augmented views per sample per epoch; val/test: center crops")
    else:
        console.print("train, val and test: center crops (no augmented views)")


def print_cka(result: dict) -> None:
    kind = "debiased" if result["debiased"] else "biased"
    table = Table(title=f"linear CKA ({kind}, {result['estimator']}, n={result['n']})")
    table.add_column("A \\ B")
    for label in result["col_layers"]:
        table.add_column(str(label), justify="right")
    for label, values in zip(result["row_layers"], result["matrix"], strict=True):
        table.add_row(str(label), *(f"{v:.3f}" for v in values))
    console.print(table)
    print_folder(result)


@app.command("cka")
@cli_command
def cka_cmd(
    cache: Annotated[Path, typer.Argument(help="A cache directory (see `fmcache ls`).")],
    cache_b: Annotated[
        Path | None, typer.Argument(help="A second cache of the same samples: layers of A × layers of B.")
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help=f"all, last or 1-based layers such as 4,8,12 {CkaSpec.default_help('layers')}.")
    ] = None,
    layers_b: Annotated[str | None, typer.Option(help="Layers of the second cache (default: --layers).")] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help=f"auto, cls, mean, paper or tokens (the cached token maps, flattened) {CkaSpec.default_help('pool')}."
        ),
    ] = None,
    split: Annotated[str | None, typer.Option(help=f"{', '.join(CKA_SPLITS)} {CkaSpec.default_help('split')}.")] = None,
    estimator: Annotated[
        str | None, typer.Option(help="exact or minibatch (default: exact for pooled, minibatch for tokens).")
    ] = None,
    debiased: Annotated[
        bool | None, typer.Option("--debiased/--biased", help="Unbiased HSIC (default) or Kornblith 2019's biased CKA.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help=f"Minibatch estimator only: samples per batch {CkaSpec.default_help('batch_size')}."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help=f"Results root {CkaSpec.default_help('out')}.")] = None,
    plots: Annotated[
        bool | None, typer.Option("--plots/--no-plots", help="The heatmap PNG beside the results.")
    ] = None,
    config: Config = None,
) -> None:
    """Linear CKA between every pair of layers of one cache, or of two caches aligned by sample id."""
    flags = {k: v for k, v in locals().items() if k not in ("cache", "config")}
    result = run("cka", protocol_spec("cka", config, flags, cache=cache), log=log_line)
    print_cka(result)


# -- external validation -----------------------------------------------------------------------------------------


def print_transfer(result: dict) -> None:
    """Per target split: samples scored and the metric (mean ± std over seeds), the source's test metric beside."""
    source, summary = result["source"], result["summary"]
    title = f"transfer {source['dataset']} → {result['target']['dataset']} ({result['metric']}, mean ± std over seeds)"
    table = Table(title=title)
    for col in ("split", "n", result["metric"]):
        table.add_column(col)
    for split, entry in result["splits"].items():
        table.add_row(split, str(entry["n"]), _mean_std(entry["mean"], entry["std"]))
    source_cell = _mean_std(summary["source_test_mean"], summary["source_test_std"])
    table.add_row(f"source test ({source['dataset']})", "", source_cell)
    console.print(table)
    print_folder(result)


@app.command("transfer")
@cli_command
def transfer_cmd(
    result: Annotated[Path, typer.Argument(help="A knn or probe result folder (it holds result.json and its heads).")],
    target_cache: Annotated[Path, typer.Argument(help="The cache to score: same model, weights and transform.")],
    label_map: Annotated[
        Path | None,
        typer.Option(help="YAML map of target classes to source classes (default: the shipped map, or identity)."),
    ] = None,
    drop_overlap: Annotated[
        bool | None,
        typer.Option("--drop-overlap", help="Drop target samples found in the source's train/val instead of refusing."),
    ] = None,
    near_duplicate_bits: Annotated[
        int | None,
        typer.Option(
            help=f"Near duplicates: dHash within N bits (0..15) {TransferSpec.default_help('near_duplicate_bits')}."
        ),
    ] = None,
    source_cache: Annotated[
        Path | None, typer.Option(help="The source result's cache, when it moved (default: the path it records).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Results root (default: the source result's results tree).")] = None,
    metric: Annotated[str | None, typer.Option(help="Override the target dataset's paper metric.")] = None,
    uncertain: Uncertain = None,
    device: Annotated[str | None, typer.Option(help="Linear and token heads: auto, cpu or cuda.")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="k-NN: force the FAISS CPU index even when a GPU exists.")] = False,
    config: Config = None,
) -> None:
    """Score a frozen result's heads on another cache with no refit (external validation), leakage refused."""
    flags = {
        "result": result,
        "label_map": label_map,
        "drop_overlap": drop_overlap,
        "near_duplicate_bits": near_duplicate_bits,
        "source_cache": source_cache,
        "out": out,
        "metric": metric,
        "uncertain": uncertain,
        "device": device,
        "use_gpu": False if cpu else None,
    }
    answer = run("transfer", protocol_spec("transfer", config, flags, cache=target_cache), log=log_line)
    print_transfer(answer)


@app.command("label-map")
@cli_command
def label_map_cmd(
    source: Annotated[str, typer.Argument(help="The paper dataset the heads were trained on (e.g. isic2019).")],
    target: Annotated[str, typer.Argument(help="The external dataset (e.g. pad_ufes20).")],
) -> None:
    """Print the shipped label map from SOURCE to TARGET as YAML (a starting point for --label-map)."""
    from fmcache.data.label_maps import map_yaml, registry_map  # deferred: torch (the registry imports every loader)

    console.print(map_yaml(registry_map(source, target)), markup=False, highlight=False, soft_wrap=True, end="")
