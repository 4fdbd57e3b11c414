"""Pixel caches (``fmcache pixels``) and fine-tuning's data path: exactness against the image files for every dataset
layout, resume after kill -9, verify, the lookup (``--pixels auto|on|off``), augmentation on the device, the grid's
pixel jobs and their cost."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler
from typer.testing import CliRunner

from fmcache.cache.pixels import PixelReader
from fmcache.cli import app
from fmcache.data import load_image
from fmcache.data.pixels import crop_array, crop_image, prefix_spec, prefix_transform
from fmcache.errors import FmcacheError
from fmcache.extract.pixel_spec import PixelSpec
from fmcache.extract.pixels import find_pixels, plan_pixels, write_pixels
from fmcache.finetune.data import online_data
from fmcache.finetune.spec import FinetuneSpec
from tests.conftest import TINY_MODEL, one_thread, quiet
from tests.fixtures_data import (
    make_aptos,
    make_chexpert,
    make_csv,
    make_ddsm_lists,
    make_ddsm_tcia,
    make_imagefolder,
    make_isic,
    write_image,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 24  # resize 27 from the fixtures' 32 px: a real resize, then the center crop
RUN_SIZE = 28  # whole fine-tunes: a multiple of the tiny ViT's patch 14
runner = CliRunner()

# every dataset layout the loaders read, with its options; grayscale ones also with the seed's gray mode
LAYOUTS = {
    "aptos2019": (make_aptos, {}, "aptos2019"),
    "isic2019": (make_isic, {}, "isic2019"),
    "chexpert": (make_chexpert, {}, "chexpert"),
    "cbis_ddsm_lists": (make_ddsm_lists, {}, "cbis_ddsm"),
    "cbis_ddsm_tcia": (make_ddsm_tcia, {"layout": "tcia"}, "cbis_ddsm"),
    "csv": (make_csv, {}, "csv"),
    "imagefolder": (make_imagefolder, {}, "imagefolder"),
}
CASES = [(name, "repeat") for name in LAYOUTS] + [("chexpert", "seed"), ("cbis_ddsm_lists", "seed"),
                                                   ("cbis_ddsm_tcia", "seed")]  # fmt: skip


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, (make, _, _) in LAYOUTS.items():
        n = 12 if name == "cbis_ddsm_tcia" else 30
        out[name] = make(tmp_path_factory.mktemp(name), n=n)
    return out


def _finetune_spec(name: str, root: Path, cache_root: Path, **kw) -> FinetuneSpec:
    _, options, dataset = LAYOUTS[name]
    base = dict(dataset=dataset, data_root=root, model=TINY_MODEL, random_init=True, img_size=SIZE,
                arch_overrides={"depth": 2}, lrs=(1e-3,), epochs=1, batch_size=4, workers=0,
                out=cache_root.parent / "runs", cache_root=cache_root, dataset_options=options)  # fmt: skip
    return FinetuneSpec(**{**base, **kw})


def _pixel_spec(name: str, root: Path, cache_root: Path, **kw) -> PixelSpec:
    _, options, dataset = LAYOUTS[name]
    base = dict(dataset=dataset, data_root=root, img_size=SIZE, cache_root=cache_root, workers=0, shard_size=8,
                dataset_options=options)  # fmt: skip
    return PixelSpec(**{**base, **kw})


def _items(dataset, seed: int) -> list[torch.Tensor]:
    """Every item of ``dataset`` drawn after ``torch.manual_seed(seed)``: what a workers=0 epoch draws."""
    torch.manual_seed(seed)
    return [dataset[i][0] for i in range(len(dataset))]


# -- 1. exactness: the same PIL image enters the same random transforms ---------------------------------------------


@pytest.mark.parametrize(("name", "gray"), CASES)
def test_pixel_batches_are_bit_identical_to_image_batches(roots, tmp_path, name, gray):
    """Every layout (APTOS, ISIC, CheXpert, CBIS-DDSM lists and TCIA DICOM, csv, imagefolder), grayscale scans in
    their one stored channel, and --gray seed: train items (seeded augmentation) and val/test items equal the image
    path's bit for bit."""
    cache_root = tmp_path / "cache"
    folder = write_pixels(_pixel_spec(name, roots[name], cache_root, gray=gray), progress=False, log=quiet)
    reader = PixelReader(folder)
    grayscale = LAYOUTS[name][2] in ("chexpert", "cbis_ddsm")
    assert reader.channels == (1 if grayscale else 3)
    images = online_data(_finetune_spec(name, roots[name], cache_root, pixels="off", gray=gray))
    pixels = online_data(_finetune_spec(name, roots[name], cache_root, pixels="on", gray=gray))
    assert images.source == "images" and pixels.source == f"pixels:{reader.key}"
    assert images.identity == pixels.identity  # the run's key does not see where the pixels came from
    with one_thread():
        for split in ("train", "val", "test"):
            a, b = images.splits[split], pixels.splits[split]
            assert len(a) == len(b) > 0
            for seed in (0, 1):
                got, want = _items(b, seed), _items(a, seed)
                assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True)), (name, split, seed)
    if gray == "seed":
        assert all(float(x[1:].abs().max()) == 0 for x in _items(pixels.splits["train"], 0))


