"""`fmcache transfer`: a frozen result's heads applied to another cache with no refit (external validation).

ISIC 2019 → PAD-UFES-20 from the CLI with the shipped map and a hand-written one (kept and dropped counts by hand);
transfer to the source's own cache reproducing its test metric (linear probe, a token head, k-NN); one-line refusals
(other model, other input size, no map, a map that does not fit, a result without heads); leakage found by id, by
exact pixels and by near-duplicate hashes, refused or dropped; the near-duplicate search against brute force; the
shipped label maps held to the registry's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from fmcache import metrics
from fmcache.cache.reader import CacheReader
from fmcache.cli import app
from fmcache.data.label_maps import map_yaml, registry_map, shipped_pairs
from fmcache.errors import FmcacheError
from fmcache.frozen.headfiles import load_tensors, tensor_entry, write_heads
from fmcache.frozen.label_map import check_map, parse_map
from fmcache.frozen.overlap import exact_overlap, id_overlap, near_duplicates
from fmcache.frozen.specs import TransferSpec
from fmcache.results import check_result_document
from fmcache.runners import run
from tests.conftest import knn, probe, quiet, spec_kwargs, token_probe
from tests.fixtures_data import make_aptos, make_chexpert, make_isic
from tests.fixtures_external import make_chestxray14, make_ham10000, make_pad_ufes20

LABEL_MAPS = Path(__file__).resolve().parents[1] / "configs" / "label_maps"
ISIC = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
PAD = ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def extract(dataset: str, root: Path, cache_root: Path, **kw) -> Path:
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec

    options = {"norm": "model", "tokens": "2", "shard_size": 16, "allow_empty_split": dataset != "isic2019", **kw}
    return run_extract(ExtractSpec(**spec_kwargs(root, cache_root, dataset=dataset, **options)), log=quiet)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """ISIC 2019 (48 images: 39 train / 4 val / 5 test) and PAD-UFES-20 (24, all test, 4 per class) of the same
    random-init tiny dinov2 at the model's normalisation; PAD also at another input size and of another model.
    ``isic_root`` is the ISIC fixture's folder (its images)."""
    base = tmp_path_factory.mktemp("transfer")
    isic, pad = make_isic(base / "isic", n=48), make_pad_ufes20(base / "pad", n=24, seed=7)
    out = {"isic": extract("isic2019", isic, base / "cache"), "pad": extract("pad_ufes20", pad, base / "cache")}
    out["pad_70px"] = extract("pad_ufes20", pad, base / "cache_70", img_size=70)
    other = {"model": "deit_base", "img_size": 64, "arch_overrides": {"depth": 2, "embed_dim": 64, "num_heads": 2}}
    out["pad_deit"] = extract("pad_ufes20", pad, base / "cache_deit", **other)
    return {**out, "isic_root": isic}


@pytest.fixture(scope="module")
def linear_result(caches, tmp_path_factory) -> Path:
    """A linear probe on the ISIC cache from the CLI (2 LRs × 2 seeds, 3 epochs)."""
    out = tmp_path_factory.mktemp("results")
    args = ["probe", caches["isic"], "--lrs", "1e-3,1e-2", "--seeds", "2", "--epochs", "3", "--batch-size", "8",
            "--standardize", "--no-plots", "--out", out]  # fmt: skip
    answer = cli(*args)
    assert answer.exit_code == 0, answer.output
    (folder,) = out.rglob("probe_linear-*")
    return folder


