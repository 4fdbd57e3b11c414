from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmcache.errors import FmcacheError
from fmcache.models import create_foundation, get_spec, list_models
from fmcache.models.registry import UNAVAILABLE
from tests.tiny_models import TINY

PAPER_NAMES = [
    "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "sam_vit_b", "sam_vit_l", "sam_vit_h",
    "sam2_b", "sam2_l", "focal", "clip_vitb16", "coca_vitb32", "coca_vitl14", "blip_base", "mae_vitb16",
    "mae_vitl16", "mae_vith14", "aimv2_l14", "aimv2_h14", "deit_base", "dino_vitb16", "resnet152", "resnet50",
]  # fmt: skip


def tiny(name: str, **kw):
    size, overrides, *_ = TINY[name]
    return create_foundation(name, random_init=True, img_size=size, arch_overrides=overrides, **kw)


def test_registry_lists_every_paper_name():
    names = {s.name for s in list_models()}
    assert set(PAPER_NAMES) <= names
    assert {get_spec(n).family for n in PAPER_NAMES} >= {s and get_spec(s).family for s in TINY}


def test_every_family_has_a_tiny_build():
    assert {get_spec(n).family for n in PAPER_NAMES} == {get_spec(n).family for n in TINY}


@pytest.mark.parametrize("name", sorted(TINY))
def test_family_builds_and_gives_per_layer_outputs(name: str):
    size, _, n_layers, n_prefix, width = TINY[name]
    model = tiny(name)
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
    assert len(out.tokens) == n_layers == len(out.pooled_mean)
    assert out.num_prefix_tokens == n_prefix
    assert out.tokens[-1].shape[0] == 2 and out.tokens[-1].shape[-1] == width
    assert out.tokens[-1].shape[1] > n_prefix
    assert out.pooled.shape[0] == 2 and torch.isfinite(out.pooled).all()
    spec = get_spec(name)
    if spec.pooled == "cls":
        assert out.pooled_cls is not None and torch.equal(out.pooled, out.pooled_cls[-1])
    elif spec.pooled == "mean":
        assert torch.equal(out.pooled, out.pooled_mean[-1])
    if n_prefix == 0:
        assert out.pooled_cls is None
    assert model.weights_source["source"] == "random"


def test_grayscale_input_is_repeated_to_rgb():
    model = tiny("dinov2_vits14")
    g = torch.randn(1, 1, 56, 56)
    with torch.no_grad():
        assert torch.allclose(model(g).pooled, model(g.expand(-1, 3, -1, -1)).pooled)


def test_vit_last_layer_matches_forward_features():
    """Consistency between two code paths: the wrapper's last normed CLS equals timm's forward_features CLS."""
    model = tiny("dinov2_vits14")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model(x)
        ref = model.adapter.model.forward_features(x)
    assert torch.allclose(out.pooled_cls[-1], ref[:, 0], atol=1e-5)
    assert torch.allclose(out.pooled_mean[-1], ref[:, 1:].mean(1), atol=1e-5)


def test_cnn_mean_matches_global_average_pool():
    model = tiny("resnet50")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        ref = model.adapter.model.forward_head(model.adapter.model.forward_features(x), pre_logits=True)
    assert torch.allclose(out.pooled, ref, atol=1e-4), "resnet50"
    # SEEM's FocalNet (our own module): the pooled feature is the spatial mean of the normed last stage (res5)
    model = tiny("focal")
    with torch.no_grad():
        out = model(x)
        ref = model.adapter.model(x)["res5"].mean(dim=(2, 3))
    assert torch.allclose(out.pooled, ref, atol=1e-5), "focal"


def test_open_clip_pooled_is_encode_image():
    model = tiny("coca_vitb32")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        ref = model.adapter.visual(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert torch.allclose(out.pooled, ref, atol=1e-5)


def test_blip_cls_is_token_zero():
    model = tiny("blip_base")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        hf = model.adapter.model(pixel_values=x)
    # the paper's BLIP feature is the CLS (index 0) of the normed last hidden state, not a patch token
    assert torch.allclose(out.pooled, hf.last_hidden_state[:, 0], atol=1e-6)
    assert not torch.allclose(out.pooled, hf.last_hidden_state[:, 1], atol=1e-3)


def test_image_size_interpolates_position_embeddings():
    _, overrides, *_ = TINY["dinov2_vits14"]
    model = create_foundation("dinov2_vits14", random_init=True, img_size=112, arch_overrides=overrides)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 112, 112))
    assert out.tokens[-1].shape[1] == 1 + (112 // 14) ** 2


def test_weights_roundtrip_with_module_prefix(tmp_path: Path):
    model = tiny("deit_base")
    state = {f"module.{k}": v for k, v in model.adapter.model.state_dict().items()}
    path = tmp_path / "w.pt"
    torch.save(state, path)
    size, overrides, *_ = TINY["deit_base"]
    loaded = create_foundation("deit_base", weights=path, img_size=size, arch_overrides=overrides)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x).pooled, loaded(x).pooled)
    assert loaded.weights_source["source"] == "file" and len(loaded.weights_source["sha256"]) == 64
    assert "module." in loaded.weights_source["report"]