def test_loader_with_workers_gives_the_same_batches(roots, tmp_path):
    """The fine-tuning loop's loader (DistributedSampler by epoch, a generator seeding two workers) yields the same
    batches from the pixel cache as from the images, epoch after epoch."""
    cache_root = tmp_path / "cache"
    write_pixels(_pixel_spec("chexpert", roots["chexpert"], cache_root), progress=False, log=quiet)
    datasets = [online_data(_finetune_spec("chexpert", roots["chexpert"], cache_root, pixels=p)).splits["train"]
                for p in ("off", "on")]  # fmt: skip

    def batches(dataset, epoch: int) -> list[torch.Tensor]:
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
        sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(1000 + epoch)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=2, generator=generator)
        return [x for x, _ in loader]

    with one_thread():
        for epoch in (0, 1):
            a, b = batches(datasets[0], epoch), batches(datasets[1], epoch)
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_crop_round_trip_keeps_the_pil_image(roots):
    index_path = next((roots["cbis_ddsm_tcia"] / "CBIS-DDSM").rglob("1-1.dcm"))
    prefix = prefix_spec(SIZE)
    crop = prefix_transform(prefix)(load_image(index_path))
    for channels in (1, 3):
        back = crop_image(crop_array(crop, channels))
        assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(crop))
    colour = prefix_transform(prefix)(load_image(next((roots["aptos2019"] / "train_images").glob("*.png"))))
    with pytest.raises(FmcacheError, match="--channels 3"):
        crop_array(colour, 1)