def _document(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def _folder_of(output: str) -> Path:
    return Path(output.split("→ ")[-1].replace("\n", "").strip())


def test_isic_linear_probe_transfers_to_pad_ufes20_from_the_cli(caches, linear_result):
    source = _document(linear_result)
    assert source["heads"]["file"] == "heads.safetensors" and source["heads"]["apply"]["kind"] == "linear"
    answer = cli("transfer", linear_result, caches["pad"])
    assert answer.exit_code == 0, answer.output
    assert "source classes mapped to nothing: DF, VASC (2)" in answer.output
    folder = _folder_of(answer.output)
    doc = _document(folder)
    check_result_document(doc, folder / "result.json")
    # in the results tree of the source, under the target's dataset, model and cache key
    key = CacheReader(caches["pad"]).key
    assert folder.parent == linear_result.parents[3] / "pad_ufes20" / "dinov2_vits14" / key[:12]
    assert (doc["protocol"], doc["dataset"], doc["cache_key"]) == ("transfer", "pad_ufes20", key)
    assert doc["source"]["folder"] == str(linear_result) and doc["source"]["dataset"] == "isic2019"
    assert doc["source"]["test_mean"] == source["summary"]["test_mean"] == doc["summary"]["source_test_mean"]
    facts = doc["label_map"]
    assert facts["kept"] == PAD and facts["dropped_classes"] == [] and facts["dropped_samples"] == {"test": 0}
    assert facts["unused_source_classes"] == ["DF", "VASC"]
    assert "renormalised over the mapped source classes" in facts["scores"]
    assert doc["overlap"]["found"]["total"] == 0 and doc["target"]["evaluated"] == {"test": 24}

    # the scores by hand: ISIC's columns of the PAD classes (ACK←AK, NEV←NV, SEK←BKL), renormalised over those six
    reader = CacheReader(caches["pad"])
    probs = _source_probs(linear_result, reader)[..., [ISIC.index(c) for c in ("AK", "BCC", "MEL", "NV", "SCC", "BKL")]]
    with np.load(folder / "predictions.npz") as npz:
        assert npz["test_scores"].shape == (2, 24, 6) and list(npz["seeds"]) == [0, 1]
        assert (npz["test_labels"] == reader.labels("test")).all() and "test_meta__image_id" in npz.files
        assert np.allclose(npz["test_scores"], probs / probs.sum(-1, keepdims=True), atol=1e-6)
    per_seed = [m["value"] for m in doc["details"]["splits"]["test"]["metrics"]]
    assert doc["summary"]["test_mean"] == pytest.approx(np.mean(per_seed))


def _source_probs(result: Path, reader: CacheReader) -> np.ndarray:
    """(seeds, n, 8) ISIC probabilities of the result's linear heads on ``reader``'s test features, by hand: z-scored
    with the saved statistics, each seed's weight and bias, softmax."""
    path = result / "heads.safetensors"
    shared = load_tensors(path, "layer02.")
    x = (reader.pooled("test", 2, "cls").astype(np.float64) - shared["mean"].numpy()) / shared["std"].numpy()
    out = []
    for seed in (0, 1):
        head = load_tensors(path, f"layer02.seed{seed}.")
        logits = torch.as_tensor(x, dtype=torch.float32) @ head["weight"].T + head["bias"]
        out.append(torch.softmax(logits, -1).double().numpy())
    return np.stack(out)


def test_a_hand_written_map_keeps_and_drops_what_it_says(caches, linear_result, tmp_path):
    mapping = tmp_path / "melanoma.yaml"
    mapping.write_text("source: isic2019\ntarget: pad_ufes20\nclasses:\n  MEL: [MEL]\n  NEV: [NV, BKL]\n")
    answer = cli("transfer", linear_result, caches["pad"], "--label-map", mapping, "--out", tmp_path / "res")
    assert answer.exit_code == 0, answer.output
    doc = _document(_folder_of(answer.output))
    # PAD's 24 images are 4 per class: MEL and NEV kept (8 scored), ACK, BCC, SCC, SEK dropped (16 samples)
    assert doc["label_map"]["kept"] == ["MEL", "NEV"]
    assert doc["label_map"]["dropped_classes"] == ["ACK", "BCC", "SCC", "SEK"]
    assert doc["label_map"]["dropped_samples"] == {"test": 16} and doc["target"]["evaluated"] == {"test": 8}
    assert doc["label_map"]["unused_source_classes"] == ["BCC", "AK", "DF", "VASC", "SCC"]
    assert "16 samples dropped" in answer.output
    # MEL ← MEL, NEV ← NV + BKL, over MEL + NV + BKL, for the 8 MEL and NEV samples
    reader = CacheReader(caches["pad"])
    probs = _source_probs(linear_result, reader)
    mel, nev = probs[..., ISIC.index("MEL")], probs[..., ISIC.index("NV")] + probs[..., ISIC.index("BKL")]
    rows = np.isin(reader.labels("test"), [PAD.index("MEL"), PAD.index("NEV")])
    by_hand = np.stack([mel, nev], -1)[:, rows] / (mel + nev)[:, rows, None]
    with np.load(_folder_of(answer.output) / "predictions.npz") as npz:
        assert npz["test_scores"].shape == (2, 8, 2) and set(npz["test_labels"]) == {0, 1}
        assert np.allclose(npz["test_scores"], by_hand, atol=1e-6)


def test_refusals_are_one_line_and_write_nothing(caches, linear_result, tmp_path):
    aptos = extract("aptos2019", make_aptos(tmp_path / "aptos", n=20), tmp_path / "cache")
    bad_map = tmp_path / "bad.yaml"
    bad_map.write_text("source: isic2019\ntarget: pad_ufes20\nclasses:\n  MEL: [MELANOMA]\n  NOPE: [NV]\n")
    stripped = tmp_path / "old_result"
    shutil.copytree(linear_result, stripped)
    document = _document(stripped)
    del document["heads"]
    (stripped / "result.json").write_text(json.dumps(document))
    out = tmp_path / "res"
    cases = [
        ((linear_result, caches["pad_deit"]), "differs from the source's cache in its model"),
        ((linear_result, caches["pad_70px"]), "differs from the source's cache in its input size: 70 here, 56 in"),
        ((linear_result, aptos), "no shipped label map from isic2019 to aptos2019: pass --label-map"),
        ((linear_result, caches["pad"], "--label-map", bad_map), "source class 'MELANOMA' (for 'MEL') is not a class"),
        ((stripped, caches["pad"]), "records no heads"),
        ((linear_result, caches["pad"], "--source-cache", caches["pad"]), "is not the cache result"),
    ]
    for args, words in cases:
        answer = cli("transfer", *args, "--out", out)
        assert answer.exit_code == 2, answer.output
        (line,) = error_lines(answer.output)
        assert words in line, line
    assert not out.exists() or not list(out.rglob("transfer-*"))


def test_a_bad_map_lists_every_problem_on_its_own_line(caches, linear_result, tmp_path):
    bad_map = tmp_path / "bad.yaml"
    bad_map.write_text("source: isic2019\ntarget: pad_ufes20\nclasses:\n  MEL: [MELANOMA]\n  NOPE: [NV]\n")
    answer = cli("transfer", linear_result, caches["pad"], "--label-map", bad_map, "--out", tmp_path / "res")
    assert answer.exit_code == 2
    problems = [line for line in answer.output.splitlines() if line.startswith(f"label map {bad_map}:")]
    assert len(problems) == 2 and "NOPE" in problems[1]
    assert error_lines(answer.output)[0].endswith("(and 1 more, listed above)")


@pytest.mark.parametrize("kind", ["linear", "attentive", pytest.param("deit", marks=pytest.mark.slow), "knn"])
def test_transfer_to_the_source_cache_reproduces_its_test_metric(caches, kind, tmp_path):
    out, cache = tmp_path / "res", caches["isic"]
    fast = {"lrs": (1e-3, 1e-2), "seeds": 2, "epochs": 2, "batch_size": 8, "plots": False}
    if kind == "linear":
        source = probe(cache, out, **fast)
    elif kind == "attentive":
        source = token_probe(cache, out, head="attentive", layer="2", device="cpu", **fast)
    elif kind == "deit":
        deit = {"head_random_init": True, "head_depth": 1}
        source = token_probe(cache, out, head="deit", layer="2", device="cpu", **deit, **fast)
    else:
        source = knn(cache, out, ks=(3, 5), plots=False)
    document = _document(source["folder"])
    spec = TransferSpec(cache, result=source["folder"], out=tmp_path / "transfer")
    with pytest.raises(
        FmcacheError, match=r"43 target samples are among the source's train/val samples \(43 by image id"
    ):
        run("transfer", spec, log=quiet)  # its own train (38) and val (5) samples: scoring them is memory
    answer = run("transfer", dataclasses.replace(spec, drop_overlap=True), log=quiet)
    assert list(answer["splits"]) == ["test"] and answer["splits"]["test"]["n"] == 5
    if kind == "knn":
        assert answer["summary"]["test_mean"] == document["summary"]["best"]["test"]
    else:
        best = document["details"]["layers"]["2"]["per_lr"][str(document["summary"]["best_lr"])]
        assert answer["splits"]["test"]["values"] == best["test_per_seed"]
        assert answer["summary"]["test_mean"] == document["summary"]["test_mean"]
        assert answer["summary"]["test_std"] == document["summary"]["test_std"]
    with np.load(source["folder"] / "predictions.npz") as a, np.load(answer["folder"] / "predictions.npz") as b:
        assert (a["test_ids"] == b["test_ids"]).all() and (a["test_labels"] == b["test_labels"]).all()
        assert np.allclose(a["test_scores"], b["test_scores"], atol=1e-6)  # the linear grid's GEMM: other rows
    assert _document(answer["folder"])["overlap"]["dropped"] == 43


def test_chexpert_knn_transfers_to_chestxray14_over_the_shared_findings(tmp_path):
    """Multi-label: the shipped map keeps the 7 findings both name (Effusion ← Pleural Effusion) and drops NIH's other
    7 label columns, no sample; each kept label takes its CheXpert label's k-NN score."""
    chexpert = extract("chexpert", make_chexpert(tmp_path / "cx", n=40), tmp_path / "c")
    nih = extract(
        "chestxray14", make_chestxray14(tmp_path / "nih", n=24, seed=5), tmp_path / "c"
    )  # seed 0: CheXpert's pixels
    source = knn(chexpert, tmp_path / "res", ks=(3, 5), plots=False)
    answer = cli("transfer", source["folder"], nih)
    assert answer.exit_code == 0, answer.output
    doc = _document(_folder_of(answer.output))
    kept = ["Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax", "Consolidation", "Edema"]
    assert doc["label_map"]["kept"] == kept and len(doc["label_map"]["dropped_classes"]) == 7
    assert doc["label_map"]["dropped_samples"] == {"test": 0} and "label columns" in answer.output
    assert "each target label takes its source label's score" in doc["label_map"]["scores"]
    reader = CacheReader(nih)
    columns = [reader.class_names.index(c) for c in kept]
    with np.load(_folder_of(answer.output) / "predictions.npz") as npz:
        assert npz["test_scores"].shape == (1, 24, 7) and list(npz["seeds"]) == [-1]
        assert np.array_equal(npz["test_labels"], reader.labels("test")[:, columns], equal_nan=True)
        value = metrics.evaluate("mean_auc", npz["test_labels"], npz["test_scores"][0].astype(np.float64), True, kept)
    assert doc["summary"]["test_mean"] == pytest.approx(value["value"], abs=1e-6)


def test_planted_duplicates_are_caught_then_refused_or_dropped(caches, linear_result, tmp_path):
    """HAM10000 shares ISIC's id namespace. Planted in a HAM fixture: an ISIC train image id (HAM's own pixels), an
    ISIC val image re-encoded losslessly (PNG bytes: the same decoded pixels), an ISIC train image 3 grey levels
    brighter (other pixels, the same difference hash); left alone: a copy of an ISIC test image (never trained or
    selected on) and a mirrored ISIC train image (far in dHash)."""
    ham = make_ham10000(tmp_path / "ham", n=21, seed=3)
    isic = CacheReader(caches["isic"])
    inputs = caches["isic_root"] / "ISIC_2019_Training_Input"
    train, val, test = (isic.metadata(s)["image_id"] for s in ("train", "val", "test"))
    table = (ham / "HAM10000_metadata.csv").read_text().splitlines()
    ham_ids = [line.split(",")[1] for line in table[1:]]

    def image(i: int) -> Path:
        return ham / f"HAM10000_images_part_{1 + i % 2}" / f"{ham_ids[i]}.jpg"

    def pixels(image_id: str) -> np.ndarray:
        return np.asarray(Image.open(inputs / f"{image_id}.jpg").convert("RGB")).astype(np.int64)

    image(0).rename(image(0).with_name(f"{train[0]}.jpg"))
    table[1] = table[1].replace(ham_ids[0], train[0])
    (ham / "HAM10000_metadata.csv").write_text("\n".join(table) + "\n")
    planted = {1: pixels(val[0]), 2: np.clip(pixels(train[1]) + 3, 0, 255), 3: pixels(test[0]),
               4: pixels(train[2])[:, ::-1]}  # fmt: skip
    for i, values in planted.items():
        Image.fromarray(values.astype(np.uint8)).save(image(i), format="PNG")
    cache = extract("ham10000", ham, tmp_path / "cache")

    answer = cli("transfer", linear_result, cache, "--out", tmp_path / "res")
    assert answer.exit_code == 2
    (line,) = error_lines(answer.output)
    words = "3 target samples are among the source's train/val samples (1 by image id, 1 with identical pixels, 1 near"
    assert words in line and "--drop-overlap" in line, line
    answer = cli("transfer", linear_result, cache, "--drop-overlap", "--out", tmp_path / "res")
    assert answer.exit_code == 0, answer.output
    doc = _document(_folder_of(answer.output))
    assert doc["overlap"]["dropped"] == 3 and doc["target"]["evaluated"] == {"test": 18}
    assert doc["overlap"]["found"] == {"ids": 1, "exact_pixels": 1, "near_duplicates": 1, "total": 3}
    assert doc["overlap"]["namespace"] == "isic" and doc["label_map"]["unused_source_classes"] == ["SCC"]
    with np.load(_folder_of(answer.output) / "predictions.npz") as npz:
        assert train[0] not in set(npz["test_meta__image_id"]) and len(npz["test_ids"]) == 18


def test_a_cache_without_fingerprints_says_to_rerun_its_extract(caches, linear_result, tmp_path, monkeypatch):
    monkeypatch.setattr(CacheReader, "fingerprints", lambda self, split: None)  # as a cache extracted before them
    answer = cli("transfer", linear_result, caches["pad"], "--out", tmp_path / "res")
    assert answer.exit_code == 2
    (line,) = error_lines(answer.output)
    assert "holds no content fingerprints" in line and "rerun its `fmcache extract`" in line


# -- overlap on arrays ------------------------------------------------------------------------------------------------


def _flip(row: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    unpacked = np.unpackbits(row)
    unpacked[rng.choice(256, bits, replace=False)] ^= 1
    return np.packbits(unpacked)


@pytest.mark.parametrize("max_bits", [0, 3, 10, 15])
def test_near_duplicates_agree_with_brute_force(max_bits):
    rng = np.random.default_rng(max_bits)
    source = rng.integers(0, 256, (600, 32), dtype=np.uint8)
    target = rng.integers(0, 256, (900, 32), dtype=np.uint8)
    planted = {}
    for i, bits in enumerate([0, 1, 2, 3, 5, 9, 10, 11, 14, 15, 16, 40]):
        target[i] = _flip(source[rng.integers(50, len(source))], bits, rng)  # not a row made blank below
        planted[i] = bits
    source[:50] = 0  # blank images on both sides collapse into one hash
    target[100:140] = 0
    target[140] = _flip(np.zeros(32, np.uint8), max_bits, rng)
    brute = (np.unpackbits(source[None] ^ target[:, None], axis=2).sum(2) <= max_bits).any(1)
    found = near_duplicates(source, target, max_bits)
    assert (found == brute).all()
    assert all(found[i] == (bits <= max_bits) for i, bits in planted.items())
    assert found[100:141].all()


def test_near_duplicate_threshold_past_the_bands_guarantee_is_refused():
    with pytest.raises(FmcacheError, match=r"in 0\.\.15"):
        near_duplicates(np.zeros((1, 32), np.uint8), np.zeros((1, 32), np.uint8), 16)


def test_id_and_exact_overlap():
    assert id_overlap(np.array(["ISIC_1", "ISIC_2", ""]), np.array(["ISIC_2", "", "ISIC_3", "nan"])).tolist() == [
        True, False, False, False,
    ]  # fmt: skip
    assert exact_overlap(np.array(["aa", "bb"]), np.array(["bb", "cc"])).tolist() == [True, False]


# -- label maps ---------------------------------------------------------------------------------------------------------


def test_map_scores_single_and_multi_label():
    doc = {"source": "s", "target": "t", "classes": {"b": ["x", "y"], "a": ["z"]}}
    checked = check_map(parse_map(doc, "test"), "s", "t", ["x", "y", "z", "w"], ["a", "b", "c"], False, quiet)
    assert checked.kept == ["a", "b"] and checked.dropped == ["c"] and checked.unused == ["w"]
    probs = np.array([[0.1, 0.2, 0.3, 0.4]])
    assert np.allclose(checked.scores(probs), [[0.3 / 0.6, 0.3 / 0.6]])
    labels, keep = checked.labels(np.array([0, 1, 2, 1]))
    assert labels.tolist() == [0, 1, 1] and keep.tolist() == [True, True, False, True]
    # every mapped class underflowed (or a k-NN vote went to unused classes only): uniform, counted, never NaN
    empty = np.array([[[0.0, 0.0, 0.0, 1.0], [0.1, 0.2, 0.3, 0.4]]])
    assert np.allclose(checked.scores(empty), [[[0.5, 0.5], [0.5, 0.5]]]) and checked.no_mass(empty) == 1
    multi = dataclasses.replace(checked, multilabel=True)
    assert np.allclose(multi.scores(np.array([[0.1, 0.7, 0.3, 0.4]])), [[0.3, 0.7]])
    y = np.array([[1.0, np.nan, 0.0]])
    assert np.array_equal(multi.labels(y)[0], y[:, :2], equal_nan=True)


def test_shipped_label_maps_are_the_registrys():
    shipped = {p.name for p in LABEL_MAPS.glob("*.yaml")}
    assert shipped == {f"{s}_to_{t}.yaml" for s, t in shipped_pairs()}
    for s, t in shipped_pairs():
        assert (LABEL_MAPS / f"{s}_to_{t}.yaml").read_text() == map_yaml(registry_map(s, t)), f"{s} -> {t} drifted"
    answer = cli("label-map", "isic2019", "pad_ufes20")
    assert answer.exit_code == 0 and answer.output == (LABEL_MAPS / "isic2019_to_pad_ufes20.yaml").read_text()
    assert parse_map(yaml.safe_load(answer.output), "cli").classes["SEK"] == ("BKL",)


def test_heads_file_sizes(tmp_path):
    """A ViT-B-sized linear grid keeps 5 seeds × (8 × 768 + 8) float32 at the best LR: 123,040 bytes of tensors."""
    entries = []
    for seed in range(5):
        entries += [tensor_entry(f"layer12.seed{seed}.weight", torch.zeros(8, 768)),
                    tensor_entry(f"layer12.seed{seed}.bias", torch.zeros(8))]  # fmt: skip
    nbytes, _ = write_heads(tmp_path / "heads.safetensors", entries, {"kind": "linear"})
    assert nbytes == (tmp_path / "heads.safetensors").stat().st_size and 123_040 < nbytes < 125_000
