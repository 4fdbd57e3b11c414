"""Fine-tuning's data path alone (a loader, no model), images/s per CPU core, as ratios measured in one run (issue 27).

(a) per dataset-like fixture with the real image sizes (APTOS-like 3216 x 2136 PNG, CBIS-DDSM-like 3000 x 5000
    16-bit PNG, ISIC-like 1024 x 768 JPEG, CheXpert-small-like 390 x 320 grayscale JPEG), one thread, no worker:
    - images: decode, resize, center crop, the seed's PIL augmentation, ToTensor, Normalize (fmcache's path before
      pixel caches, and the seed's), with where its time goes (decode / resize + crop / the random part);
    - pixels + CPU augmentation: the crop read from the pixel cache, then the same PIL steps (bit-identical);
    - pixels + device augmentation: uint8 crops read and collated by the loader, then ``DeviceAugment`` on the batch
      (here the CPU plays the device), and the loader alone (what the training process pays when the device is a
      GPU), from a warm page cache and a cold one (the shards evicted with posix_fadvise before the pass).
(b) read patterns on a pixel cache of 224 x 224 x 3 crops, one sample per chunk, shuffled batches of 64: item by
    item (``ds[row]``), item by item into one array (``read_direct``), one h5py fancy-index read of the batch's sorted
    rows, contiguous slices (sequential order, for reference), raw chunks (``read_direct_chunk``, no checksum); warm
    and cold.

Usage: ``python benchmarks/bench_pixels.py [--only a|b] [--n 6] [--reads 2048]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fmcache.cache.pixels import PixelReader
from fmcache.cache.shards import PIXELS, ShardWriter
from fmcache.data import load_dataset, load_image, train_augmentation
from fmcache.data.device_augment import DeviceAugment
from fmcache.data.pixels import CropDataset, CroppedImageDataset, prefix_spec, prefix_transform, transform_suffix
from fmcache.data.torch_dataset import ImageDataset
from fmcache.extract.pixel_spec import PixelSpec
from fmcache.extract.pixels import write_pixels

LIKE = {
    # name: (width, height, kind, suffix)
    "APTOS-like 3216x2136 PNG": (3216, 2136, "rgb", ".png"),
    "CBIS-DDSM-like 3000x5000 16-bit PNG": (3000, 5000, "gray16", ".png"),
    "ISIC-like 1024x768 JPEG": (1024, 768, "rgb", ".jpg"),
    "CheXpert-small-like 390x320 JPEG": (390, 320, "gray", ".jpg"),
}


def _image(width: int, height: int, kind: str, rng: np.random.Generator) -> Image.Image:
    """Smooth structure plus mild noise: compresses roughly as a scan or photograph does."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = (
        0.5
        + 0.25 * np.sin(xx / 97.0) * np.cos(yy / 131.0)
        + 0.2 * np.exp(-((xx - width / 2) ** 2 + (yy - height / 2) ** 2) / (0.1 * width * height))
    )
    if kind == "gray16":
        pixels = np.clip(base * 40000 + rng.normal(0, 600, base.shape), 0, 65535).astype(np.uint16)
        return Image.fromarray(pixels)
    noise = rng.normal(0, 6, (*base.shape, 3 if kind == "rgb" else 1))
    tint = np.array([1.0, 0.55, 0.3]) if kind == "rgb" else np.array([1.0])
    pixels = np.clip(base[..., None] * 255 * tint + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels if kind == "rgb" else pixels[..., 0])


def _folder(root: Path, n: int, spec: tuple, rng: np.random.Generator) -> Path:
    width, height, kind, suffix = spec
    for i in range(n):
        folder = root / ("a", "b")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        _image(width, height, kind, rng).save(
            folder / f"{i:03d}{suffix}", **({"quality": 95} if suffix == ".jpg" else {})
        )
    return root