def test_weights_safetensors_roundtrip(tmp_path: Path):
    from safetensors.torch import save_file

    model = tiny("clip_vitb16")
    path = tmp_path / "w.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in model.adapter.visual.state_dict().items()}, str(path))
    size, overrides, *_ = TINY["clip_vitb16"]
    loaded = create_foundation("clip_vitb16", weights=path, img_size=size, arch_overrides=overrides)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x).pooled, loaded(x).pooled)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, path)
    size, overrides, *_ = TINY["deit_base"]
    with pytest.raises(FmcacheError, match="refused"):
        create_foundation("deit_base", weights=path, img_size=size, arch_overrides=overrides)


def test_mismatched_weights_are_refused(tmp_path: Path):
    other = tiny("dino_vitb16").adapter.model.state_dict()
    other = {k: v for k, v in other.items() if not k.startswith("blocks.1.")}
    path = tmp_path / "partial.pt"
    torch.save(other, path)
    size, overrides, *_ = TINY["deit_base"]
    with pytest.raises(FmcacheError, match="missing"):
        create_foundation("deit_base", weights=path, img_size=size, arch_overrides=overrides)


def test_no_silent_random_fallback(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FmcacheError, match="--weights"):
        create_foundation("focal")  # hub unreachable: must not silently build random weights
    with pytest.raises(FmcacheError, match="exclude"):
        create_foundation("deit_base", weights="x.pt", random_init=True)


@pytest.mark.parametrize(
    ("name", "match"),
    [("vmamba", "not available"), ("dinov3_vitb16", "unknown model"), ("foo:bar", "unknown model backend")],
)
def test_bad_names(name: str, match: str):
    with pytest.raises(FmcacheError, match=match):
        get_spec(name)


@pytest.mark.parametrize(
    ("name", "backend", "arch", "tag"),
    [
        ("timm:vit_small_patch16_224.augreg_in21k", "timm", "vit_small_patch16_224", "augreg_in21k"),
        ("timm:resnet18", "timm", "resnet18", None),
        ("open_clip:ViT-B-32:openai", "open_clip", "ViT-B-32", "openai"),
        ("open_clip:ViT-B-32", "open_clip", "ViT-B-32", None),
        ("hf:facebook/dinov2-small", "hf", "facebook/dinov2-small", None),
    ],
)
def test_escape_hatches(name: str, backend: str, arch: str, tag: str | None):
    spec = get_spec(name)
    assert (spec.backend, spec.arch, spec.tag) == (backend, arch, tag)


def test_escape_hatch_builds_timm_model():
    model = create_foundation("timm:vit_tiny_patch16_224", random_init=True, img_size=32, arch_overrides={"depth": 1})
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert len(out.tokens) == 1 and out.num_prefix_tokens == 1


def test_unavailable_names_are_not_registered():
    assert not set(UNAVAILABLE) & {s.name for s in list_models()}


@pytest.mark.parametrize(
    ("name", "kind"), [("clip_vitb16", "layernorm"), ("blip_base", "layernorm"), ("resnet50", None), ("focal", None)]
)
def test_final_norm_params_come_from_the_adapter(name: str, kind: str | None):
    from fmcache.models.final_norm import final_norm_params

    params = final_norm_params(tiny(name).adapter)
    assert (params and params["kind"]) == kind


# -- the tokens the paper's DeiT head reads (PROTOCOLS.md, "Details that change numbers"), by hand per family ------


def _hand_head_tokens(name: str, model, x: torch.Tensor) -> torch.Tensor:
    """Each seed's DeiT-head input computed with the backend's own modules, not through ``head_tokens``."""
    adapter = model.adapter
    if name == "sam_vit_b":  # WACV seed: the last block's map (neck dropped, no final norm), flattened
        out = adapter.model.forward_intermediates(x, indices=None, norm=False, output_fmt="NCHW",
                                                  intermediates_only=True)  # fmt: skip
        return out[-1].flatten(2).transpose(1, 2)
    if name in ("dinov2_vits14", "deit_base", "dino_vitb16"):  # WACV seed: last block, pre-norm, CLS dropped
        return adapter.model.forward_intermediates(x, indices=None, norm=False, output_fmt="NLC",
                                                   intermediates_only=True)[-1]  # fmt: skip
    if name in ("mae_vitb16", "aimv2_l14"):  # the follow-up: after the final norm, prefix dropped
        feats = adapter.model.forward_features(x)
        return feats[:, adapter.model.num_prefix_tokens :]
    if name == "blip_base":  # WACV seed: BLIP after its final norm, CLS dropped
        return adapter.model(pixel_values=x).last_hidden_state[:, 1:]
    if name == "clip_vitb16":  # WACV seed: the last block's patch tokens before ln_post
        v = adapter.visual
        h = v.transformer(v._embeds(x))
        return h[:, 1:]
    if name == "coca_vitb32":  # the follow-up: attention pooler → ln_post; its first output projected
        v = adapter.visual
        h = v.ln_post(v.attn_pool(v.transformer(v._embeds(x))))
        return torch.cat([(h[:, 0] @ v.proj)[:, None], h[:, 1:]], dim=1)
    if name == "sam2_b":  # the follow-up: the FPN neck's stride-16 vision_features, flattened
        enc = adapter.encoder
        return enc.neck.vision_features(enc.forward_stages(x)).flatten(2).transpose(1, 2)
    if name == "focal":  # WACV seed: SEEM's flattened last stage (res5)
        return adapter.model.forward_stages(x)[-1].flatten(2).transpose(1, 2)
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    ["dinov2_vits14", "sam_vit_b", "clip_vitb16", "blip_base", "focal", "mae_vitb16", "aimv2_l14", "coca_vitb32",
     "sam2_b", "deit_base"],
)  # fmt: skip
def test_head_tokens_are_what_each_seed_feeds_its_deit_head(name):
    torch.manual_seed(0)
    model = tiny(name)
    size = TINY[name][0]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        got = model(x).head_tokens
        want = _hand_head_tokens(name, model, x)
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    rule = get_spec(name).head_tokens
    assert rule == {"blip_base": "final", "mae_vitb16": "final", "aimv2_l14": "final", "coca_vitb32": "pooler",
                    "sam2_b": "neck"}.get(name, "prenorm")  # fmt: skip


