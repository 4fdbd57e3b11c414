"""Commands around stage one: ``models``, ``datasets``, ``extract``, ``info``, ``ls``, ``verify``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fmcache.cli.app import (
    DATASET_HELP,
    SPLIT_HELP,
    app,
    build_spec,
    cli_command,
    console,
    dataset_options,
    err_console,
    log_line,
)
from fmcache.errors import FmcacheError
from fmcache.extract.pixel_spec import PixelSpec
from fmcache.extract.spec import ExtractSpec

# -- models / datasets -------------------------------------------------------------------------------------------


@app.command("models")
@cli_command
def models_cmd() -> None:
    """List every registered foundation: backend, pooled kind, layers, default size, local weights."""
    from fmcache.models import list_models, weights_available_locally  # deferred: torch
    from fmcache.models.registry import UNAVAILABLE  # deferred: torch

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


@app.command("datasets")
@cli_command
def datasets_cmd(
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)],
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
    from fmcache.data import describe, format_description, load_dataset, write_split_csv  # deferred: torch, torchvision

    index = load_dataset(dataset, data_root, **dataset_options(uncertain, split, layout, csv))
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
    from fmcache.data.describe import SPLITS, empty_split_warning  # deferred: torch, torchvision

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
    precision: Annotated[
        str | None,
        typer.Option(
            help="The forward's precision: auto (bf16 autocast on a GPU, fp32 on a CPU), fp16 (the seed's), "
            "bf16 or fp32; part of the cache key unless auto."
        ),
    ] = None,
    on_bad_image: Annotated[
        str | None,
        typer.Option(help=f"error or skip (listed in the manifest) {ExtractSpec.default_help('on_bad_image')}."),
    ] = None,
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
        typer.Option(
            help=f"K seeded augmented views of every train image, besides its center crop {ExtractSpec.default_help('views')}."
        ),
    ] = None,
    corrupt: Annotated[
        str | None,
        typer.Option(
            help="NAME:SEVERITY (1-5): a test-split cache of corrupted images for robustness curves, e.g. "
            "gaussian_noise:3 (`fmcache datasets` lists each modality's corruptions)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Run a frozen foundation once over a dataset and write the keyed, resumable HDF5 cache."""
    # parsed here, not by typer, so a bad value is one line (ExtractSpec names the rule) rather than a usage box
    views = int(views) if views is not None and views.strip().lstrip("-").isdigit() else views  # type: ignore[assignment]
    flags = {k: v for k, v in locals().items() if k not in ("config", "quiet")}
    from fmcache.dist import is_main_process  # deferred: torch
    from fmcache.extract.run import run_extract  # deferred: h5py, torch, torchvision

    spec = build_spec(ExtractSpec, config, flags)
    folder = run_extract(spec, progress=not quiet, log=log_line)
    if is_main_process():  # under torchrun, one line for the whole job
        console.print(str(folder), markup=False, highlight=False, soft_wrap=True)


