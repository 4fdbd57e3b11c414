"""Commands that run or gather whole experiments: ``finetune``, ``report``, ``grid``, ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fmcache.cli.app import BEST_EPOCH_HELP, SPLIT_HELP, app, cli_command, console, log_line, protocol_spec
from fmcache.cli.stage_two import print_cka, print_folder, print_knn, print_probe
from fmcache.config import load_config
from fmcache.finetune.spec import FinetuneSpec
from fmcache.grid.config import GridOptions, parse_slurm_options
from fmcache.protocols import head_protocol
from fmcache.report.render import build_report, parse_formats
from fmcache.runners import run


def _print_finetune(result: dict) -> None:
    table = Table(title=f"fine-tuning ({result['metric']}, test mean ± std over seeds at the best val LR)")
    for col in ("layer", "best lr", "val", "test", "train s/epoch", "effective batch"):
        table.add_column(col)
    for layer, r in result["layers"].items():
        t = r["timings"]
        table.add_row(
            str(layer),
            f"{r['best_lr']:g}",
            f"{r['val_mean']:.4f} ± {r['val_std']:.4f}",
            f"{r['test_mean']:.4f} ± {r['test_std']:.4f}",
            f"{t['train_s_per_epoch']:.2f}",
            str(t["effective_batch_size"]),
        )
    console.print(table)
    print_folder(result)


FINETUNE_FREEZE_HELP = (
    "none | all | K. none: the whole foundation trains (paper Table 2). all: the foundation is frozen (the online "
    "frozen baseline). K (0..depth): blocks 1..K frozen, blocks K+1.. train, while the patch/position embedding, CLS "
    "and final norm stay frozen, as the seed's unfreeze_cutoff=K (paper Fig. 4); 0 trains every block but not those. "
    "Trainable parts run in train mode (dropout, drop-path, BatchNorm statistics), frozen parts in eval mode."
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
    method: Annotated[
        str | None,
        typer.Option(
            help="full (every weight of the trainable parts, the paper's) or lora (peft adapters in the "
            "trainable blocks; base weights frozen)."
        ),
    ] = None,
    lora_rank: Annotated[
        int | None, typer.Option(help=f"LoRA rank r {FinetuneSpec.default_help('lora_rank')}.")
    ] = None,
    lora_alpha: Annotated[
        float | None, typer.Option(help="LoRA alpha; the update is scaled by alpha / r (16).")
    ] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="Dropout on the LoRA branch's input (0).")] = None,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated module names inside a block (default: the attention qkv and output "
            "projection: attn.qkv,attn.proj for timm ViT/SAM, self_attn.qkv,self_attn.projection for BLIP; "
            "open_clip: mlp.c_fc,mlp.c_proj); a wrong name lists the ones that exist."
        ),
    ] = None,
    lrs: Annotated[str | None, typer.Option(help="Comma-separated learning rates.")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per learning rate (0..N-1).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs; the best epoch is chosen on val.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size per process.")] = None,
    drop_last: Annotated[
        bool | None,
        typer.Option(
            "--drop-last/--keep-last", help="Drop the last partial train batch (default, as the seed's loader)."
        ),
    ] = None,
    accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps.")] = None,
    img_size: Annotated[int | None, typer.Option(help="Input size.")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers.")] = None,
    schedule: Annotated[str | None, typer.Option(help="After warmup: constant (the seed's) or cosine.")] = None,
    clip: Annotated[float | None, typer.Option(help="Gradient-norm clipping (0: off).")] = None,
    best_epoch: Annotated[str | None, typer.Option(help=BEST_EPOCH_HELP)] = None,
    eval_precision: Annotated[
        str | None,
        typer.Option(help="Val/test forwards: auto (as --amp), fp32 (the seed tests in fp32), bf16 or fp16."),
    ] = None,
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
    pixels: Annotated[
        str | None,
        typer.Option(
            help="Read the resized center crops from a pixel cache (`fmcache pixels`) under --cache-root: auto "
            "(when one matches; default), on (refuse without one, naming what differs) or off (decode the images)."
        ),
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            help="The random train augmentation: cpu (PIL in the loader, the seed's; default) or device (on the "
            "uint8 batch where the model runs: the same distribution, not the same pixels)."
        ),
    ] = None,
    cache_root: Annotated[Path | None, typer.Option(help="Where --pixels looks for pixel caches.")] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            help=f"Seconds between last.pt writes {FinetuneSpec.default_help('checkpoint_every')}; 0: every epoch. "
            "Always after the last epoch and on SIGTERM."
        ),
    ] = None,
    uncertain: Annotated[str | None, typer.Option(help="CheXpert uncertain labels: zeros, ones or ignore.")] = None,
    split: Annotated[str | None, typer.Option(help=SPLIT_HELP)] = None,
    layout: Annotated[str | None, typer.Option(help="CBIS-DDSM layout: auto, lists or tcia.")] = None,
    csv: Annotated[str | None, typer.Option(help="CSV manifest file name for --dataset csv.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of these options; flags override it.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Fine-tune a foundation end to end (unfrozen, first K blocks frozen, or decapitated) with a linear or DeiT head.

    Patch/position embedding, CLS and the final norm train only with --freeze none, as in the seed.
    """
    flags = {k: v for k, v in locals().items() if k not in ("config", "quiet")}
    from fmcache.dist import is_main_process  # deferred: torch

    protocol = head_protocol("finetune", flags.get("head") or str(load_config(config).get("head") or "linear"))
    spec = protocol_spec(protocol.name, config, flags)
    result = run(protocol.name, spec, progress=not quiet, log=log_line)
    if is_main_process():
        _print_finetune(result)
        if result.get("lora"):
            lora, size = result["lora"], result.get("checkpoint_bytes")
            console.print(
                f"LoRA r={lora['rank']} on {', '.join(lora['targets'])} of blocks {lora['blocks'][0]}.."
                f"{lora['blocks'][1]}: {lora['adapter_parameters']:,} adapter parameters, "
                f"{result['trainable_parameters']:,} trainable with the head; checkpoint "
                f"{size if size is None else f'{size / 1e6:.2f} MB'}",
                markup=False,
            )


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
    resamples: Annotated[
        int, typer.Option(help="Bootstrap resamples for CIs, paired tests, rank intervals and subgroup CIs.")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="A result file that cannot be used (damaged, breaks the contract) is an error, not skipped.",
        ),
    ] = False,
    by: Annotated[
        str | None,
        typer.Option(
            help="Subgroup tables by these per-sample metadata columns, comma-separated, e.g. sex,age_bin,view "
            "(age_bin: from age or age_approx); a column no result carries is an error naming those available."
        ),
    ] = None,
    subgroups: Annotated[
        Path | None,
        typer.Option(
            help="Subgroups from a YAML file instead of --by: by: [sex, age_bin], datasets: {chexpert: [sex, view]} "
            "(per dataset), age_edges: [0, 40, 60, 80], min_size: 30."
        ),
    ] = None,
) -> None:
    """The paper's tables (mean ± std), their evidence (CIs at the patient level, paired tests, DeLong, calibration,
    subgroups, rankings with critical differences), figures and one HTML page from a results tree."""
    report = build_report(
        results,
        out,
        parse_formats(format),
        resamples,
        seed,
        log=log_line,
        strict=strict,
        by=by,
        subgroups=subgroups,
        progress=True,
    )
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
    slurm_partition: Annotated[str | None, typer.Option(help="slurm: partition (sinfo lists them).")] = None,
    slurm_account: Annotated[str | None, typer.Option(help="slurm: account to charge (sbatch --account).")] = None,
    slurm_qos: Annotated[str | None, typer.Option(help="slurm: quality of service (sbatch --qos).")] = None,
    slurm_option: Annotated[
        list[str] | None,
        typer.Option(help="slurm: any other sbatch flag as KEY=VALUE (or KEY), repeatable: mem=16G, constraint=a100."),
    ] = None,
    gpus_per_job: Annotated[
        int | None, typer.Option(help="slurm: GPUs per job (default: 1 if the cluster has GPU gres, else 0).")
    ] = None,
    time: Annotated[int, typer.Option(help="slurm: time limit per job, minutes.")] = 240,
    logs: Annotated[Path | None, typer.Option(help="Per-job logs (default: <results>/grid_logs).")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="A job running in another grid: wait for it instead of skipping it.")
    ] = False,
    device_rate: Annotated[
        str | None,
        typer.Option(
            help="--dry-run: estimate time on h200, h100 or a100 (published peak x assumed utilisation), a FLOP/s "
            "number, a device or file that `fmcache calibrate` measured (default: this machine's calibration, else h200)."
        ),
    ] = None,
) -> None:
    """Expand a YAML experiment into extract → protocol jobs, skip finished ones, run the rest locally or on Slurm."""
    from fmcache.grid.main import run_grid  # deferred: h5py

    options = GridOptions(
        dry_run=dry_run,
        executor=executor,
        only=only,
        results=results,
        cache_root=cache_root,
        jobs=jobs,
        slurm_partition=slurm_partition,
        gpus_per_job=gpus_per_job,
        time_min=time,
        logs=logs,
        wait=wait,
        slurm_account=slurm_account,
        slurm_qos=slurm_qos,
        slurm_options=parse_slurm_options(slurm_option),
        device_rate=device_rate,
    )
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
    from fmcache.cache.info import format_info  # deferred: h5py
    from fmcache.demo import run_demo  # deferred: torch, torchvision

    result = run_demo(out, model, img_size, epochs=epochs, log=log_line)
    console.print(format_info(result["cache"]), highlight=False, soft_wrap=True)
    print_knn(result["knn"])
    print_probe(result["probe"])
    print_cka(result["cka"])
