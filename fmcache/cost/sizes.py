"""A dataset's size for the cost estimate: its split sizes, classes and stored image size, counted from the root
where it exists, else from the official release's image count split by the dataset's own rule (a dry run needs no
data)."""

from __future__ import annotations

from pathlib import Path

from fmcache.cost.estimate import DataSize
from fmcache.cost.rates import Log
from fmcache.errors import FmcacheError

# Where no root is at hand the official release is split by the loaders' own rules (:func:`_official_split`); the
# datasets' typical stored image size in megapixels (the decode cost): APTOS ~2400 × 1700 PNG, CBIS-DDSM full
# mammograms as PNG (~3000 × 4000, downsampled in the seed's lists: assumed 4 MPx), ISIC 2019 ~1024 × 768 JPEG,
# CheXpert-v1.0-small ~390 × 320 JPEG.
# The external sets (assumed from their releases' usual sizes): PAD-UFES-20 smartphone photos ~1-3 MPx, HAM10000
# 600 × 450, Messidor-2 up to 2240 × 1488, IDRiD 4288 × 2848, EyePACS ~3 MPx, ChestX-ray14 1024 × 1024,
# MIMIC-CXR-JPG ~2500 × 3000, CMMD and VinDr-Mammo full-field DICOM ~4-10 MPx.
TYPICAL_MPX = {
    "aptos2019": 4.0,
    "cbis_ddsm": 4.0,
    "isic2019": 0.8,
    "chexpert": 0.125,
    "pad_ufes20": 2.0,
    "ham10000": 0.27,
    "messidor2": 2.5,
    "idrid": 12.2,
    "eyepacs": 3.0,
    "chestxray14": 1.05,
    "mimic_cxr": 7.0,
    "cmmd": 4.4,
    "vindr_mammo": 9.0,
}
DIGITS_PX = 32  # prepare: digits writes 32 × 32 scans (fmcache.data.digits)


def _official_split(name: str, n: int) -> tuple[tuple[int, int, int], str]:
    from fmcache.data import aptos, chexpert, isic  # deferred: torch, torchvision
    from fmcache.data.index import TEST, TRAIN, VAL, split_counts  # deferred: torch, torchvision

    seed_holdout = {aptos.NAME: aptos.SEED_HOLDOUT, isic.NAME: isic.SEED_HOLDOUT}
    if name in seed_holdout:  # the seed's val_size: the held-out rows, halved into val and test
        hold = int(n * seed_holdout[name])
        return (n - hold, hold // 2, hold - hold // 2), ""
    if name == chexpert.NAME:  # the seed's split: the first int(0.2 n) + 15 rows held out, halved
        codes = chexpert.seed_split(n)
        return (int((codes == TRAIN).sum()), int((codes == VAL).sum()), int((codes == TEST).sum())), ""
    return split_counts(n, (0.8, 0.1, 0.1)), "split 80/10/10 assumed"


def _sample_mpx(paths, limit: int = 16) -> float | None:
    """Mean megapixels of up to ``limit`` images spread over the dataset (headers only)."""
    from PIL import Image

    step = max(1, len(paths) // limit)
    sizes = []
    for path in list(paths)[::step][:limit]:
        try:
            with Image.open(path) as image:
                sizes.append(image.size[0] * image.size[1] / 1e6)
        except (OSError, ValueError):
            continue
    return sum(sizes) / len(sizes) if sizes else None


def dataset_sizes(datasets: list[dict], log: Log) -> dict[str, DataSize | None]:
    """Split sizes per dataset entry of a grid (``name``, ``root``, options): counted where the root exists, else the official release's count split by the
    dataset's own rule (said in one line each); None where no count is known."""
    from fmcache.data.index import split_counts  # deferred: torch, torchvision
    from fmcache.data.registry import DATASETS, load_dataset  # deferred: torch, torchvision

    sizes: dict[str, DataSize | None] = {}
    for data in datasets:
        name, root = data["name"], Path(data["root"])
        spec = DATASETS.get(name)
        official = getattr(spec, "official_images", None)
        classes = getattr(spec, "classes", None)
        limit = int(data["limit"]) if data.get("limit") else None
        size: DataSize | None = None
        if root.is_dir():
            options = {k: data[k] for k in ("split", "uncertain", "layout", "csv") if data.get(k) is not None}
            try:
                index = load_dataset(name, root, **options)
                counts = [int((index.split == code).sum()) for code in (0, 1, 2)]
                mpx = _sample_mpx(index.paths) or TYPICAL_MPX.get(name, 0.25)
                size = DataSize(*counts, index.num_classes, mpx)
            except FmcacheError as exc:
                log(
                    f"dataset {name}: {root} does not load ({str(exc).split(';')[0]}); planning from the official count"
                )
        elif data.get("prepare") == "digits":
            n = 10 * int(data.get("per_class") or 30)
            size = DataSize(*split_counts(n, (0.8, 0.1, 0.1)), 10, DIGITS_PX**2 / 1e6)
        if size is None:
            placeholder = str(root).startswith("/path/to") or "/path/to/" in str(root)
            why = "is still the placeholder" if placeholder else "does not exist"
            if official is None:
                log(f"dataset {name}: root {root} {why}; no official image count is known, so costs leave it out")
            else:
                counts, note = _official_split(name, official)
                if getattr(spec, "external", False) and data.get("split") in (None, "external"):
                    counts, note = (0, 0, official), "every image is test (an external set)"
                log(
                    f"dataset {name}: root {root} {why}; planning from the official release's {official:,} images"
                    + (f" ({note})" if note else "")
                )
                size = DataSize(*counts, classes or 2, TYPICAL_MPX.get(name, 0.25), note)
        if size is not None and limit is not None:
            size = DataSize(
                min(size.train, limit), min(size.val, limit), min(size.test, limit), size.classes, size.mpx, size.note
            )
        sizes[name] = size
    return sizes
