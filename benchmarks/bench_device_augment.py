"""The seed's random train augmentation on cached uint8 center crops: images/s per CPU core of each way to run it.

All paths start from the same uint8 batch (B, 3, S, S), as the pixel cache holds it, and end with a normalised
float32 batch (B, 3, S, S). Measured in one run, with one intra-op thread (``--threads``), best of ``--repeats``:

- **pil**: fmcache's CPU path today, per image: uint8 array → PIL image → ``train_augmentation(S)``'s random part
  (RandomResizedCrop, flips, RandomApply(ColorJitter), ToTensor, Normalize) → stacked;
- **tv2-float**: option (b), torchvision.transforms.v2 per sample on the float tensor (ToDtype first: the arithmetic
  DeviceAugment mirrors);
- **tv2-uint8**: the same v2 transforms on the uint8 tensor (ToDtype last: uint8 rounding between ops, like PIL);
- **device**: option (c), ``fmcache.data.device_augment.DeviceAugment`` on the CPU batch;
- **kornia**: option (a), kornia.augmentation on the float batch, if kornia is installed (a reference only: its
  crop sampler and jitter order are its own, not torchvision's);
- **device-cuda**: DeviceAugment on a CUDA batch, if a GPU is present: GPU images/s (synchronised), and the host's
  CPU time per batch to launch it, as images/s per core (the data path's CPU cost when the GPU augments).

Usage: ``python benchmarks/bench_device_augment.py [--batch 64] [--size 224] [--repeats 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmcache.data.device_augment import SEED_JITTER, SEED_JITTER_P, DeviceAugment  # noqa: E402
from fmcache.data.transforms import CROP_RATIO, CROP_SCALE, train_augmentation  # noqa: E402

MEAN, STD = (0.6678, 0.5296, 0.5243), (0.2238, 0.2036, 0.2154)  # ISIC's, from PROTOCOLS.md


def _batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): smooth colour gradients with noise, like a dermoscopy crop more than white noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2]).expand(n, 3, size, size)
    x = base * torch.rand(n, 3, 1, 1, generator=g) * 200 + 30 + torch.randn(n, 3, size, size, generator=g) * 12
    return x.clamp(0, 255).round().to(torch.uint8)


def _best_seconds(run: Callable[[int], object], repeats: int) -> float:
    run(0)  # warm-up: allocator, lazy inits
    best = float("inf")
    for r in range(1, repeats + 1):
        start = time.perf_counter()
        run(r)
        best = min(best, time.perf_counter() - start)
    return best


def _pil_path(images: torch.Tensor, size: int) -> Callable[[int], torch.Tensor]:
    from PIL import Image

    random_part = train_augmentation(size, MEAN, STD).transforms[2:]  # after Resize and CenterCrop (cached)
    arrays = [img.permute(1, 2, 0).numpy() for img in images]

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        out = []
        for array in arrays:
            x = Image.fromarray(array)
            for t in random_part:
                x = t(x)
            out.append(x)
        return torch.stack(out)

    return run


def _tv2_path(images: torch.Tensor, size: int, float_first: bool) -> Callable[[int], torch.Tensor]:
    import torchvision.transforms.v2 as v2

    to_float = [v2.ToDtype(torch.float32, scale=True)]
    steps = [
        v2.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
        v2.RandomVerticalFlip(0.5),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(*SEED_JITTER)], p=SEED_JITTER_P),
    ]
    transform = v2.Compose([*to_float, *steps] if float_first else [*steps, *to_float])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.stack([transform(img) for img in images]).sub_(mean).div_(std)

    return run


def _kornia_path(images: torch.Tensor, size: int) -> Callable[[int], torch.Tensor] | None:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    augment = torch.nn.Sequential(
        K.RandomResizedCrop((size, size), scale=CROP_SCALE, ratio=CROP_RATIO),
        K.RandomVerticalFlip(p=0.5),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(*SEED_JITTER, p=SEED_JITTER_P),
        K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
    )

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return augment(images.float().div_(255))

    return run


def _cuda_rates(images: torch.Tensor, size: int, repeats: int) -> tuple[float, float]:
    """(GPU images/s, host images/s per core spent launching) for DeviceAugment on a CUDA batch."""
    device = torch.device("cuda")
    on_gpu = images.to(device)
    augment = DeviceAugment(size, MEAN, STD)
    augment(on_gpu, 0)
    torch.cuda.synchronize()
    wall, host = float("inf"), float("inf")
    for r in range(1, repeats + 1):
        start, cpu = time.perf_counter(), time.process_time()
        augment(on_gpu, r)
        host = min(host, time.process_time() - cpu)
        torch.cuda.synchronize()
        wall = min(wall, time.perf_counter() - start)
    return len(images) / wall, len(images) / host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = _batch(args.batch, args.size)
    device_aug = DeviceAugment(args.size, MEAN, STD)
    paths: dict[str, Callable[[int], object] | None] = {
        "pil": _pil_path(images, args.size),
        "tv2-float": _tv2_path(images, args.size, float_first=True),
        "tv2-uint8": _tv2_path(images, args.size, float_first=False),
        "device": lambda seed: device_aug(images, seed),
        "kornia": _kornia_path(images, args.size),
    }
    print(f"batch {args.batch} of {args.size}x{args.size} uint8, {args.threads} thread(s), best of {args.repeats}")
    rates = {}
    for name, run in paths.items():
        if run is None:
            print(f"{name:12s} skipped (not installed)")
            continue
        rates[name] = args.batch / _best_seconds(run, args.repeats) / args.threads
        print(f"{name:12s} {rates[name]:8.0f} images/s per core   x{rates[name] / rates['pil']:.2f} of pil")
    if torch.cuda.is_available():
        gpu, host = _cuda_rates(images, args.size, args.repeats)
        print(f"{'device-cuda':12s} {gpu:8.0f} images/s on {torch.cuda.get_device_name()}; host launch cost "
              f"{host:.0f} images/s per core")  # fmt: skip


if __name__ == "__main__":
    main()