# -- position tables as the seeds keep them ------------------------------------------------------------------------


def test_dinov2_keeps_the_release_table_as_its_parameter():
    """The seed's hub DINOv2 is built at 518 and learns its 37 × 37 table, resampled on every forward: fmcache's too,
    at any input size, in the Foundation's forward and in the block view fine-tuning runs."""
    from fmcache.finetune.model import FineTuneModel

    model = tiny("dinov2_vits14")  # 56 px
    table = model.adapter.model.pos_embed
    assert table.shape == (1, 1 + 37 * 37, 384)
    tuned = FineTuneModel(model, torch.nn.Linear(384, 3), "pooled", "none", None)
    tuned.train()
    tuned(torch.randn(2, 3, 56, 56)).sum().backward()
    assert table.grad is not None and table.grad.shape == table.shape and table.grad.abs().sum() > 0


# -- SAM2: Hiera blocks freeze one by one (the follow-up's self.blocks = image_encoder.trunk.blocks) ---------------

SAM2_TINY = {"stages": (1, 2, 2, 1), "global_att_blocks": (4,), "embed_dim": 16, "num_heads": 1}


def _tiny_sam2():
    return create_foundation("sam2_b", random_init=True, img_size=64, arch_overrides=SAM2_TINY)


def test_sam2_block_view_equals_the_foundation():
    """Running Hiera's blocks one by one gives the Foundation's stages (the cached layers), pooled feature and DeiT
    tokens (the neck over stages 3 and 4)."""
    model = _tiny_sam2()
    stages = model.block_layout()
    assert stages.depth == 6 and stages.stage_ends == (0, 2, 4, 5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        h = stages.embed(x)
        for i in range(stages.depth):
            h = stages.run_block(i, h)
        assert len(h.stages) == len(out.tokens) == 4
        for got, want in zip(h.stages, out.tokens, strict=True):
            assert torch.equal(got.flatten(2).transpose(1, 2), want)
        assert torch.equal(stages.pooled(h, last=True), out.pooled)
        assert torch.equal(stages.deit_tokens(h), out.head_tokens)


@pytest.mark.parametrize("k", [0, 2, 5])
def test_sam2_freeze_k_freezes_the_first_k_hiera_blocks(k: int):
    """--freeze K: blocks 1..K get no gradient, blocks K+1.. do; the patch and position embeddings and the FPN neck stay
    frozen (the follow-up freezes the whole image encoder, then unfreezes blocks[K:])."""
    from fmcache.finetune.model import FineTuneModel

    model = FineTuneModel(_tiny_sam2(), torch.nn.Linear(256, 3), "tokens", k, None)
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    blocks = model.stages.blocks
    for i, block in enumerate(blocks):
        grads = [p.grad for p in block.parameters()]
        if i < k:
            assert all(g is None for g in grads), f"block {i + 1} is frozen"
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"block {i + 1} trains"
    encoder = model.foundation.adapter.encoder
    frozen = [encoder.trunk.patch_embed, encoder.neck]
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert encoder.trunk.pos_embed.grad is None and encoder.trunk.pos_embed_window.grad is None


def test_sam2_freeze_none_trains_embeddings_and_neck_and_refuses_what_it_cannot_do():
    from fmcache.finetune.model import FineTuneModel

    model = FineTuneModel(_tiny_sam2(), torch.nn.Linear(256, 3), "pooled", "none", None)
    model.train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    encoder = model.foundation.adapter.encoder
    assert encoder.trunk.pos_embed.grad is not None and encoder.neck.convs[1].conv.weight.grad is not None
    with pytest.raises(FmcacheError, match="--drop-after is not available"):
        FineTuneModel(_tiny_sam2(), torch.nn.Linear(256, 3), "pooled", "all", 3)(torch.randn(1, 3, 64, 64))
    with pytest.raises(FmcacheError, match="without --from-cache"):
        model.stages.from_tokens(torch.randn(1, 16, 32))