def test_finetune_from_pixels_ends_with_the_images_numbers(roots, tmp_path):
    """A whole fine-tune (2 epochs) from the pixel cache equals the one from the images: the same result folder,
    curves, test metric and best-epoch probabilities; the result records which source fed it."""
    from fmcache.finetune.run import run_finetune

    cache_root = tmp_path / "cache"
    pixel_spec = _pixel_spec("chexpert", roots["chexpert"], cache_root, img_size=RUN_SIZE)
    key = write_pixels(pixel_spec, progress=False, log=quiet).name
    results = {}
    for source in ("off", "on"):
        spec = _finetune_spec("chexpert", roots["chexpert"], cache_root, pixels=source, epochs=2, img_size=RUN_SIZE,
                              out=tmp_path / f"runs_{source}", gray="seed")  # fmt: skip
        with one_thread():
            results[source] = run_finetune(spec, progress=False, log=quiet)
    folders = {s: Path(r["folder"]) for s, r in results.items()}
    assert folders["off"].relative_to(tmp_path / "runs_off") == folders["on"].relative_to(tmp_path / "runs_on")
    docs = {s: json.loads((f / "result.json").read_text()) for s, f in folders.items()}
    assert docs["off"]["details"]["data_source"] == "images"
    assert docs["on"]["details"]["data_source"].startswith(f"pixels:{key}")
    assert docs["off"]["summary"] == docs["on"]["summary"]
    assert docs["off"]["details"]["layers"] == docs["on"]["details"]["layers"] or _same_but_timings(docs)
    runs = {s: next(Path(r["runs_folder"]).glob("lr*/")) for s, r in results.items()}
    with np.load(runs["off"] / "best_predictions.npz") as a, np.load(runs["on"] / "best_predictions.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def _same_but_timings(docs: dict) -> bool:
    strip = [{k: v for k, v in next(iter(d["details"]["layers"].values())).items() if k != "timings"}
             for d in docs.values()]  # fmt: skip
    return strip[0] == strip[1]


# -- 2. finding the pixel cache; what a refusal says -----------------------------------------------------------------


def test_pixels_on_names_what_differs_and_auto_falls_back(roots, tmp_path):
    cache_root = tmp_path / "cache"
    with pytest.raises(FmcacheError, match=r"no pixel cache of aptos2019 under .*fmcache pixels --dataset aptos2019"):
        online_data(_finetune_spec("aptos2019", roots["aptos2019"], cache_root, pixels="on"))
    write_pixels(_pixel_spec("aptos2019", roots["aptos2019"], cache_root, img_size=20), progress=False, log=quiet)
    with pytest.raises(
        FmcacheError, match=r"differs: crop 20 \(this run: 24\); resize \[23, 23\] \(this run: \[27, 27\]\)"
    ):
        online_data(_finetune_spec("aptos2019", roots["aptos2019"], cache_root, pixels="on"))
    data = online_data(_finetune_spec("aptos2019", roots["aptos2019"], cache_root, pixels="auto"))
    assert data.source == "images" and "reading the image files" in data.hints[0]
    # a cache of the first 3 samples per split serves a run of 3, not a run of all
    write_pixels(_pixel_spec("aptos2019", roots["aptos2019"], cache_root, limit=3), progress=False, log=quiet)
    assert online_data(_finetune_spec("aptos2019", roots["aptos2019"], cache_root, limit=3)).source != "images"
    with pytest.raises(FmcacheError, match="first 3 samples of each split only"):
        online_data(_finetune_spec("aptos2019", roots["aptos2019"], cache_root, pixels="on"))


def test_cli_pixels_dry_run_and_one_line_refusals(roots, tmp_path):
    cache_root = tmp_path / "cache"
    args = ["pixels", "--dataset", "chexpert", "--data-root", str(roots["chexpert"]), "--img-size", str(SIZE),
            "--cache-root", str(cache_root), "--workers", "0", "--quiet"]  # fmt: skip
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "30 images as 24x24x1 uint8 (grayscale: one channel)" in dry.output and "not written yet" in dry.output
    assert not cache_root.exists()
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "complete" in runner.invoke(app, [*args, "--dry-run"]).output
    for extra, needle in ((["--resize", "10"], "must be at least --img-size"), (["--channels", "2"], "--channels"),
                          (["--gray", "seed", "--dataset", "aptos2019"], "grayscale datasets")):  # fmt: skip
        bad = runner.invoke(app, [*args, *extra])
        assert bad.exit_code == 2 and needle in bad.output and bad.output.strip().count("\n") == 0, bad.output
    ft = ["finetune", "--dataset", "aptos2019", "--data-root", str(roots["aptos2019"]), "--model", TINY_MODEL,
          "--random-init", "--img-size", str(SIZE), "--pixels", "on", "--cache-root", str(cache_root),
          "--out", str(tmp_path / "runs")]  # fmt: skip
    bad = runner.invoke(app, ft)
    assert bad.exit_code == 2 and "--pixels on: no pixel cache of aptos2019" in bad.output
    assert bad.output.strip().count("\n") == 0 and not (tmp_path / "runs").exists()


def test_info_ls_and_verify_know_pixel_caches(roots, tmp_path):
    cache_root = tmp_path / "cache"
    folder = write_pixels(_pixel_spec("chexpert", roots["chexpert"], cache_root), progress=False, log=quiet)
    info = runner.invoke(app, ["info", str(folder)])
    assert info.exit_code == 0 and "pixel cache" in info.output and "24x24, 1 channel(s)" in info.output
    listed = runner.invoke(app, ["ls", "--cache-root", str(cache_root)])
    assert listed.exit_code == 0 and "pixels 24px x1" in listed.output
    ok = runner.invoke(app, ["verify", str(folder)])
    assert ok.exit_code == 0 and "cache complete" in ok.output
    knn = runner.invoke(app, ["knn", str(folder)])  # stage two reads features: one line saying what this is
    assert knn.exit_code == 2 and "is a pixel cache" in knn.output


def test_verify_finds_a_damaged_pixel_shard_and_the_rerun_repairs_it(roots, tmp_path):
    cache_root = tmp_path / "cache"
    spec = _pixel_spec("aptos2019", roots["aptos2019"], cache_root)
    folder = write_pixels(spec, progress=False, log=quiet)
    before = {p.name: _sha256(p) for p in sorted(folder.glob("shard-*.h5"))}
    shard = folder / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the crops
    shard.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(folder)])
    assert bad.exit_code == 2 and "shard-00001.h5 content differs" in bad.output and "fmcache pixels" in bad.output
    # reading the flipped sample fails on its chunk checksum, naming the shard, rather than returning wrong pixels
    reader = PixelReader(folder)
    with pytest.raises(FmcacheError, match=r"shard-00001\.h5 is damaged"):
        for sample in sorted(reader.where):
            reader.read(sample)
    repaired = runner.invoke(app, ["verify", str(folder), "--repair"])
    assert repaired.exit_code == 0 and "fmcache pixels" in repaired.output
    assert (folder / "damaged" / "shard-00001.h5.damaged").is_file()
    with pytest.raises(FmcacheError, match="is partial"):
        PixelReader(folder)
    write_pixels(spec, progress=False, log=quiet)
    assert {p.name: _sha256(p) for p in sorted(folder.glob("shard-*.h5"))} == before


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- 3. kill -9 while writing, then the rerun --------------------------------------------------------------------------

