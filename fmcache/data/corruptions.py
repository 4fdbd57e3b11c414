"""Image corruptions for robustness curves (``fmcache extract --corrupt NAME:SEVERITY``), by imaging modality.

The families, per-modality lists and severity parameters follow MedMNIST-C (Di Salvo et al. 2024, its registry of
corruptions per MedMNIST+ dataset: dermatoscopy → ``dermamnist``, fundus → ``retinamnist``, chest X-ray →
``chestmnist``); mammograms, which MedMNIST has not, take the chest X-ray list (both are X-ray projections), and
photographs / generic images the dermatoscopy list less its dermoscopy-only artefact. The implementations are
fmcache's own (numpy and PIL, no ImageMagick), so pixel values differ from MedMNIST-C's files; the parameters,
not the pixels, are what is shared. Left out: MedMNIST-C's text overlay (``characters``: needs fonts) and the
microscopy-only ones.

Where a corruption acts: on the model's input, after the eval transform's resize and center crop and before the
normalisation, so a severity means the same thing at every input size (MedMNIST-C's parameters are for 224 px).

Deterministic per (sample, corruption, severity): the random draws (noise, motion direction) come from a generator
seeded by a hash of the cropped image's bytes, the corruption and the severity, so a rerun, a resumed or a
distributed extraction corrupts every image bit for bit the same, without the sample id travelling with the image.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from fmcache.errors import FmcacheError

SEVERITIES = (1, 2, 3, 4, 5)
MODALITIES = ("dermatoscopy", "fundus", "xray", "photo")

# -- the corruptions: (H, W, 3) float32 in [0, 1] → same, with a generator for the random ones -----------------

Array = np.ndarray
Kernel = Callable[[Array, object, np.random.Generator], Array]


def _clip(x: Array) -> Array:
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _to_pil(x: Array) -> Image.Image:
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))


def _from_pil(image: Image.Image) -> Array:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def gaussian_noise(x: Array, sigma: float, rng: np.random.Generator) -> Array:
    return _clip(x + rng.normal(0.0, sigma, x.shape))


def speckle_noise(x: Array, sigma: float, rng: np.random.Generator) -> Array:
    return _clip(x + x * rng.normal(0.0, sigma, x.shape))


def impulse_noise(x: Array, amount: float, rng: np.random.Generator) -> Array:
    """Salt and pepper on ``amount`` of the pixel values, half each."""
    out = x.copy()
    hit = rng.random(x.shape) < amount
    out[hit] = (rng.random(int(hit.sum())) < 0.5).astype(np.float32)
    return out


def shot_noise(x: Array, photons: float, rng: np.random.Generator) -> Array:
    """Poisson noise at ``photons`` counts for a full-scale value (fewer photons: more noise)."""
    return _clip(rng.poisson(x * photons) / photons)


def pixelate(x: Array, factor: float, _rng: np.random.Generator) -> Array:
    """Down to ``factor`` of the side (box filter), back up by nearest neighbour."""
    image = _to_pil(x)
    w, h = image.size
    small = image.resize((max(1, int(w * factor)), max(1, int(h * factor))), Image.BOX)
    return _from_pil(small.resize((w, h), Image.NEAREST))


def jpeg_compression(x: Array, quality: int, _rng: np.random.Generator) -> Array:
    buffer = io.BytesIO()
    _to_pil(x).save(buffer, "JPEG", quality=int(quality))
    return _from_pil(Image.open(io.BytesIO(buffer.getvalue())))


def gaussian_blur(x: Array, kernel: int, _rng: np.random.Generator) -> Array:
    """A Gaussian of the given kernel size (sigma by OpenCV's rule for a size: 0.3·((k−1)/2 − 1) + 0.8)."""
    sigma = 0.3 * ((int(kernel) - 1) / 2 - 1) + 0.8
    return _from_pil(_to_pil(x).filter(ImageFilter.GaussianBlur(radius=sigma)))


def _convolve(x: Array, kernel: Array) -> Array:
    """Per-channel 2-D convolution with edge padding (FFT-free: the kernels are small)."""
    kh, kw = kernel.shape
    padded = np.pad(x, ((kh // 2, kh - 1 - kh // 2), (kw // 2, kw - 1 - kw // 2), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            if kernel[i, j]:
                out += kernel[i, j] * padded[i : i + x.shape[0], j : j + x.shape[1]]
    return out


def defocus_blur(x: Array, params: tuple[float, float], _rng: np.random.Generator) -> Array:
    """A disk of ``radius`` (the lens' circle of confusion), then a Gaussian of ``alias_blur`` to smooth its edge."""
    radius, alias_blur = params
    r = max(1, int(np.ceil(radius)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    out = _convolve(x, disk)
    return _from_pil(_to_pil(out).filter(ImageFilter.GaussianBlur(radius=alias_blur)))


def motion_blur(x: Array, params: tuple[float, float], rng: np.random.Generator) -> Array:
    """A line of ``radius`` pixels in a random direction, weighted by a Gaussian of ``sigma`` along it."""
    radius, sigma = params
    angle = rng.uniform(-45.0, 45.0)
    r = int(radius)
    t = np.arange(-r, r + 1, dtype=np.float32)
    weights = np.exp(-(t**2) / (2 * sigma**2))
    kernel = np.zeros((2 * r + 1, 2 * r + 1), dtype=np.float32)
    rad = np.deg2rad(angle)
    rows = np.rint(r + t * np.sin(rad)).astype(int)
    cols = np.rint(r + t * np.cos(rad)).astype(int)
    np.add.at(kernel, (rows, cols), weights)
    return _clip(_convolve(x, kernel / kernel.sum()))


def zoom_blur(x: Array, zooms: tuple[float, ...], _rng: np.random.Generator) -> Array:
    """The mean of the image and its center zooms by each factor (a camera zooming during the exposure)."""
    image = _to_pil(x)
    w, h = image.size
    out = x.copy()
    for z in zooms:
        big = image.resize((round(w * z), round(h * z)), Image.BILINEAR)
        left, top = (big.size[0] - w) // 2, (big.size[1] - h) // 2
        out += _from_pil(big.crop((left, top, left + w, top + h)))
    return _clip(out / (len(zooms) + 1))


def brightness(x: Array, factor: float, _rng: np.random.Generator) -> Array:
    return _clip(x * factor)


def contrast(x: Array, factor: float, _rng: np.random.Generator) -> Array:
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _clip((x - mean) * factor + mean)


def gamma(x: Array, value: float, _rng: np.random.Generator) -> Array:
    return _clip(np.power(x, value))


def black_corner(x: Array, radius: float, _rng: np.random.Generator) -> Array:
    """The dermatoscope's dark vignette: black outside a centred circle of ``radius`` × half the shorter side."""
    h, w = x.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    distance = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    inside = distance <= radius * min(h, w) / 2
    return (x * inside[..., None]).astype(np.float32)


KERNELS: dict[str, Kernel] = {
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "gaussian_noise": gaussian_noise,
    "speckle_noise": speckle_noise,
    "impulse_noise": impulse_noise,
    "shot_noise": shot_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "brightness_up": brightness,
    "brightness_down": brightness,
    "contrast_up": contrast,
    "contrast_down": contrast,
    "gamma_corr_up": gamma,
    "gamma_corr_down": gamma,
    "black_corner": black_corner,
}


def _zooms(top: float, step: float) -> tuple[float, ...]:
    return tuple(float(round(v, 4)) for v in np.arange(1.0, top + 1e-9, step))


# Severity parameters 1..5 per modality (MedMNIST-C's numbers for its matching dataset, see the module doc).
_DERMATOSCOPY: dict[str, tuple] = {
    "pixelate": (0.7, 0.5, 0.40, 0.30, 0.25),
    "jpeg_compression": (30, 20, 15, 10, 7),
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "speckle_noise": (0.05, 0.15, 0.2, 0.35, 0.45),
    "impulse_noise": (0.01, 0.03, 0.06, 0.09, 0.17),
    "shot_noise": (60, 25, 18, 10, 5),
    "defocus_blur": ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)),
    "motion_blur": ((10, 5), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": (_zooms(1.10, 0.01), _zooms(1.15, 0.01), _zooms(1.20, 0.02), _zooms(1.25, 0.02), _zooms(1.30, 0.03)),
    "brightness_up": (1.1, 1.2, 1.3, 1.4, 1.5),
    "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
    "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6),
    "contrast_down": (0.8, 0.7, 0.6, 0.5, 0.4),
    # MedMNIST-C lists 1.10, 1.05, 1.00, 0.90, 0.95: its last two swapped here, so a higher severity is never milder
    "black_corner": (1.10, 1.05, 1.00, 0.95, 0.90),
}
_FUNDUS: dict[str, tuple] = {
    "pixelate": (0.8, 0.60, 0.50, 0.40, 0.35),
    "jpeg_compression": (30, 25, 20, 10, 5),
    "gaussian_noise": (0.04, 0.08, 0.12, 0.16, 0.20),
    "speckle_noise": (0.10, 0.15, 0.20, 0.25, 0.30),
    "defocus_blur": ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)),
    "motion_blur": ((8, 5), (15, 5), (15, 8), (15, 12), (20, 15)),
    "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
    "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
}
_XRAY: dict[str, tuple] = {
    "pixelate": (0.30, 0.25, 0.20, 0.15, 0.10),
    "jpeg_compression": (50, 30, 15, 10, 7),
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "speckle_noise": (0.05, 0.15, 0.2, 0.35, 0.45),
    "impulse_noise": (0.01, 0.03, 0.06, 0.09, 0.17),
    "shot_noise": (60, 25, 18, 10, 5),
    "gaussian_blur": (3, 5, 7, 9, 11),
    "brightness_up": (1.1, 1.2, 1.3, 1.4, 1.5),
    "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
    "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6),
    "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4),
    "gamma_corr_up": (1.1, 1.2, 1.3, 1.4, 1.6),
    "gamma_corr_down": (0.9, 0.8, 0.7, 0.6, 0.4),
}
PARAMETERS: dict[str, dict[str, tuple]] = {
    "dermatoscopy": _DERMATOSCOPY,
    "fundus": _FUNDUS,
    "xray": _XRAY,
    "photo": {k: v for k, v in _DERMATOSCOPY.items() if k != "black_corner"},
}

# Each dataset's modality; a dataset not named here (csv, imagefolder) is a photograph.
MODALITY = {
    "isic2019": "dermatoscopy",
    "ham10000": "dermatoscopy",
    "pad_ufes20": "photo",  # smartphone photographs, not dermoscopy: no dermatoscope vignette
    "aptos2019": "fundus",
    "messidor2": "fundus",
    "idrid": "fundus",
    "eyepacs": "fundus",
    "chexpert": "xray",
    "mimic_cxr": "xray",
    "chestxray14": "xray",
    "cbis_ddsm": "xray",
    "cmmd": "xray",
    "vindr_mammo": "xray",
}


def modality_of(dataset: str) -> str:
    return MODALITY.get(dataset, "photo")


def corruptions_for(dataset: str) -> list[str]:
    """The corruption names that apply to ``dataset``'s modality, in a stable order."""
    return list(PARAMETERS[modality_of(dataset)])


@dataclass(frozen=True)
class Corruption:
    """One corruption at one severity for one modality: a callable on PIL images (crop in, crop out)."""

    name: str
    severity: int
    modality: str

    @property
    def parameter(self) -> object:
        return PARAMETERS[self.modality][self.name][self.severity - 1]

    def describe(self) -> dict:
        """What the cache key and the manifest record (the parameter makes a change of numbers a new key)."""
        parameter = self.parameter
        return {
            "name": self.name,
            "severity": self.severity,
            "modality": self.modality,
            "parameter": list(parameter) if isinstance(parameter, tuple) else parameter,
        }

    def __call__(self, image: Image.Image) -> Image.Image:
        x = _from_pil(image)
        digest = hashlib.sha256(x.tobytes())
        digest.update(f"fmcache-corrupt:{self.name}:{self.severity}".encode())
        rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
        out = KERNELS[self.name](x, self.parameter, rng)
        if image.mode == "L":
            return _to_pil(out).convert("L")
        return _to_pil(out)


def parse_corruption(text: str, dataset: str) -> Corruption:
    """``NAME:SEVERITY`` (e.g. ``gaussian_blur:3``) for ``dataset``'s modality; anything else is one clear line."""
    name, sep, level = str(text).partition(":")
    available = corruptions_for(dataset)
    modality = modality_of(dataset)
    if not sep or not level.strip().isdigit():
        raise FmcacheError(f"bad --corrupt '{text}'; use NAME:SEVERITY with SEVERITY 1-5, e.g. {available[0]}:3")
    severity = int(level)
    if severity not in SEVERITIES:
        raise FmcacheError(f"--corrupt {text}: severity must be 1-5, got {severity}")
    if name.strip() not in available:
        raise FmcacheError(
            f"--corrupt {text}: '{name}' is not a {modality} corruption for {dataset}; use one of {', '.join(available)}"
        )
    return Corruption(name.strip(), severity, modality)