def _rate(fn, items: int, repeats: int = 3) -> float:
    """Items per second, best of ``repeats`` passes (a shared machine's noise only slows a pass down)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def _evict(folder: Path) -> None:
    for path in folder.glob("shard-*.h5"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def section_a(args, work: Path) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    size, batch = 224, 64
    rows = [_fixture_row(args, work, name, spec, rng, size, batch) for name, spec in LIKE.items()]
    print(
        f"(a) data path alone, images/s on one core (torch threads 1, no loader worker), {size} px crops, batch {batch}"
    )
    head = ("fixture", "images (decode + PIL aug)", "pixels + CPU aug", "pixels + device aug", "device aug / images",
            "CPU aug / images", "loader alone, warm / cold")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['name']} | {r['images']:.1f} | {r['cpu']:.1f} | {r['device']:.0f} | {r['device'] / r['images']:.0f}x "
              f"| {r['cpu'] / r['images']:.1f}x | {r['warm']:,.0f} / {r['cold']:,.0f} ({r['channels']} ch) |")  # fmt: skip
    print("where the time goes, ms per image: images path = decode | resize + center crop | the random part (RRC, "
          "flips, jitter, ToTensor, Normalize); device path = loader (read + collate) | DeviceAugment; writing the "
          "pixel cache once (decode + crop + write)")  # fmt: skip
    for r in rows:
        print(
            f"  {r['name']}: {1e3 / r['decode']:.1f} | {1e3 / r['crop']:.1f} | {1e3 / r['random']:.1f}; "
            f"{1e3 / r['warm']:.2f} | {1e3 / r['augment']:.2f}; {r['write_s'] * 1e3:.1f}"
        )


def _fixture_row(args, work: Path, name: str, spec: tuple, rng, size: int, batch: int) -> dict:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    root = _folder(work / name.split()[0], args.n, spec, rng)
    index = load_dataset("imagefolder", root)
    positions = np.arange(len(index))
    train_tf = train_augmentation(size, mean, std)
    prefix = prefix_spec(size)
    crop_tf = prefix_transform(prefix)
    suffix = transform_suffix(train_tf, prefix)
    row = {"name": name}
    # the images path: decode + prefix + the random part, and where its time goes
    images = ImageDataset(index, positions, train_tf)
    row["decode"] = _rate(lambda: [load_image(p) for p in index.paths], len(index), 2)
    decoded = [load_image(p) for p in index.paths]
    row["crop"] = _rate(lambda: [crop_tf(im) for im in decoded], len(index), 2)
    crops = [crop_tf(im) for im in decoded] * 8
    row["random"] = _rate(lambda: [suffix(c) for c in crops], len(crops))
    row["images"] = _rate(lambda: [images[i] for i in range(len(images))], len(images), 2)
    # the pixel cache of these images (decoded once), and a larger copy of its crops for the read rates
    start = time.perf_counter()
    channels = "1" if spec[2] != "rgb" else "3"  # as fmcache stores CBIS-DDSM and CheXpert (grayscale datasets)
    folder = write_pixels(PixelSpec(dataset="imagefolder", data_root=root, img_size=size, cache_root=work / "cache",
                                    workers=0, channels=channels), progress=False, log=lambda m: None)  # fmt: skip
    row["write_s"] = (time.perf_counter() - start) / len(index)
    reader = PixelReader(folder)
    row["channels"] = reader.channels
    cpu_aug = CroppedImageDataset(index, positions, suffix, reader)
    row["cpu"] = _rate(lambda: [cpu_aug[i] for i in range(len(cpu_aug)) for _ in range(4)], 4 * len(cpu_aug))
    big = _replicate(reader, work / f"big-{name.split()[0]}", args.reads)
    loader = DataLoader(CropDataset(big.index, np.arange(args.reads), big), batch_size=batch, shuffle=True,
                        num_workers=0, drop_last=True)  # fmt: skip
    augment = DeviceAugment(size, mean, std)
    used = (args.reads // batch) * batch
    batches = [x for x, _ in loader][:4]
    row["augment"] = _rate(lambda: [augment(x.permute(0, 3, 1, 2), k) for k, x in enumerate(batches)],
                           len(batches) * batch, 2)  # fmt: skip
    row["warm"] = _rate(lambda: [None for _ in loader], used)
    _evict(big.folder)
    start = time.perf_counter()
    for _ in loader:
        pass
    row["cold"] = used / (time.perf_counter() - start)
    row["device"] = _rate(lambda: [augment(x.permute(0, 3, 1, 2), k) for k, (x, _) in enumerate(loader)], used, 1)
    return row


def _replicate(reader: PixelReader, folder: Path, n: int):
    """A pixel cache of ``n`` samples cycling through ``reader``'s crops (the real layout), for read rates."""
    folder.mkdir(parents=True, exist_ok=True)
    crops = np.stack([reader.read(i) for i in sorted(reader.where)])
    shard_size = 1024
    for shard in range(-(-n // shard_size)):
        ids = np.arange(shard * shard_size, min(n, (shard + 1) * shard_size))
        writer = ShardWriter(folder, shard, len(ids), {"key": "bench", "shard": shard}, None)
        for start in range(0, len(ids), 64):
            part = ids[start : start + 64]
            writer.append({"ids": part, PIXELS: crops[part % len(crops)]})
        writer.commit({})
    return _Synthetic(folder, n, crops.shape[1:])


class _Synthetic:
    """The reader's read path over a folder of shards without a manifest (the benchmark's larger copy)."""

    def __init__(self, folder: Path, n: int, shape: tuple):
        self.folder, self.shape = folder, shape
        self.files = {int(p.stem.split("-")[1]): p for p in folder.glob("shard-*.h5")}
        self.where = {i: (i // 1024, i % 1024) for i in range(n)}
        self._open: dict = {}
        self.index = _Index(n)

    def read(self, sample_id: int) -> np.ndarray:
        shard, row = self.where[int(sample_id)]
        ds = self._open.get(shard)
        if ds is None:
            ds = self._open[shard] = h5py.File(self.files[shard], "r", rdcc_nbytes=0)[PIXELS]
        return ds[row]


class _Index:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def section_b(args, work: Path) -> None:
    """Read patterns on a pixel cache of 224 x 224 x 3 crops."""
    rng = np.random.default_rng(0)
    n, batch = args.reads, 64
    folder = work / "reads"
    folder.mkdir(parents=True, exist_ok=True)
    shard_size = 1024
    for shard in range(-(-n // shard_size)):
        ids = np.arange(shard * shard_size, min(n, (shard + 1) * shard_size))
        writer = ShardWriter(folder, shard, len(ids), {"key": "bench", "shard": shard}, None)
        for start in range(0, len(ids), 64):
            part = ids[start : start + 64]
            writer.append({"ids": part, PIXELS: rng.integers(0, 255, (len(part), 224, 224, 3), dtype=np.uint8)})
        writer.commit({})
    files = [h5py.File(p, "r", rdcc_nbytes=0) for p in sorted(folder.glob("shard-*.h5"))]
    sets = [f[PIXELS] for f in files]
    order = rng.permutation(n)
    batches = [order[i : i + batch] for i in range(0, n - batch + 1, batch)]
    used = len(batches) * batch
    out = np.empty((batch, 224, 224, 3), np.uint8)

    def item():
        for b in batches:
            for k, i in enumerate(b):
                out[k] = sets[i // shard_size][i % shard_size]

    def direct():
        for b in batches:
            for k, i in enumerate(b):
                sets[i // shard_size].read_direct(out, np.s_[i % shard_size], np.s_[k])

    def fancy():
        for b in batches:
            for s in np.unique(b // shard_size):
                rows = np.sort(b[b // shard_size == s] % shard_size)
                sets[s][rows]

    def slices():
        for start in range(0, used, batch):
            s, row = start // shard_size, start % shard_size
            sets[s][row : row + batch]

    def raw():
        for b in batches:
            for i in b:
                sets[i // shard_size].id.read_direct_chunk((int(i % shard_size), 0, 0, 0))

    print(f"(b) read patterns: {n} crops 224x224x3 uint8, one sample per chunk (fletcher32), shuffled batches of "
          f"{batch}, one thread; images/s cold (shards evicted) / warm")  # fmt: skip
    for name, fn in (("item by item, ds[row]", item), ("item by item, read_direct into one array", direct),
                     ("one fancy-index read of the batch's sorted rows", fancy),
                     ("contiguous slices (sequential, for reference)", slices),
                     ("raw chunks, read_direct_chunk (no checksum, no decode)", raw)):  # fmt: skip
        _evict(folder)
        start = time.perf_counter()
        fn()
        cold = used / (time.perf_counter() - start)
        warm = _rate(fn, used)
        print(f"  {name}: {cold:,.0f} / {warm:,.0f}")
    for f in files:
        f.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("a", "b"), default=None)
    parser.add_argument("--n", type=int, default=6, help="(a): images per fixture")
    parser.add_argument("--reads", type=int, default=2048, help="crops in the read-rate caches")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        if args.only in (None, "b"):
            section_b(args, work)
        if args.only in (None, "a"):
            section_a(args, work)


if __name__ == "__main__":
    main()
