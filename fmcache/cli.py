"""The ``fmcache`` command line: thin shells over the library (errors → one line, exit 2)."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import fmcache
from fmcache.errors import FmcacheError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Cache-first evaluation of foundation models.",
)
console = Console()
err_console = Console(stderr=True)
STATE = {"verbose": False}
# terminal escape sequences: OSC (titles, links), CSI (colours) and two-byte ones
_ANSI = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def cli_command(fn):
    """Run a command body; a user error prints one red line and exits 2 (``--verbose`` shows the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FmcacheError as exc:
            if STATE["verbose"]:
                traceback.print_exc()
            # messages built from foreign errors (torch, h5py) may carry colour codes and line breaks: one plain line
            message = " ".join(_ANSI.sub("", str(exc)).split())
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]; rerun the same command to resume")
            raise typer.Exit(code=130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"fmcache {fmcache.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks for errors.")] = False,
) -> None:
    """fmcache: extract frozen foundation-model features once, then evaluate from the cache in seconds."""
    STATE["verbose"] = STATE["verbose"] or verbose


# -- models / datasets -------------------------------------------------------------------------------------------


@app.command("models")
@cli_command
def models_cmd() -> None:
    """List every registered foundation: backend, pooled kind, layers, default size, local weights."""
    from fmcache.models import list_models, weights_available_locally
    from fmcache.models.registry import UNAVAILABLE

    table = Table(title="fmcache foundations")
    for col in ("name", "backend", "architecture", "pooled", "layers", "size", "local weights", "notes"):
        table.add_column(col, overflow="fold", no_wrap=col == "name")
    for spec in list_models():
        local = "yes" if weights_available_locally(spec) else ("needs --weights" if not spec.hub else "no")
        arch = spec.arch + (
            f".{spec.tag}" if spec.tag and spec.backend == "timm" else f":{spec.tag}" if spec.tag else ""
        )
        notes = f"{spec.notes}. {spec.paper_weights}" if spec.paper_weights else spec.notes
        table.add_row(
            spec.name, spec.backend, arch, spec.pooled, str(spec.layers), str(spec.default_img_size), local, notes
        )
    for name, why in UNAVAILABLE.items():
        table.add_row(name, "-", "-", "-", "-", "-", "unavailable", why.split(":")[0])
    console.print(table)
    console.print("Any other model: timm:<name>, open_clip:<arch>[:<tag>], hf:<repo>")


SPLIT_HELP = (
    "Split mode. aptos2019, isic2019: seed (default: the paper's row shuffle, or <data-root>/val_ids.json) or "
    "random; isic2019 also lesion (by lesion_id). cbis_ddsm: official (default) or patient (TCIA layout). "
    "chexpert: seed (default) or patient. Any dataset: file:FILE.csv (written by datasets --export-split)."
)


DATASET_FLAGS = ("uncertain", "split", "layout", "csv")


def _config_and_flags(
    spec_cls: type, config: Path | None, flags: dict, path_keys: tuple[str, ...]
) -> tuple[dict, dict]:
    """A command's options from ``--config`` YAML overridden by its flags: (spec fields, dataset options).

    Dataset options may come as flags, as top-level YAML keys or under ``dataset_options``; flags win.
    """
    from fmcache.config import load_config, merge

    dataset_flags = {k: flags.pop(k, None) for k in DATASET_FLAGS}
    allowed = {f.name for f in fields(spec_cls)} | set(DATASET_FLAGS)
    merged = merge({}, load_config(config), flags, allowed, source=str(config))
    options = {**merged.pop("dataset_options", {})}
    options.update(_dataset_options(*(merged.pop(k, None) for k in DATASET_FLAGS)))
    options.update(_dataset_options(*(dataset_flags[k] for k in DATASET_FLAGS)))
    for key in path_keys:
        if merged.get(key) is not None:
            merged[key] = Path(merged[key])
    return merged, options


def _dataset_options(uncertain: str | None, split: str | None, layout: str | None, csv: str | None) -> dict:
    opts = {"uncertain": uncertain, "split": split, "layout": layout, "csv": csv}
    return {k: v for k, v in opts.items() if v is not None}


