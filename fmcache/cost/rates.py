"""What a device achieves, for the grid's cost: :class:`Rates`, the GPU presets, ``--device-rate``, and where
counts and calibrations are kept.

Rates come from ``fmcache calibrate`` (:mod:`fmcache.cost.calibrate`, a micro-benchmark kept per device in
``calibration.json``) or from a preset built from a GPU's published dense peak and an assumed utilisation
(:data:`PRESETS`: estimates, and labelled so).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from fmcache import __version__
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_text

Log = Callable[[str], None]

# -- where counts and calibrations are kept --------------------------------------------------------------------------


def _cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fmcache"


def calibration_path() -> Path:
    """``$FMCACHE_CALIBRATION``, else ``~/.cache/fmcache/calibration.json`` (one entry per device name)."""
    env = os.environ.get("FMCACHE_CALIBRATION")
    return Path(env) if env else _cache_home() / "calibration.json"


def fmcache_version() -> str:
    return str(__version__)


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_json(path: Path, doc: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home only costs the next dry run a recount


# -- rates ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """What a device achieves; every estimate is FLOPs and bytes divided by these, plus fixed costs."""

    label: str
    fwd: float  # foundation inference, FLOP/s (bf16 autocast on GPU, fp32 on CPU)
    train: float  # training, FLOP/s (forward + backward counted as 3 × the forward of what trains)
    fwd_conv: float  # the same two for convolutional networks
    train_conv: float
    fp32: float  # k-NN search and the linear heads
    fp64: float  # CKA's float64 cross-products
    step_s: float  # fixed cost of one optimizer step of one model or head (launches, Python)
    opt_s_per_param: float  # gradient buffers, clipping and AdamW, per trained parameter per step
    opt_s_per_tensor: float  # fine-tuning's AdamW (torch's default: one tensor at a time on a CPU), per tensor per step
    linear_step_s: float  # one step of the batched linear grid (every head at once), beyond its FLOPs
    metric_s: float  # one val (or test) metric of one head
    decode_s: float  # one image's resize, crop and normalisation at 224 px on one worker (scales with the output)
    decode_s_per_mpx: float  # reading and decoding, per megapixel of the stored image
    augment_s: float  # the train augmentation of one image at 224 px (scales with the output's pixels)
    io_bytes_s: float  # disk
    build_s_per_param: float  # building a model (init or weights read), per parameter
    job_s: float  # fixed cost of one job (result files, plots)
    overlap: bool = True  # data loading overlaps compute (GPU); on a CPU the workers share its cores
    source: str = ""
    # a pixel cache (fmcache pixels): one cached 224 x 224 x 3 crop read and collated by a loader worker (HDF5 chunk
    # and its checksum; scales with the crop's bytes), and the seed's augmentation of one 224 px image drawn on the
    # batch on the device (DeviceAugment; scales with the output's pixels). Defaults, so a calibration written before
    # they existed still reads: this CPU's measurement (bench_pixels.py) and an assumed GPU figure.
    pixel_read_s: float = 1.2e-4
    device_augment_s: float = 3.0e-5

    def describe(self) -> str:
        return f"{self.label} ({self.source})" if self.source else self.label


# Published dense (no sparsity) peak rates; the estimate assumes UTILISATION of the bf16 peak for transformer
# inference and training, CONV_UTILISATION for convolutional networks, and FP_UTILISATION of the fp32/fp64 peaks.
UTILISATION, CONV_UTILISATION, FP_UTILISATION, BW_UTILISATION = 0.40, 0.25, 0.5, 0.5
GPUS = {
    # name: (label, bf16 dense TFLOP/s, fp32 TFLOP/s, fp64 tensor TFLOP/s, HBM TB/s)
    "h200": ("H200 SXM", 989.0, 67.0, 67.0, 4.8),
    "h100": ("H100 SXM", 989.0, 67.0, 67.0, 3.35),
    "a100": ("A100 SXM 80GB", 312.0, 19.5, 19.5, 2.04),
}
# The host side of a GPU preset (data path, metrics, disk, job start-up), assumed for a server CPU: the decode and
# augmentation figures are per DataLoader worker (about 20 ms per megapixel to read, decode and resize a PNG or JPEG,
# 4 ms for the train augmentation at 224 px); a job's `workers` run in parallel with the GPU.
HOST = {
    "decode_s": 2.0e-3,
    "decode_s_per_mpx": 2.0e-2,
    "augment_s": 4.0e-3,
    "metric_s": 1.0e-3,
    "io_bytes_s": 2.0e9,  # a local NVMe disk
    "build_s_per_param": 2.0e-9,  # a weights file read at ~2 GB/s
    "job_s": 20.0,  # process start, imports, CUDA context, plots
    "step_s": 1.0e-3,  # kernel launches and Python of one AdamW step with clipping
    "opt_s_per_tensor": 1.0e-6,  # torch's default AdamW on CUDA works on all tensors at once
    "linear_step_s": 1.0e-3,
    "pixel_read_s": 1.0e-4,  # a warm page cache (the paper's pixel caches fit a server's RAM at 224 px)
    # the augmentation on the GPU: a few kernels per sample (the crop's resize) and per batch (the colour ops),
    # assumed 30 us per 224 px image; benchmarks/gpu_check.sh measures the epoch it is part of
    "device_augment_s": 3.0e-5,
}


def preset(name: str) -> Rates:
    label, bf16, fp32, fp64, hbm = GPUS[name]
    return Rates(
        label=label,
        fwd=bf16 * 1e12 * UTILISATION,
        train=bf16 * 1e12 * UTILISATION,
        fwd_conv=bf16 * 1e12 * CONV_UTILISATION,
        train_conv=bf16 * 1e12 * CONV_UTILISATION,
        fp32=fp32 * 1e12 * FP_UTILISATION,
        fp64=fp64 * 1e12 * FP_UTILISATION,
        opt_s_per_param=32 / (hbm * 1e12 * BW_UTILISATION),  # AdamW + clipping move ~32 bytes per fp32 parameter
        overlap=True,
        source=f"preset, an estimate: published dense bf16 peak {bf16:g} TFLOP/s x {UTILISATION:.0%} utilisation "
        f"(convolutions {CONV_UTILISATION:.0%}), fp32/fp64 {fp32:g}/{fp64:g} TFLOP/s x {FP_UTILISATION:.0%}, "
        f"{hbm:g} TB/s",
        **HOST,
    )


PRESETS = tuple(GPUS)


# rates an estimate divides by: zero would be a division by zero, so they must be > 0; every other number is a time
# (seconds per thing) and may be 0
THROUGHPUTS = ("fwd", "train", "fwd_conv", "train_conv", "fp32", "fp64", "io_bytes_s")
TEXT_FIELDS = ("label", "source")


def read_calibrations(path: Path) -> dict[str, dict]:
    """The calibrations kept in ``path``, device name → measured entry ({} without a file). A file that does not
    parse, or an entry that is not an object, is one line naming the file and the entry."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        why = " ".join(str(exc).split())[:80]
        raise FmcacheError(f"{path} is not a calibration file ({why}); run `fmcache calibrate` or remove it") from None
    if not isinstance(doc, dict):
        raise FmcacheError(f"{path} is not a calibration file (not an object of device: rates); remove it")
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise FmcacheError(
                f"{path}: calibration '{name}' is {type(entry).__name__} {entry!r:.40}, not an object of rates; "
                "run `fmcache calibrate` on that device again or remove the entry"
            )
    return doc


