"""Corrupted test caches (``extract --corrupt NAME:SEVERITY``) and the inputs' content fingerprints (issue #29)."""

from __future__ import annotations

import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmcache.cache.reader import CacheReader
from fmcache.data import corruptions as C
from fmcache.data.fingerprint import content_hashes, hamming, hex_rows
from fmcache.data.transforms import build_transform
from fmcache.errors import FmcacheError
from fmcache.extract.plan import plan
from fmcache.extract.run import run_extract
from fmcache.extract.spec import ExtractSpec
from tests.conftest import quiet, spec_kwargs
from tests.fixtures_data import make_aptos


def _photo(seed: int = 0, side: int = 96) -> Image.Image:
    """A natural-looking colour image: noise upsampled from several scales, coarse ones strongest (no period that a
    pixel grid could alias with)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((side, side, 3), np.float32)
    for cells, weight in ((3, 0.5), (7, 0.25), (17, 0.15), (41, 0.1)):
        layer = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8)).resize(
            (side, side), Image.BICUBIC
        )
        out += weight * np.asarray(layer, np.float32)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _mse(a: Image.Image, b: Image.Image) -> float:
    return float(np.mean((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2))


@pytest.mark.parametrize("modality", C.MODALITIES)
def test_every_corruption_is_deterministic_and_grows_with_severity(modality: str) -> None:
    image = _photo()
    for name in C.PARAMETERS[modality]:
        outs = [C.Corruption(name, s, modality)(image) for s in C.SEVERITIES]
        again = C.Corruption(name, 3, modality)(image)
        assert np.array_equal(np.asarray(outs[2]), np.asarray(again)), name  # same sample, same draw
        assert outs[0].size == image.size and outs[0].mode == image.mode
        errors = [_mse(o, image) for o in outs]
        assert errors[-1] > 0, name
        if name in ("pixelate", "jpeg_compression"):
            # a pixel grid or JPEG's 8x8 blocks can align better at one step than at the one before: the last
            # severity still hurts the most
            assert errors[-1] >= max(errors[:-1]) * 0.9 and errors[-1] > errors[0], (name, errors)
        else:  # a stronger severity moves the image further
            assert all(b > a for a, b in itertools.pairwise(errors)), (name, errors)


def test_closed_form_corruptions() -> None:
    x = np.asarray(_photo(), np.float32) / 255
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(C.brightness(x, 0.5, rng), x * 0.5, atol=1e-7)
    np.testing.assert_allclose(C.gamma(x, 1.6, rng), np.clip(x**1.6, 0, 1), atol=1e-7)
    mean = x.mean(axis=(0, 1), keepdims=True)
    np.testing.assert_allclose(C.contrast(x, 0.4, rng), np.clip((x - mean) * 0.4 + mean, 0, 1), atol=1e-6)
    corner = C.black_corner(x, 1.0, rng)
    assert corner[0, 0].sum() == 0 and np.array_equal(corner[48, 48], x[48, 48])
    noisy = C.gaussian_noise(np.full((200, 200, 3), 0.5, np.float32), 0.1, rng)
    assert abs(float(noisy.std()) - 0.1) < 0.005  # the sigma asked for (no clipping near 0.5)
    salt = C.impulse_noise(np.full((200, 200, 3), 0.5, np.float32), 0.1, rng)
    assert abs(float(np.mean(salt != 0.5)) - 0.1) < 0.01


def test_a_different_image_gets_its_own_noise() -> None:
    a, b = C.Corruption("gaussian_noise", 3, "xray")(_photo(1)), C.Corruption("gaussian_noise", 3, "xray")(_photo(2))
    delta_a = np.asarray(a, np.float32) - np.asarray(_photo(1), np.float32)
    delta_b = np.asarray(b, np.float32) - np.asarray(_photo(2), np.float32)
    assert not np.allclose(delta_a, delta_b)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gaussian_noise", "use NAME:SEVERITY"),
        ("gaussian_noise:9", "severity must be 1-5"),
        ("gamma_corr_up:2", "not a fundus corruption for aptos2019"),
        ("snow:1", "not a fundus corruption"),
    ],
)
def test_bad_corrupt_is_one_line(text: str, message: str) -> None:
    with pytest.raises(FmcacheError, match=message):
        C.parse_corruption(text, "aptos2019")


def test_modalities_follow_the_datasets() -> None:
    assert "gamma_corr_up" in C.corruptions_for("chexpert") and "gamma_corr_up" in C.corruptions_for("cmmd")
    assert "black_corner" in C.corruptions_for("isic2019") and "black_corner" not in C.corruptions_for("pad_ufes20")
    assert C.corruptions_for("messidor2") == C.corruptions_for("aptos2019")
    assert C.modality_of("imagefolder") == "photo"


def test_the_transform_corrupts_the_crop_and_says_so() -> None:
    corruption = C.parse_corruption("contrast_down:5", "aptos2019")
    clean, clean_desc = build_transform(32)
    bad, desc = build_transform(32, corruption=corruption)
    assert "corrupt" not in clean_desc  # every existing key stays the same
    assert desc["steps"][:3] == ["resize", "center_crop", "corrupt"]
    assert desc["corrupt"] == {"name": "contrast_down", "severity": 5, "modality": "fundus", "parameter": 0.4}
    image = _photo(side=64)
    assert bad(image).std() < clean(image).std()


def test_extract_corrupt_writes_a_test_cache_of_its_own(tmp_path: Path, aptos_root: Path) -> None:
    kw = spec_kwargs(aptos_root, tmp_path / "cache")
    clean = run_extract(ExtractSpec(**kw), progress=False, log=quiet)
    folder = run_extract(ExtractSpec(**kw, corrupt="defocus_blur:5"), progress=False, log=quiet)
    assert folder != clean and folder.parent == clean.parent
    reader, base = CacheReader(folder), CacheReader(clean)
    assert reader.manifest["dataset"]["split_counts"] == {"train": 0, "val": 0, "test": 6}
    assert reader.manifest["inputs"]["transform"]["corrupt"]["name"] == "defocus_blur"
    np.testing.assert_array_equal(reader.ids("test"), base.ids("test"))
    np.testing.assert_array_equal(reader.labels("test"), base.labels("test"))
    assert not np.array_equal(reader.pooled("test"), base.pooled("test"))
    again = run_extract(ExtractSpec(**kw, corrupt="defocus_blur:5"), progress=False, log=quiet)
    assert again == folder  # complete: found by its key
    with pytest.raises(FmcacheError, match="pass one of them"):
        ExtractSpec(**kw, corrupt="defocus_blur:5", views=2)


def test_fingerprints_catch_a_re_encoded_duplicate(tmp_path: Path) -> None:
    """A JPEG saved again as PNG decodes to the same pixels (same sha256); at quality 95 as a near duplicate."""
    root = make_aptos(tmp_path / "aptos", n=40)
    images = sorted((root / "train_images").glob("*.png"))
    original = _photo(5, side=128)
    original.save(images[0])
    buffer = io.BytesIO()
    original.save(buffer, "JPEG", quality=95)
    jpeg = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    jpeg.save(images[1])  # a PNG holding the decoded JPEG's pixels
    jpeg.save(images[2].with_suffix(".jpg"), quality=95)  # and the JPEG re-compressed
    images[2].unlink()
    shutil.move(images[2].with_suffix(".jpg"), images[2])  # the loader looks the name up; PIL reads by content
    images[3].write_bytes(images[1].read_bytes())  # the very same file under another name
    folder = run_extract(ExtractSpec(**spec_kwargs(root, tmp_path / "cache", limit=None)), progress=False, log=quiet)
    reader = CacheReader(folder)
    ids = np.concatenate([reader.ids(s) for s in ("train", "val", "test")])
    prints = [reader.fingerprints(s) for s in ("train", "val", "test")]
    sha = hex_rows(np.concatenate([p["content_sha256"] for p in prints]))
    dh = np.concatenate([p["content_dhash"] for p in prints])
    row = {int(i): r for r, i in enumerate(ids)}
    index = plan(ExtractSpec(**spec_kwargs(root, tmp_path / "cache", limit=None)), log=quiet).index
    rows = [row[int(np.flatnonzero([p == images[k] for p in index.paths])[0])] for k in range(4)]
    assert sha[rows[1]] == sha[rows[3]]  # identical files
    assert int(hamming(dh[rows[1]], dh[rows[2]])) <= 10  # the re-compressed JPEG: a near duplicate
    others = [int(hamming(dh[rows[1]], dh[r])) for r in range(len(ids)) if r not in rows]
    assert min(others) > 10 and len(set(sha)) == len(ids) - 1


def test_fingerprint_of_a_batch_is_the_fingerprint_of_each_image() -> None:
    batch = torch.rand(4, 3, 32, 32)
    together = content_hashes(batch)
    alone = [content_hashes(batch[i : i + 1]) for i in range(4)]
    for name in ("content_sha256", "content_dhash"):
        np.testing.assert_array_equal(together[name], np.concatenate([a[name] for a in alone]))
    assert together["content_dhash"].shape == (4, 32) and together["content_sha256"].dtype == np.uint8
    json.dumps(hex_rows(together["content_sha256"]).tolist())