@app.command("datasets")
@cli_command
def datasets_cmd(
    dataset: Annotated[str, typer.Option(help="aptos2019, cbis_ddsm, isic2019, chexpert, csv or imagefolder")],
    data_root: Annotated[Path, typer.Option(help="Folder laid out like the official release.")],
    uncertain: Annotated[str | None, typer.Option(help="CheXpert uncertain labels: zeros, ones or ignore.")] = None,
    split: Annotated[str | None, typer.Option(help=SPLIT_HELP)] = None,
    layout: Annotated[str | None, typer.Option(help="CBIS-DDSM layout: auto, lists or tcia.")] = None,
    csv: Annotated[str | None, typer.Option(help="CSV manifest file name for --dataset csv.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    export_split: Annotated[
        Path | None,
        typer.Option(help="Also write the split as CSV (id,path,split,label); read it back with --split file:FILE."),
    ] = None,
) -> None:
    """Describe a dataset found on disk: counts per split and class, and problems."""
    from fmcache.data import describe, format_description, load_dataset, write_split_csv

    index = load_dataset(dataset, data_root, **_dataset_options(uncertain, split, layout, csv))
    desc = describe(index)
    _warn_empty_split(index)
    if export_split is not None:
        desc["exported_split"] = str(write_split_csv(index, export_split))
    if as_json:
        print(json.dumps(desc, indent=2, default=str))
    else:
        console.print(format_description(desc))
        if export_split is not None:
            console.print(f"split of {len(index)} samples written to {desc['exported_split']}", markup=False)


def _warn_empty_split(index) -> None:
    """The warning `extract` turns into an error (stderr, so --json output stays parseable)."""
    from fmcache.data.describe import SPLITS, empty_split_warning

    warning = empty_split_warning(index.name, {s: len(index.indices(s)) for s in SPLITS})
    if warning:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


# -- extract / info / ls -----------------------------------------------------------------------------------------


@app.command("extract")
@cli_command
def extract_cmd(
    dataset: Annotated[str | None, typer.Option(help="Dataset name (see `fmcache datasets`).")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder in the official layout.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Registry name or timm:/open_clip:/hf: (see `fmcache models`).")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Local weights file (safetensors or torch state dict).")] = None,
    random_init: Annotated[bool | None, typer.Option("--random-init", help="Use random weights, on purpose.")] = None,
    img_size: Annotated[int | None, typer.Option(help="Input size; position embeddings are interpolated.")] = None,
    resize: Annotated[
        int | None, typer.Option(help="Resize before the center crop (default img_size·256/224).")
    ] = None,
    norm: Annotated[str | None, typer.Option(help="Normalisation: dataset (the seed's) or model.")] = None,
    gray: Annotated[
        str | None,
        typer.Option(help="Grayscale scans: repeat (3 equal channels) or seed (red-channel kernel, as the seed)."),
    ] = None,
    tokens: Annotated[str | None, typer.Option(help="Token layers to cache: none, last, all or e.g. 4,8,12.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Storage dtype: fp16 or fp32.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per forward pass.")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers decoding images.")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Samples per HDF5 shard.")] = None,
    cache_root: Annotated[Path | None, typer.Option(help="Root folder of all caches.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of these options; flags override it.")] = None,
    limit: Annotated[int | None, typer.Option(help="Cache only the first N samples of each split.")] = None,
    on_bad_image: Annotated[str | None, typer.Option(help="error (default) or skip (listed in the manifest).")] = None,
    compression: Annotated[str | None, typer.Option(help="Optional HDF5 compression: gzip or lzf.")] = None,
    compile: Annotated[bool | None, typer.Option("--compile", help="torch.compile the model (GPU).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    uncertain: Annotated[str | None, typer.Option(help="CheXpert uncertain labels: zeros, ones or ignore.")] = None,
    split: Annotated[str | None, typer.Option(help=SPLIT_HELP)] = None,
    layout: Annotated[str | None, typer.Option(help="CBIS-DDSM layout: auto, lists or tcia.")] = None,
    csv: Annotated[str | None, typer.Option(help="CSV manifest file name for --dataset csv.")] = None,
    fingerprint: Annotated[
        str | None, typer.Option(help="Dataset identity in the key: stat (path, size, mtime) or content (bytes).")
    ] = None,
    verify: Annotated[
        bool | None, typer.Option("--verify", help="Hash-check every finished shard first (as `fmcache verify`).")
    ] = None,
    allow_empty_split: Annotated[
        bool | None, typer.Option("--allow-empty-split", help="Extract even when train, val or test is empty.")
    ] = None,
    views: Annotated[
        str | None,
        typer.Option(help="K seeded augmented views of every train image, besides its center crop (default 0)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Run a frozen foundation once over a dataset and write the keyed, resumable HDF5 cache."""
    # parsed here, not by typer, so a bad value is one line (ExtractSpec names the rule) rather than a usage box
    views = int(views) if views is not None and views.strip().lstrip("-").isdigit() else views  # type: ignore[assignment]
    flags = {k: v for k, v in locals().items() if k not in ("config", "quiet")}
    from fmcache.extract import ExtractSpec, run_extract

    merged, options = _config_and_flags(ExtractSpec, config, flags, ("data_root", "weights", "cache_root"))
    for required in ("dataset", "data_root", "model"):
        if merged.get(required) is None:
            raise FmcacheError(f"--{required.replace('_', '-')} is required (as a flag or in --config)")
    spec = ExtractSpec(**merged, dataset_options=options)
    folder = run_extract(spec, progress=not quiet, log=lambda m: err_console.print(m))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line for the whole job
        console.print(str(folder), markup=False, highlight=False, soft_wrap=True)


@app.command("info")
@cli_command
def info_cmd(cache: Annotated[Path, typer.Argument(help="A cache directory.")]) -> None:
    """Summarise a cache: model, weights, key inputs, shapes, splits, size, time per image and status."""
    from fmcache.cache.info import format_info

    console.print(format_info(cache), highlight=False, soft_wrap=True)


@app.command("ls")
@cli_command
def ls_cmd(cache_root: Annotated[Path, typer.Option(help="Root folder of all caches.")] = Path("cache")) -> None:
    """List every cache under the cache root."""
    from fmcache.cache.info import list_caches

    rows = list_caches(cache_root)
    if not rows:
        console.print(f"no caches under {cache_root}")
        return
    table = Table(title=f"caches under {cache_root}")
    columns = ("dataset", "model", "weights", "images", "status", "size", "path")
    for col in columns:
        table.add_column(col, overflow="fold", no_wrap=col != "path")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    console.print(table)


@app.command("verify")
@cli_command
def verify_cmd(
    cache: Annotated[Path, typer.Argument(help="A cache directory (see `fmcache ls`).")],
    repair: Annotated[
        bool, typer.Option("--repair", help="Move damaged shards to damaged/ and mark the cache partial.")
    ] = False,
) -> None:
    """Check every shard against the manifest: exists, size, sha256, opens, datasets and shapes (exit 2 if damaged)."""
    from fmcache.cache.info import human_bytes
    from fmcache.cache.verify import OK, damage_error, repair_cache, repair_message, verify_cache

    report = verify_cache(cache, full=True)
    table = Table(title=f"shards of {cache}")
    for col in ("shard", "rows", "size", "state", "problem"):
        table.add_column(col, overflow="fold", no_wrap=col != "problem")
    for c in report.checks:
        state = {OK: "[green]ok[/]", "damaged": "[bold red]damaged[/]"}.get(c.state, c.state)
        size = human_bytes(c.size) if c.size is not None else "-"
        table.add_row(c.file, "-" if c.n is None else str(c.n), size, state, escape(c.problem))
    console.print(table)
    if not report.damaged:
        status = report.manifest.get("status")
        pending = f"; {len(report.pending)} shard(s) not extracted yet" if report.pending else ""
        console.print(f"{len(report.checks) - len(report.pending)} shard(s) ok, cache {status}{pending}", markup=False)
        return
    if not repair:
        raise damage_error(report)
    moved = repair_cache(report)
    console.print(repair_message(report, moved), markup=False, highlight=False, soft_wrap=True)


# -- stage two ---------------------------------------------------------------------------------------------------


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FmcacheError(f"bad {what} '{text}'; give comma-separated numbers, e.g. 1e-5,1e-4") from None
    if not values:
        raise FmcacheError(f"{what} is empty")
    return values


def _ints(text: str, what: str) -> list[int]:
    values = _floats(text, what)
    if any(v != int(v) or v < 1 for v in values):
        raise FmcacheError(f"bad {what} '{text}'; give positive integers, e.g. 10,20,100,200")
    return [int(v) for v in values]


def _print_knn(result: dict) -> None:
    table = Table(title=f"k-NN ({result['metric']}) → {result['folder']}")
    extra = result["metric"] != "accuracy"  # accuracy is always reported; don't show it twice
    for col in ("layer", "split", "k", result["metric"], *(["accuracy"] if extra else [])):
        table.add_column(col)
    for row in result["rows"]:
        cells = [str(row["layer"]), row["split"], str(row["k"]), f"{row['value']:.4f}"]
        table.add_row(*cells, *([f"{row['accuracy']:.4f}"] if extra else []))
    console.print(table)
    skipped = sorted({name for row in result["rows"] for name in row.get("skipped", "").split(";") if name})
    if skipped:  # never scored 0.5 silently: say which labels had a single class in some split
        console.print(
            f"[yellow]labels left out of the mean AUC in some split (one class only): {', '.join(skipped)}[/]"
        )


def _print_probe(result: dict) -> None:
    table = Table(
        title=f"{result.get('head', 'linear')} probe ({result['metric']}, test mean ± std over seeds at the best val LR)"
        f" → {result['folder']}"
    )
    for col in ("layer", "best lr", "val", "test", "train s"):
        table.add_column(col)
    for layer, r in result["layers"].items():
        table.add_row(
            str(layer), f"{r['best_lr']:g}", f"{r['val_mean']:.4f} ± {r['val_std']:.4f}",
            f"{r['test_mean']:.4f} ± {r['test_std']:.4f}", f"{r['timings']['train_seconds']:.1f}",
        )  # fmt: skip
        if "sklearn" in r:
            ref = r["sklearn"]
            table.add_row(str(layer), f"sklearn C={ref['best_C']:g}", f"{ref['val']:.4f}", f"{ref['value']:.4f}", "")
    console.print(table)


@app.command("knn")
@cli_command
def knn_cmd(
    cache: Annotated[Path, typer.Argument(help="A cache directory (see `fmcache ls`).")],
    k: Annotated[
        str, typer.Option("--k", help="Comma-separated k values; one search at the largest serves all.")
    ] = "10,20,100,200",
    temperature: Annotated[float, typer.Option(help="Vote weight exp(sim/T); the seed used k=200, T=0.1.")] = 0.07,
    layer: Annotated[str, typer.Option(help="last, all or a 1-based layer number.")] = "last",
    pool: Annotated[str, typer.Option(help="auto (the model's paper feature), cls, mean, paper or cls+mean.")] = "auto",
    eval: Annotated[str, typer.Option("--eval", help="Splits to evaluate: val, test or val,test.")] = "val,test",
    metric: Annotated[str | None, typer.Option(help="Override the dataset's paper metric.")] = None,
    out: Annotated[Path, typer.Option(help="Results root.")] = Path("results"),
    cpu: Annotated[bool, typer.Option("--cpu", help="Force the FAISS CPU index even when a GPU exists.")] = False,
    plots: Annotated[bool, typer.Option(help="Write PNG plots next to the JSON/CSV results.")] = True,
) -> None:
    """Weighted k-NN from a cache (FAISS, exact inner product on L2-normalised features)."""
    from fmcache.cache.reader import CacheReader
    from fmcache.frozen.run import run_knn

    reader = CacheReader(cache)
    result = run_knn(
        reader, out, _ints(k, "--k"), temperature, layer, pool, eval.split(","), metric,
        use_gpu=False if cpu else None, plots=plots,
    )  # fmt: skip
    _print_knn(result)
    if result.get("views_note"):
        console.print(f"note: {result['views_note']}")


@app.command("probe")
@cli_command
def probe_cmd(
    cache: Annotated[Path, typer.Argument(help="A cache directory (see `fmcache ls`).")],
    head: Annotated[
        str, typer.Option(help="linear (pooled features), deit (the seed's stacked DeiT-B) or attentive (tokens).")
    ] = "linear",
    lrs: Annotated[str, typer.Option(help="Comma-separated learning rates.")] = "1e-5,3e-5,1e-4,1e-3",
    seeds: Annotated[int, typer.Option(help="Seeds per learning rate (0..N-1).")] = 5,
    epochs: Annotated[int, typer.Option(help="Epochs; the best epoch per head is chosen on val.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    layer: Annotated[
        str, typer.Option(help="last, all or a 1-based layer; token heads also take lists such as 4,8,12.")
    ] = "last",
    pool: Annotated[str, typer.Option(help="Linear head: auto, cls, mean, paper or cls+mean.")] = "auto",
    metric: Annotated[str | None, typer.Option(help="Override the dataset's paper metric.")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-5,
    schedule: Annotated[
        str, typer.Option(help="After the linear warmup: constant (the seed's, the paper's code) or cosine.")
    ] = "constant",
    sklearn: Annotated[
        bool, typer.Option("--sklearn", help="Also fit scikit-learn LogisticRegression (C sweep).")
    ] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    standardize: Annotated[
        bool, typer.Option(help="Linear head: z-score features with train statistics before the heads.")
    ] = True,
    head_weights: Annotated[
        str | None,
        typer.Option(help="DeiT head init: imagenet (timm's DeiT-B/16, the seed's; default) or a checkpoint FILE."),
    ] = None,
    head_random_init: Annotated[
        bool, typer.Option("--head-random-init", help="DeiT head: random init (explicit; reported in every output).")
    ] = False,
    head_depth: Annotated[int, typer.Option(help="DeiT head: the first N blocks of DeiT-B (1..12).")] = 12,
    token_norm: Annotated[
        str, typer.Option(help="Tokens fed to token heads: seed (the seed's per model), none (pre-norm) or final.")
    ] = "seed",
    preload: Annotated[str, typer.Option(help="Token heads: tokens in RAM: auto (when they fit), yes or no.")] = "auto",
    heads_per_pass: Annotated[
        int, typer.Option(help="Token heads: at most N heads trained together (0: the whole grid).")
    ] = 0,
    resume: Annotated[
        bool, typer.Option(help="Token heads: continue from the per-epoch checkpoint of the same command.")
    ] = True,
    workers: Annotated[int, typer.Option(help="Token heads: DataLoader workers when tokens are streamed.")] = 2,
    plots: Annotated[bool, typer.Option(help="Write PNG plots next to the JSON/CSV results.")] = True,
    out: Annotated[Path, typer.Option(help="Results root.")] = Path("results"),
    views: Annotated[
        str | None,
        typer.Option(help="Train on the cache's augmented views: on or off (default: on when the cache has them)."),
    ] = None,
) -> None:
    """Train every LR × seed head at once from the cache (linear on pooled features; deit or attentive on tokens)."""
    from fmcache.cache.reader import CacheReader

    reader = CacheReader(cache)
    if head in ("deit", "attentive"):
        from fmcache.frozen.run_tokens import run_token_probe

        result = run_token_probe(
            reader, out, head, _floats(lrs, "--lrs"), seeds, epochs, batch_size, layer, metric, weight_decay,
            schedule, head_weights, head_random_init, head_depth, token_norm, preload, heads_per_pass, resume,
            workers, device, progress=True, plots=plots, views=views,
        )  # fmt: skip
        if head == "deit" and result["head_weights"]["source"] == "random":
            console.print(f"[bold yellow]the {head} head started from random weights (--head-random-init)[/]")
        _print_probe(result)
        return
    from fmcache.frozen.run import run_probe

    result = run_probe(
        reader, out, head, _floats(lrs, "--lrs"), seeds, epochs, batch_size, layer, pool, metric,
        weight_decay, schedule, sklearn, device, standardize, progress=True, plots=plots, views=views,
    )  # fmt: skip
    _print_probe(result)
    _print_views(result)


def _print_views(result: dict) -> None:
    """Which inputs the heads trained on: cached augmented views, or center crops only."""
    used = result.get("views") or {}
    if used.get("used"):
        console.print(f"train: one of {used['k']} cached augmented views per sample per epoch; val/test: center crops")
    else:
        console.print("train, val and test: center crops (no augmented views)")


def _print_cka(result: dict) -> None:
    kind = "debiased" if result["debiased"] else "biased"
    table = Table(title=f"linear CKA ({kind}, {result['estimator']}, n={result['n']}) → {result['folder']}")
    table.add_column("A \\ B")
    for label in result["col_layers"]:
        table.add_column(str(label), justify="right")
    for label, values in zip(result["row_layers"], result["matrix"], strict=True):
        table.add_row(str(label), *(f"{v:.3f}" for v in values))
    console.print(table)


@app.command("cka")
@cli_command
def cka_cmd(
    cache: Annotated[Path, typer.Argument(help="A cache directory (see `fmcache ls`).")],
    cache_b: Annotated[
        Path | None, typer.Argument(help="A second cache of the same samples: layers of A × layers of B.")
    ] = None,
    layers: Annotated[str, typer.Option(help="all, last or 1-based layers such as 4,8,12.")] = "all",
    layers_b: Annotated[str | None, typer.Option(help="Layers of the second cache (default: --layers).")] = None,
    pool: Annotated[
        str, typer.Option(help="auto, cls, mean, paper or tokens (the cached token maps, flattened).")
    ] = "auto",
    split: Annotated[str, typer.Option(help="test, val, train or all.")] = "test",
    estimator: Annotated[
        str | None, typer.Option(help="exact or minibatch (default: exact for pooled, minibatch for tokens).")
    ] = None,
    debiased: Annotated[
        bool, typer.Option("--debiased/--biased", help="Unbiased HSIC (default) or Kornblith 2019's biased CKA.")
    ] = True,
    batch_size: Annotated[int, typer.Option(help="Minibatch estimator only: samples per batch.")] = 256,
    out: Annotated[Path, typer.Option(help="Results root.")] = Path("results"),
    plots: Annotated[bool, typer.Option(help="Write the heatmap PNG next to the JSON/CSV results.")] = True,
) -> None:
    """Linear CKA between every pair of layers of one cache, or of two caches aligned by sample id."""
    from fmcache.cache.reader import CacheReader
    from fmcache.frozen.run import run_cka

    reader = CacheReader(cache)
    reader_b = None if cache_b is None else CacheReader(cache_b)
    result = run_cka(reader, reader_b, out, layers, layers_b, pool, split, estimator, debiased, batch_size, plots=plots)
    _print_cka(result)


def _print_finetune(result: dict) -> None:
    table = Table(
        title=f"fine-tuning ({result['metric']}, test mean ± std over seeds at the best val LR) → {result['folder']}"
    )
    for col in ("layer", "best lr", "val", "test", "train s/epoch", "effective batch"):
        table.add_column(col)
    for layer, r in result["layers"].items():
        t = r["timings"]
        table.add_row(
            str(layer), f"{r['best_lr']:g}", f"{r['val_mean']:.4f} ± {r['val_std']:.4f}",
            f"{r['test_mean']:.4f} ± {r['test_std']:.4f}", f"{t['train_s_per_epoch']:.2f}", str(t["effective_batch_size"]),
        )  # fmt: skip
    console.print(table)


FINETUNE_FREEZE_HELP = (
    "none | all | K. none: every block trains; all: frozen foundation (online baseline); K: blocks 1..K frozen "
    "(run under no_grad). Patch/position embedding and the final norm are frozen whenever any block is, as in the seed."
)


@app.command("finetune")
@cli_command
def finetune_cmd(
    dataset: Annotated[str | None, typer.Option(help="Dataset name (see `fmcache datasets`).")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder in the official layout.")] = None,
    model: Annotated[str | None, typer.Option(help="Registry name (see `fmcache models`).")] = None,
    weights: Annotated[Path | None, typer.Option(help="Local foundation weights file.")] = None,
    random_init: Annotated[
        bool | None, typer.Option("--random-init", help="Random foundation weights (the same as extract's).")
    ] = None,
    head: Annotated[str | None, typer.Option(help="linear (on the pooled feature) or deit (stacked DeiT-B).")] = None,
    head_weights: Annotated[
        str | None, typer.Option(help="DeiT head: imagenet (default, the seed's DeiT-B/16) or a weights FILE.")
    ] = None,
    head_random_init: Annotated[
        bool | None, typer.Option("--head-random-init", help="DeiT head with random weights, on purpose.")
    ] = None,
    head_depth: Annotated[int | None, typer.Option(help="Blocks of the DeiT head (the seed's 12).")] = None,
    freeze: Annotated[str | None, typer.Option(help=FINETUNE_FREEZE_HELP)] = None,
    drop_after: Annotated[
        int | None, typer.Option(help="Decapitate: stop after block I; its tokens / pooled feature feed the head.")
    ] = None,
    lrs: Annotated[str | None, typer.Option(help="Comma-separated learning rates.")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per learning rate (0..N-1).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs; the best epoch is chosen on val.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size per process.")] = None,
    accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps.")] = None,
    img_size: Annotated[int | None, typer.Option(help="Input size.")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers.")] = None,
    schedule: Annotated[str | None, typer.Option(help="After warmup: constant (the seed's) or cosine.")] = None,
    clip: Annotated[float | None, typer.Option(help="Gradient-norm clipping (0: off).")] = None,
    amp: Annotated[str | None, typer.Option(help="auto (bf16 on GPU, off on CPU), bf16, fp16 or off.")] = None,
    layer_decay: Annotated[float | None, typer.Option(help="Layer-wise LR decay (1.0: none, the seed's).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay on weights.")] = None,
    norm: Annotated[str | None, typer.Option(help="Normalisation: dataset (the seed's) or model.")] = None,
    gray: Annotated[str | None, typer.Option(help="Grayscale scans: repeat or seed.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N samples of each split.")] = None,
    metric: Annotated[str | None, typer.Option(help="Override the dataset's paper metric.")] = None,
    out: Annotated[Path | None, typer.Option(help="Runs root.")] = None,
    resume: Annotated[
        bool | None, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint (default).")
    ] = None,
    from_cache: Annotated[
        Path | None, typer.Option(help="Train blocks K+1.. and the head from this cache's layer-K tokens.")
    ] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard", help="Also log to TensorBoard.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    uncertain: Annotated[str | None, typer.Option(help="CheXpert uncertain labels: zeros, ones or ignore.")] = None,
    split: Annotated[str | None, typer.Option(help=SPLIT_HELP)] = None,
    layout: Annotated[str | None, typer.Option(help="CBIS-DDSM layout: auto, lists or tcia.")] = None,
    csv: Annotated[str | None, typer.Option(help="CSV manifest file name for --dataset csv.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of these options; flags override it.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Fine-tune a foundation end to end (unfrozen, first K blocks frozen, or decapitated) with a linear or DeiT head.

    Patch/position embedding and the final norm are frozen whenever any block is frozen.
    """
    flags = {k: v for k, v in locals().items() if k not in ("config", "quiet")}
    from fmcache.finetune.run import FinetuneSpec, run_finetune

    merged, options = _config_and_flags(FinetuneSpec, config, flags, ("data_root", "weights", "out", "from_cache"))
    if isinstance(merged.get("lrs"), str):
        merged["lrs"] = tuple(_floats(merged["lrs"], "--lrs"))
    elif merged.get("lrs") is not None:
        merged["lrs"] = tuple(_floats(",".join(str(v) for v in merged["lrs"]), "--lrs"))
    if merged.get("freeze") is not None:
        merged["freeze"] = str(merged["freeze"])
    if merged.get("head_weights") is not None:
        merged["head_weights"] = str(merged["head_weights"])
    spec = FinetuneSpec(**merged, dataset_options=options)
    result = run_finetune(spec, progress=not quiet, log=lambda m: err_console.print(m))
    if int(os.environ.get("RANK", "0")) == 0:
        _print_finetune(result)


@app.command("report")
@cli_command
def report_cmd(
    results: Annotated[Path, typer.Argument(help="A results tree (fmcache grid / evaluations write it).")] = Path(
        "results"
    ),
    out: Annotated[Path, typer.Option(help="Folder for the report's files.")] = Path("report"),
    format: Annotated[
        str, typer.Option(help="Comma-separated: md, csv, tex, html (Markdown and CSV are always written).")
    ] = "md,csv,tex,html",
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for CIs and paired tests.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """The paper's tables (mean ± std, bootstrap CIs, paired tests), figures and one HTML page from a results tree."""
    from fmcache.report.render import build_report, parse_formats

    report = build_report(results, out, parse_formats(format), resamples, seed)
    console.print(f"{report['n_results']} result(s) → {len(report['files'])} file(s) in {report['out']}", markup=False)
    for path in report["files"]:
        console.print(f"  {path}", markup=False, highlight=False, soft_wrap=True)


@app.command("grid")
@cli_command
def grid_cmd(
    config: Annotated[Path, typer.Argument(help="Grid YAML (see configs/paper.yaml, configs/demo_grid.yaml).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan: jobs per kind, done, cost.")] = False,
    executor: Annotated[str, typer.Option(help="local (this machine) or slurm (submitit).")] = "local",
    only: Annotated[
        str | None, typer.Option(help="Comma-separated job kinds, models or datasets to keep, e.g. extract,knn.")
    ] = None,
    results: Annotated[Path | None, typer.Option(help="Results root (overrides the YAML's).")] = None,
    cache_root: Annotated[Path | None, typer.Option(help="Cache root (overrides the YAML's).")] = None,
    jobs: Annotated[int, typer.Option(help="local: N jobs at once, as subprocesses with one GPU each.")] = 1,
    slurm_partition: Annotated[str | None, typer.Option(help="slurm: partition.")] = None,
    gpus_per_job: Annotated[int, typer.Option(help="slurm: GPUs per job.")] = 1,
    time: Annotated[int, typer.Option(help="slurm: time limit per job, minutes.")] = 240,
    logs: Annotated[Path | None, typer.Option(help="Per-job logs (default: <results>/grid_logs).")] = None,
) -> None:
    """Expand a YAML experiment into extract → protocol jobs, skip finished ones, run the rest locally or on Slurm."""
    from fmcache.report.grid import GridOptions, run_grid

    options = GridOptions(dry_run=dry_run, executor=executor, only=only, results=results, cache_root=cache_root,
                          jobs=jobs, slurm_partition=slurm_partition, gpus_per_job=gpus_per_job, time_min=time,
                          logs=logs)  # fmt: skip
    run_grid(config, options, log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True))


@app.command("demo")
@cli_command
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, cache and results.")] = Path("demo_out"),
    model: Annotated[str, typer.Option(help="Registry model to extract (random weights offline).")] = "resnet50",
    img_size: Annotated[int, typer.Option(help="Input size.")] = 32,
    epochs: Annotated[int, typer.Option(help="Linear-probe epochs.")] = 30,
) -> None:
    """Offline demo: scikit-learn digits → extract → info → k-NN → linear probe → CKA."""
    from fmcache.cache.info import format_info
    from fmcache.demo import run_demo

    result = run_demo(out, model, img_size, epochs=epochs, log=lambda m: err_console.print(m))
    console.print(format_info(result["cache"]), highlight=False, soft_wrap=True)
    _print_knn(result["knn"])
    _print_probe(result["probe"])
    _print_cka(result["cka"])


def main() -> None:
    """Console-script entry point; ``--verbose`` is accepted anywhere on the command line."""
    if "--verbose" in sys.argv[1:] or "-v" in sys.argv[1:]:
        STATE["verbose"] = True
        sys.argv = [a for a in sys.argv if a not in ("--verbose", "-v")]
    app()