def _rates_from(entry: dict, label: str, path: Path) -> Rates:
    """The rates of a calibration entry, every field checked: a number (finite; a throughput > 0, a time >= 0)."""
    names = {f.name for f in fields(Rates)}
    values = {k: v for k, v in entry.items() if k in names and k not in TEXT_FIELDS}
    optional = {f.name for f in fields(Rates) if f.default is not MISSING}  # later additions keep their default
    missing = sorted(names - set(values) - {*TEXT_FIELDS} - optional)
    if missing:
        raise FmcacheError(f"{path}: calibration '{label}' lacks {', '.join(missing)}; run `fmcache calibrate` again")
    for name, value in values.items():
        if not _good_rate(name, value):
            need = "a bool" if name == "overlap" else "a number > 0" if name in THROUGHPUTS else "a number >= 0"
            raise FmcacheError(
                f"{path}: calibration '{label}' has {name} = {value!r:.40}, not {need} (finite); run `fmcache "
                "calibrate` on that device again or remove the entry"
            )
    when = entry.get("measured_at", "?")
    return Rates(**{**values, "label": label, "source": f"fmcache calibrate, {when}"})


def _good_rate(name: str, value: object) -> bool:
    if name == "overlap":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 if name in THROUGHPUTS else value >= 0


def device_name(device: str | None = None) -> str:
    """The name a calibration is kept under: the GPU's name, or the CPU's model and thread count."""
    import torch

    from fmcache.dist import pick_device  # deferred: torch

    dev = pick_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def resolve_rates(choice: str | None, log: Log) -> Rates:
    """``--device-rate``: a preset (h200, h100, a100), a FLOP/s number, a calibrated device name or a calibration
    file; None: this machine's calibration if there is one, else the H200 preset (said in one line)."""
    home = calibration_path()
    doc = read_calibrations(home)
    if choice is None:
        here = device_name()
        if here in doc:
            return _rates_from(doc[here], here, home)
        log(
            f"no calibration for this machine ({here}) in {calibration_path()}: `fmcache calibrate` measures it; "
            "estimating on the H200 preset instead (--device-rate chooses)"
        )
        return preset("h200")
    text = str(choice).strip()
    if text.lower() in GPUS:
        return preset(text.lower())
    try:
        flops = float(text)
    except ValueError:
        flops = None
    if flops is not None:
        if not (math.isfinite(flops) and flops > 0):  # 1e400 reads as inf: every estimate would be 0 s
            raise FmcacheError(f"--device-rate {text}: a rate must be a positive finite FLOP/s number, e.g. 4e14")
        base = preset("h200")
        return replace(
            base,
            label=f"{flops:.3g} FLOP/s",
            fwd=flops,
            train=flops,
            fwd_conv=flops,
            train_conv=flops,
            source="every FLOP rate as given; the rest as the H200 preset's (an estimate)",
        )
    if text in doc:
        return _rates_from(doc[text], text, home)
    path = Path(os.path.expanduser(text))
    if path.is_file():
        other = read_calibrations(path)
        if not other:
            raise FmcacheError(f"--device-rate {path}: not a calibration file (fmcache calibrate writes one)")
        name = next(iter(other))
        if len(other) > 1:
            log(f"--device-rate {path}: {len(other)} devices; using the first, {name}")
        return _rates_from(other[name], name, path)
    known = [*PRESETS, *doc]
    raise FmcacheError(
        f"--device-rate {text}: not a preset, a FLOP/s number, a calibrated device or a file; known: {', '.join(known)}"
    )