@app.command("pixels")
@cli_command
def pixels_cmd(
    dataset: Annotated[str | None, typer.Option(help="Dataset name (see `fmcache datasets`).")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder in the official layout.")] = None,
    img_size: Annotated[
        int | None, typer.Option(help=f"The crop the model sees {PixelSpec.default_help('img_size')}.")
    ] = None,
    resize: Annotated[
        int | None, typer.Option(help="Resize before the center crop (default img_size·256/224).")
    ] = None,
    interpolation: Annotated[
        str | None, typer.Option(help="The resize's interpolation: bilinear (the seed's), bicubic, nearest, lanczos.")
    ] = None,
    channels: Annotated[
        str | None,
        typer.Option(
            help="Stored channels: auto (1 for a grayscale dataset, whose channels are equal; else 3), 1 or 3."
        ),
    ] = None,
    gray: Annotated[
        str | None, typer.Option(help="repeat or seed: checked against the dataset; it changes no stored byte.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per write.")] = None,
    workers: Annotated[
        int | None, typer.Option(help=f"Processes decoding images {PixelSpec.default_help('workers')}.")
    ] = None,
    shard_size: Annotated[int | None, typer.Option(help="Samples per HDF5 shard.")] = None,
    cache_root: Annotated[Path | None, typer.Option(help="Root folder of all caches.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples of each split.")] = None,
    verify: Annotated[
        bool | None, typer.Option("--verify", help="Hash-check every finished shard first (as `fmcache verify`).")
    ] = None,
    uncertain: Annotated[str | None, typer.Option(help="CheXpert uncertain labels: zeros, ones or ignore.")] = None,
    split: Annotated[str | None, typer.Option(help=SPLIT_HELP)] = None,
    layout: Annotated[str | None, typer.Option(help="CBIS-DDSM layout: auto, lists or tcia.")] = None,
    csv: Annotated[str | None, typer.Option(help="CSV manifest file name for --dataset csv.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of these options; flags override it.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be written (images, size, folder) and stop.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Decode every image once and store its resize + center crop as uint8 (a pixel cache for `finetune`).

    Fine-tuning (--pixels auto|on) and `extract --views` then read the crops instead of decoding full-size images
    every epoch; the same seed gives bit-identical batches (README "Fine-tuning").
    """
    flags = {k: v for k, v in locals().items() if k not in ("config", "quiet", "dry_run")}
    from fmcache.extract.pixels import PixelWriter, plan_pixels  # deferred: h5py, torch, torchvision

    spec = build_spec(PixelSpec, config, flags)
    plan = plan_pixels(spec, log=log_line)
    if dry_run:
        manifest = plan.cache.previous_manifest(quiet=True)
        state = "complete" if plan.cache.is_complete() else "partial" if manifest else "not written yet"
        console.print(f"{plan.describe()}; {state}", markup=False, highlight=False, soft_wrap=True)
        return
    folder = PixelWriter(plan, progress=not quiet, log=log_line).run()
    console.print(str(folder), markup=False, highlight=False, soft_wrap=True)


@app.command("info")
@cli_command
def info_cmd(cache: Annotated[Path, typer.Argument(help="A cache directory.")]) -> None:
    """Summarise a cache: model, weights, key inputs, shapes, splits, size, time per image and status."""
    from fmcache.cache.info import format_info  # deferred: h5py

    console.print(format_info(cache), highlight=False, soft_wrap=True)


@app.command("ls")
@cli_command
def ls_cmd(cache_root: Annotated[Path, typer.Option(help="Root folder of all caches.")] = Path("cache")) -> None:
    """List every cache under the cache root."""
    from fmcache.cache.info import list_caches  # deferred: h5py

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
    from fmcache.cache.info import human_bytes  # deferred: h5py
    from fmcache.cache.verify import OK, damage_error, repair_cache, repair_message, verify_cache  # deferred: h5py

    report = verify_cache(cache, full=True)
    table = Table(title=f"shards of {cache}")
    for col in ("shard", "rows", "size", "state", "problem"):
        table.add_column(col, overflow="fold", no_wrap=col != "problem")
    for c in report.checks:
        state = {OK: "[green]ok[/]", "damaged": "[bold red]damaged[/]"}.get(c.state, c.state)
        size = human_bytes(c.size) if c.size is not None else "-"
        table.add_row(c.file, "-" if c.n is None else str(c.n), size, state, escape(c.problem))
    console.print(table)
    if report.annotations:  # the per-sample annotations (raw labels, units, metadata) beside the shards
        raise FmcacheError(report.annotations)
    if not report.damaged:
        status = report.manifest.get("status")
        pending = f"; {len(report.pending)} shard(s) not extracted yet" if report.pending else ""
        console.print(f"{len(report.checks) - len(report.pending)} shard(s) ok, cache {status}{pending}", markup=False)
        return
    if not repair:
        raise damage_error(report)
    moved = repair_cache(report)
    console.print(repair_message(report, moved), markup=False, highlight=False, soft_wrap=True)
