"""Content fingerprints of the images a cache was made from, for the leakage check of ``fmcache transfer``.

Two fingerprints per sample, both of the model's input (the decoded image after the cache's deterministic eval
transform), computed on the batch the extractor already holds, so they cost no extra decode:

- ``content_sha256``: sha256 of the input tensor's bytes ((N, 32) uint8 digests in the shards). A lossless re-encoding (PNG of a decoded JPEG, another
  container for the same pixels) decodes to the same pixels and so the same hash.
- ``content_dhash``: a 256-bit difference hash (16 × 16 horizontal gradients' signs of the grayscale input
  averaged down to 16 × 17), packed into 32 bytes. A lossy re-encoding, a resize or a mild intensity change flips few
  bits, so near duplicates are pairs within a few bits (Hamming distance).

Why the transformed input and not the file's pixels: transfer only compares caches of the same transform (it refuses
others), so the transform is common to both sides, and hashing the tensor the loader already produced keeps the
extraction's decoding at one pass per image.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

DHASH_SIDE = 16  # 16 × 16 = 256 bits
DHASH_BYTES = DHASH_SIDE * DHASH_SIDE // 8


def dhash(images: torch.Tensor) -> np.ndarray:
    """(N, 32) uint8: the packed 256-bit difference hash of each image of a (N, C, H, W) batch."""
    gray = images.detach().float().mean(dim=1, keepdim=True)
    small = F.adaptive_avg_pool2d(gray, (DHASH_SIDE, DHASH_SIDE + 1))[:, 0]
    bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(images), -1).cpu().numpy()
    return np.packbits(bits, axis=1)


def sha256_rows(images: torch.Tensor) -> np.ndarray:
    """(N, 32) uint8: the sha256 digest of each image's bytes (as float32, C-contiguous, on the CPU)."""
    host = images.detach().to("cpu", torch.float32).contiguous().numpy()
    digests = b"".join(hashlib.sha256(row.tobytes()).digest() for row in host)
    return np.frombuffer(digests, dtype=np.uint8).reshape(len(host), 32).copy()


def hex_rows(digests: np.ndarray) -> np.ndarray:
    """(N,) hex strings of (N, 32) uint8 digests (for display and set lookups)."""
    return np.array([row.tobytes().hex() for row in np.asarray(digests, dtype=np.uint8)], dtype="<U64")


def content_hashes(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Both fingerprints of a (N, C, H, W) batch, under the names the cache's shards store them."""
    return {"content_sha256": sha256_rows(images), "content_dhash": dhash(images)}


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between packed hashes ``a`` (..., 32) and ``b`` (..., 32), broadcast."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)
