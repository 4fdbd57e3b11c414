"""Conformance: every family against its official implementation, for the same weights, layer by layer.

Both sides load one file in the release's own layout (random values; fmcache through its ``--weights`` path, the
official model the way the paper's seed loads it), see the same images, and every cached layer, the paper's pooled
feature and the DeiT head's tokens must agree to 1e-5 in fp32, at 224 px and, where the paper uses it, at high
resolution. Planted deviations (pre- vs post-norm, CLS vs mean, another position-table interpolation) must fail with
a message naming the output. The comparison code is the library's (:mod:`fmcache.models.conformance`), which
``fmcache conformance`` runs on real release files.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from fmcache.errors import FmcacheError
from fmcache.models import conformance as conf
from tests.tiny_models import CONFORMANCE_ARCH

TOL = conf.TOLERANCE


def _check(name: str, size: int, batch: int = 2) -> dict:
    result = conf.check_conformance(name, img_size=size, random_init=True, arch=CONFORMANCE_ARCH[name], batch=batch)
    assert result["layers"], result
    return result


@pytest.mark.parametrize("name", sorted(CONFORMANCE_ARCH))
def test_family_conforms_at_224(name: str):
    result = _check(name, 224)
    assert result["passed"], f"{name} at 224 px differs from {result['reference']}:\n{result['message']}"
    names = [layer["name"] for layer in result["layers"]]
    assert names[-2].startswith("pooled") and names[-1].startswith("head tokens")
    assert sum(n.endswith("(tokens)") for n in names) == len(names) - 2 >= 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("dinov2_vits14", 1022),
        ("dinov2_vits14", 518),
        ("sam_vit_b", 1024),
        ("sam_vit_b", 512),
        ("clip_vitb16", 1024),
        ("blip_base", 384),
    ],
)  # DINOv2: the release's own grid and a patch-14 high resolution (73 x 73); SAM and CLIP: Table 3's 1024 (SAM also
# one size between); BLIP: its other release size
def test_family_conforms_at_high_resolution(name: str, size: int):
    result = _check(name, size, batch=1)
    assert result["passed"], f"{name} at {size} px differs from {result['reference']}:\n{result['message']}"


# -- the comparison helper names what differs ------------------------------------------------------------------------


def test_helper_message_names_the_layer():
    a = {f"layer {i} (tokens)": torch.zeros(1, 4, 8) for i in range(1, 9)}
    b = {k: v.clone() for k, v in a.items()}
    b["layer 7 (tokens)"][0, 2, 3] = 3.2e-2
    b["pooled (cls)"] = torch.zeros(1, 8)
    a["pooled (cls)"] = torch.zeros(1, 9)
    verdicts = conf.compare_outputs(a, b)
    message = conf.failure_message(verdicts)
    assert message.splitlines() == [
        "layer 7 (tokens): max |diff| 3.2e-02 > 1e-05",
        "pooled (cls): shape (1, 9) vs official (1, 8)",
    ]
    assert [v.passed for v in verdicts].count(False) == 2
    assert (
        conf.compare_outputs({}, {"head tokens (neck)": torch.ones(1)})[0].line().endswith("missing on fmcache's side")
    )


def _pair(name: str, size: int = 224):
    return conf.build_pair(name, img_size=size, random_init=True, arch=CONFORMANCE_ARCH[name])


def test_planted_post_norm_tokens_fail_at_every_layer():
    """Caching the layers after the final norm instead of the raw block outputs."""
    pair = _pair("dinov2_vits14")
    adapter = pair.ours.adapter
    real = adapter.forward

    def post_norm(x):
        _, normed, pooled, head = real(x)
        return normed, normed, pooled, head

    adapter.forward = post_norm
    result = conf.compare_pair(pair)
    lines = result["message"].splitlines()
    assert not result["passed"]
    assert lines[0].startswith("layer 1 (tokens): max |diff| ") and lines[0].endswith(" > 1e-05")
    assert any(line.startswith("layer 2 (tokens): ") for line in lines)
    assert not any(line.startswith("pooled") for line in lines)  # the pooled CLS is normed either way


def test_planted_mean_pooling_fails_naming_the_pooled_feature():
    pair = _pair("dinov2_vits14")
    pair.ours.spec = dataclasses.replace(pair.ours.spec, pooled="mean")  # CLS (the paper's DINOv2) → patch mean
    result = conf.compare_pair(pair)
    assert [line.split(":")[0] for line in result["message"].splitlines()] == ["pooled (cls)"]


def test_planted_prenorm_head_tokens_fail_naming_the_head_tokens():
    pair = _pair("mae_vitb16")
    pair.ours.spec = dataclasses.replace(pair.ours.spec, head_tokens="prenorm")  # the follow-up feeds MAE's normed
    result = conf.compare_pair(pair)
    assert [line.split(":")[0] for line in result["message"].splitlines()] == ["head tokens (final)"]


def test_planted_timm_position_resampling_fails_dinov2(monkeypatch: pytest.MonkeyPatch):
    """fmcache before it followed the hub: built at the input size, the table resampled once at load by timm
    (antialiased, to an output size) instead of on every forward with the hub's scale factor."""
    import fmcache.models.foundation as foundation

    real = foundation.get_spec

    def timm_rule(name):
        spec = real(name)
        return dataclasses.replace(spec, positions="timm", native_img_size=None)

    monkeypatch.setattr(foundation, "get_spec", timm_rule)
    result = conf.compare_pair(_pair("dinov2_vits14"))
    assert result["message"].splitlines()[0].startswith("layer 1 (tokens): max |diff| ")