SLOW_CLI = """
import time
import fmcache.cache.shards as shards
_append = shards.ShardWriter.append
def append(self, arrays):
    _append(self, arrays)
    time.sleep(0.25)
shards.ShardWriter.append = append
from fmcache.cli import main
main()
"""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_kill_9_while_writing_pixels_then_rerun_gives_the_same_cache(roots, tmp_path):
    root = roots["aptos2019"]
    args = ["pixels", "--dataset", "aptos2019", "--data-root", str(root), "--img-size", str(SIZE), "--workers", "0",
            "--batch-size", "2", "--shard-size", "8", "--quiet"]  # fmt: skip
    reference = write_pixels(_pixel_spec("aptos2019", root, tmp_path / "ref", batch_size=2), progress=False, log=quiet)
    cache_root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args, "--cache-root", str(cache_root)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"the run ended before the kill: {proc.communicate()}"
            assert time.monotonic() < deadline, "the run did not reach the kill point in time"
            folders = list(cache_root.glob("aptos2019/pixels/*/"))
            if folders and list(folders[0].glob("shard-*.h5")) and list(folders[0].glob(".shard-*.tmp-*")):
                break  # one shard finished, the next one half written
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    folder = folders[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "partial" and 0 < len(manifest["shards"]) < manifest["num_shards"]
    with pytest.raises(FmcacheError, match="partial"):
        PixelReader(folder)
    done = subprocess.run([sys.executable, "cli.py", *args, "--cache-root", str(cache_root)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "unfinished shard file" in done.stderr and "left to write" in done.stderr
    final = json.loads((folder / "manifest.json").read_text())
    ref = json.loads((reference / "manifest.json").read_text())
    assert final["status"] == "complete" and final["key"] == ref["key"] and folder.name == reference.name
    assert [s["sha256"] for s in final["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert not list(folder.glob(".shard-*"))


# -- 4. augmentation on the device --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "gray"), [("aptos2019", "repeat"), ("chexpert", "seed")])
def test_device_eval_batches_equal_the_eval_transform(roots, tmp_path, name, gray):
    """Val/test on the device path are ToTensor + Normalize (+ the gray-seed zeroing) of the same crops: bit-identical
    to the PIL eval transform on the CPU. Train batches are the seed's augmentation drawn on the batch."""
    cache_root = tmp_path / "cache"
    write_pixels(_pixel_spec(name, roots[name], cache_root), progress=False, log=quiet)
    cpu = online_data(_finetune_spec(name, roots[name], cache_root, gray=gray))
    device = online_data(_finetune_spec(name, roots[name], cache_root, gray=gray, augment="device"))
    assert device.batches is not None and device.source == cpu.source
    crops = torch.stack([device.splits["val"][i][0] for i in range(len(device.splits["val"]))])
    assert crops.dtype == torch.uint8 and crops.shape[1:3] == (SIZE, SIZE)
    want = torch.stack(_items(cpu.splits["val"], 0))
    assert torch.equal(device.batches.eval(crops), want)
    train = torch.stack([device.splits["train"][i][0] for i in range(8)])
    a, b = device.batches.train(train, 5), device.batches.train(train, 5)
    assert a.shape == (8, 3, SIZE, SIZE) and torch.equal(a, b) and not torch.equal(a, device.batches.train(train, 6))
    if gray == "seed":
        assert float(a[:, 1:].abs().max()) == 0
    # decoded crops (no pixel cache) feed the device path the same bytes
    images = online_data(_finetune_spec(name, roots[name], cache_root, gray=gray, augment="device", pixels="off"))
    assert images.source == "images"
    assert all(torch.equal(images.splits["val"][i][0][..., :1], device.splits["val"][i][0][..., :1])
               for i in range(len(images.splits["val"])))  # fmt: skip


def test_device_augment_run_has_its_own_key_and_records_it(roots, tmp_path):
    from fmcache.finetune.run import run_finetune

    cache_root = tmp_path / "cache"
    write_pixels(_pixel_spec("aptos2019", roots["aptos2019"], cache_root, img_size=RUN_SIZE), progress=False, log=quiet)
    root = roots["aptos2019"]
    with one_thread():
        cpu = run_finetune(_finetune_spec("aptos2019", root, cache_root, img_size=RUN_SIZE), progress=False, log=quiet)
        dev = run_finetune(_finetune_spec("aptos2019", root, cache_root, augment="device", img_size=RUN_SIZE),
                           progress=False, log=quiet)  # fmt: skip
        again = run_finetune(_finetune_spec("aptos2019", root, cache_root, augment="device", img_size=RUN_SIZE,
                                            out=tmp_path / "again"), progress=False, log=quiet)  # fmt: skip
    assert Path(cpu["runs_folder"]).name != Path(dev["runs_folder"]).name
    doc = json.loads((Path(dev["folder"]) / "result.json").read_text())
    assert (
        doc["settings"]["augment"] == "device"
        and "augment" not in json.loads((Path(cpu["folder"]) / "result.json").read_text())["settings"]
    )
    assert doc["details"]["augment"]["place"] == "device" and doc["details"]["data_source"].startswith("pixels:")
    runs = [next(Path(r["runs_folder"]).glob("lr*/")) for r in (dev, again)]
    with np.load(runs[0] / "best_predictions.npz") as a, np.load(runs[1] / "best_predictions.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)  # seeded per step: the same run twice


def test_find_pixels_ignores_feature_caches_and_other_datasets(roots, tmp_path):
    cache_root = tmp_path / "cache"
    write_pixels(_pixel_spec("isic2019", roots["isic2019"], cache_root), progress=False, log=quiet)
    plan = plan_pixels(_pixel_spec("aptos2019", roots["aptos2019"], cache_root))
    match = find_pixels(cache_root, plan.index, plan.prefix, None)
    assert match.reader is None and "no pixel cache of aptos2019" in match.why


def test_a_grayscale_dataset_with_a_colour_image_asks_for_three_channels(tmp_path):
    root = make_ddsm_lists(tmp_path / "ddsm", n=12)
    name = (root / "ddsm_raw_image_lists" / "train.txt").read_text().split()[0]
    write_image(root / "ddsm_raw" / name, np.random.RandomState(5), gray=False)
    spec = PixelSpec(dataset="cbis_ddsm", data_root=root, img_size=SIZE, cache_root=tmp_path / "c", workers=0)
    with pytest.raises(FmcacheError, match=r"has colour .* --channels 3"):
        write_pixels(spec, progress=False, log=quiet)
    assert not (tmp_path / "c" / "cbis_ddsm").exists()  # a failed fresh run leaves no folder
    folder = write_pixels(PixelSpec(**{**spec.__dict__, "channels": "3"}), progress=False, log=quiet)
    assert PixelReader(folder).channels == 3


def test_extract_views_from_a_pixel_cache_write_the_same_shards(aptos_root, tmp_path):
    """extract --views K decodes nothing when a matching pixel cache exists, and writes the same bytes."""
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec
    from tests.conftest import TINY_SIZE, spec_kwargs

    messages: list[str] = []
    write_pixels(PixelSpec(dataset="aptos2019", data_root=aptos_root, img_size=TINY_SIZE, cache_root=tmp_path / "b",
                           workers=0), progress=False, log=quiet)  # fmt: skip
    folders = {}
    with one_thread():
        for name in ("a", "b"):
            spec = ExtractSpec(**spec_kwargs(aptos_root, tmp_path / name, views=2, limit=4, dtype="fp32"))
            folders[name] = run_extract(spec, progress=False, log=messages.append)
    assert folders["a"].name == folders["b"].name
    assert sum("start from pixel cache" in m for m in messages) == 1
    shards = sorted(p.name for p in folders["a"].glob("shard-*.h5"))
    assert shards and all(_sha256(folders["a"] / s) == _sha256(folders["b"] / s) for s in shards)


# -- 5. the grid: pixel jobs before the fine-tunes that read them; both data paths in the dry run -------------------


def _grid_yaml(tmp_path: Path, aptos: Path, pixels: str = '"on"') -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(f"""results: results
cache_root: cache
models:
  - {{name: {TINY_MODEL}, random_init: true, img_size: {RUN_SIZE}, arch_overrides: {{depth: 2}}}}
datasets:
  - {{name: aptos2019, root: {aptos}, limit: 4}}
extract: {{batch_size: 4, workers: 0, views: 1, shard_size: 8}}
protocols:
  knn: {{ks: [1], layer: last}}
  finetune_linear:
    - {{freeze: none, lrs: [1.0e-3], seeds: 1, epochs: 1, batch_size: 4, workers: 0, pixels: {pixels},
       augment: device}}
""")
    return path


def test_grid_runs_the_pixel_job_first_and_the_finetune_reads_it(aptos_root, tmp_path, monkeypatch):
    import fmcache.data.views as views
    from fmcache.grid.config import GridOptions, load_grid
    from fmcache.grid.jobs import expand
    from fmcache.grid.main import run_grid

    config = _grid_yaml(tmp_path, aptos_root)
    jobs = {j.id: j for j in expand(load_grid(config))}
    pixel_id = f"pixels/aptos2019/{RUN_SIZE}px"
    assert jobs[pixel_id].is_pixels and next(iter(jobs)) == pixel_id
    assert jobs[f"finetune_linear/aptos2019/{TINY_MODEL}"].deps == [pixel_id]
    assert jobs[f"extract/aptos2019/{TINY_MODEL}"].deps == [pixel_id]  # its views decode nothing then
    assert jobs[pixel_id].options == {"workers": 0}  # the grid's extract workers
    messages: list[str] = []

    def decoded(path):
        raise AssertionError(f"extract --views decoded {path} although the pixel cache was there")

    monkeypatch.setattr(views, "load_image", decoded)
    with one_thread():
        answer = run_grid(config, GridOptions(), log=messages.append)
    assert len(answer["ran"]) == 4, messages
    doc = json.loads(next((tmp_path / "results").rglob("finetune_linear-*/result.json")).read_text())
    assert doc["details"]["data_source"].startswith("pixels:") and doc["settings"]["augment"] == "device"
    again = run_grid(config, GridOptions(), log=messages.append)
    assert not again["ran"] and len(again["skipped"]) == 4
    dry = run_grid(config, GridOptions(dry_run=True, device_rate="h200"), log=messages.append)
    assert dry["done"] == 4


def test_dry_run_prices_the_pixel_job_and_the_old_data_path(aptos_root, tmp_path):
    from fmcache.grid.config import GridOptions
    from fmcache.grid.main import run_grid

    lines: list[str] = []
    result = run_grid(_grid_yaml(tmp_path, aptos_root), GridOptions(dry_run=True, device_rate="h200"),
                      log=lines.append)  # fmt: skip
    cost = result["cost"]
    assert f"pixels/aptos2019/{RUN_SIZE}px" in cost["jobs"] and cost["old_path_hours"] > 0 and cost["hours"] > 0
    text = "\n".join(lines)
    assert "fine-tuning's data path: this config's (1 pixel cache job(s)" in text and "on the old path" in text
    auto = run_grid(_grid_yaml(tmp_path, aptos_root, pixels="auto"), GridOptions(dry_run=True, device_rate="h200"),
                    log=lines.append)  # fmt: skip
    assert not any(j.startswith("pixels/") for j in auto["cost"]["jobs"])  # auto writes no pixel cache
