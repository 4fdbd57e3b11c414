"""Reading one image file as an 8-bit RGB PIL image, whatever the format (PNG/JPEG/TIFF/DICOM, 8 or 16 bit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fmcache.errors import FmcacheError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm")
DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom")

# PIL modes whose values exceed 8 bits: PIL's own convert("RGB") clips them at 255, so we rescale instead.
_WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def load_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image.

    Grayscale is repeated to three channels. Images with more than 8 bits per pixel (16-bit PNG/TIFF, DICOM)
    are scaled to 0..255 by their own minimum and maximum. DICOM (``.dcm``) applies the modality rescale and
    the VOI window/LUT when present, and inverts MONOCHROME1. A missing, corrupt or unreadable file raises
    an :class:`FmcacheError` naming the file.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in DICOM_EXTENSIONS:
            return _read_dicom(path)
        return _read_pil(path)
    except FmcacheError:
        raise
    except FileNotFoundError as exc:
        raise FmcacheError(
            f"cannot read image {path}: file not found; check --data-root and that the dataset is complete"
        ) from exc
    except Exception as exc:  # decoders raise many types (OSError, ValueError, SyntaxError, struct.error, ...)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise FmcacheError(
            f"cannot read image {path}: {reason}; re-download the file or remove it from the dataset"
        ) from exc


def _read_pil(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here and not inside a transform
        if img.mode in _WIDE_MODES:
            return _gray_to_rgb(_scale_to_uint8(np.asarray(img)))
        return img.convert("RGB")


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Linearly map the array's own min..max to 0..255 (a constant image becomes 0)."""
    arr = np.asarray(arr, dtype=np.float64)
    low, high = float(arr.min()), float(arr.max())
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - low) * (255.0 / (high - low))).astype(np.uint8)


def _gray_to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).convert("RGB")


def _dicom_luts():
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _read_dicom(path: Path) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise FmcacheError(
            f"cannot read image {path}: not a DICOM file (no DICM header); re-download the file or remove it"
        ) from exc
    if "PixelData" not in ds:
        raise FmcacheError(f"cannot read image {path}: the DICOM file has no pixel data; use an image series")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise FmcacheError(
            f"cannot read image {path}: multi-frame DICOM is not a 2-D image; export single frames first"
        )
    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (RGB, or YBR already converted to RGB by pydicom)
        rgb = arr if arr.dtype == np.uint8 else _scale_to_uint8(arr)
        return Image.fromarray(np.ascontiguousarray(rgb)).convert("RGB")
    apply_modality_lut, apply_voi_lut = _dicom_luts()
    arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    gray = _scale_to_uint8(arr)
    if photometric == "MONOCHROME1":  # MONOCHROME1 stores white as the lowest value
        gray = 255 - gray
    return _gray_to_rgb(gray)