def test_planted_linear_rel_pos_resize_fails_sam_at_its_global_block(monkeypatch: pytest.MonkeyPatch):
    """Resizing SAM's global relative-position tables linearly (timm's run-time rule) instead of the seed's nearest:
    the windowed block 1 still conforms, the global block 2 does not, and the message says so."""
    import fmcache.models.backends as backends
    from fmcache.models.positions import sam_seed_tables

    def linear(state, model):
        out = sam_seed_tables(state, model)
        for key, target in model.state_dict().items():
            if "rel_pos" in key and key in state and state[key].shape != target.shape:
                table = state[key].T[None]
                out[key] = torch.nn.functional.interpolate(table, size=target.shape[0], mode="linear")[0].T
        return out

    monkeypatch.setattr(backends, "sam_seed_tables", linear)
    result = conf.compare_pair(_pair("sam_vit_b"))
    failing = [line.split(":")[0] for line in result["message"].splitlines()]
    assert failing[0] == "layer 2 (tokens)" and "layer 1 (tokens)" not in failing


# -- what the library says when it cannot compare ---------------------------------------------------------------------


def test_missing_official_package_names_the_pip_package(monkeypatch: pytest.MonkeyPatch):
    real = importlib.import_module

    def without_sam(name, *args):
        if name.startswith("segment_anything"):
            raise ImportError("No module named 'segment_anything'")
        return real(name, *args)

    monkeypatch.setattr(conf.importlib, "import_module", without_sam)
    with pytest.raises(FmcacheError, match="pip install segment-anything") as info:
        conf.check_conformance("sam_vit_b", random_init=True, arch=CONFORMANCE_ARCH["sam_vit_b"])
    assert "\n" not in str(info.value)


def test_families_without_an_official_package_say_so():
    with pytest.raises(FmcacheError, match="no official package for focal"):
        conf.check_conformance("focal", random_init=True)
    with pytest.raises(FmcacheError, match="exactly one of --weights FILE"):
        conf.check_conformance("deit_base")


def test_release_file_path_is_compared_as_given(tmp_path):
    """A user's release file (here: random values in DeiT's layout) goes through both loaders."""
    from tests import release_layouts as rl

    path = tmp_path / "deit_base_patch16_224.pth"
    torch.save(rl.deit_release(2), path)
    result = conf.check_conformance("deit_base", path, 224, arch={"depth": 2})
    assert result["passed"], result["message"]
    assert result["weights"] == str(path) and result["img_size"] == 224


def test_cli_checks_a_weights_file_and_records_the_verdict_in_its_cache(tmp_path, aptos_root):
    """`fmcache conformance MODEL --weights FILE --cache CACHE`: the table of outputs, exit 0, and the verdict in the
    manifest of the cache extracted from that file; another file is refused in one line."""
    import json

    import torchvision
    from typer.testing import CliRunner

    from fmcache.cli import app
    from fmcache.extract.run import run_extract
    from fmcache.extract.spec import ExtractSpec

    torch.manual_seed(0)
    path, other = tmp_path / "resnet50.pth", tmp_path / "other.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    torch.save(torchvision.models.resnet50().state_dict(), other)
    spec = ExtractSpec(dataset="aptos2019", data_root=aptos_root, model="resnet50", weights=path, img_size=32,
                       batch_size=8, workers=0, limit=2, cache_root=tmp_path / "cache")  # fmt: skip
    cache = run_extract(spec, progress=False, log=lambda _m: None)
    runner = CliRunner()
    result = runner.invoke(app, ["conformance", "resnet50", "--weights", str(path), "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert "torchvision" in result.output and "DIFFERS" not in result.output
    verdict = json.loads((cache / "manifest.json").read_text())["conformance"]
    assert verdict["passed"] and verdict["img_size"] == 32 and len(verdict["layers"]) == 7
    refused = runner.invoke(app, ["conformance", "resnet50", "--weights", str(other), "--cache", str(cache)])
    assert (
        refused.exit_code == 2
        and refused.output.startswith("error:")
        and "check the cache's own model" in refused.output
    )
