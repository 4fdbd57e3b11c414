"""Every paper checkpoint, saved in its original release layout with random values, loads through ``--weights``:
every model tensor comes from the file (none left at init), and the forward runs at 224 (and 1024 where the paper
uses it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fmcache.errors import FmcacheError
from fmcache.models import create_foundation
from tests import release_layouts as rl
from tests.tiny_models import _CLIP, _COCA

DEPTH = 2  # the release's widths and tables, two blocks


def _file_values(obj: object) -> dict[tuple, list[torch.Tensor]]:
    while isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for value in obj.values():  # type: ignore[union-attr]
        by_shape.setdefault(tuple(value.shape), []).append(value)
    return by_shape


def _model_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.adapter.state_dict().items() if not k.endswith("num_batches_tracked")}


def load_release(
    tmp_path: Path, name: str, obj: dict, img_size: int = 224, overrides: dict | None = None, resampled: tuple = ()
):
    """Save ``obj`` as the release file, load it, and check every model tensor was filled from the file.

    ``resampled`` names tensors the loader resamples to the built size (they must differ from a random build).
    """
    path = tmp_path / "release.pth"
    torch.save(obj, path)
    model = create_foundation(name, weights=path, img_size=img_size, arch_overrides=overrides)
    init = _model_state(create_foundation(name, random_init=True, img_size=img_size, arch_overrides=overrides))
    values = _file_values(obj)
    state = _model_state(model)
    assert state.keys() == init.keys()
    for key, tensor in state.items():
        if any(key.endswith(r) for r in resampled):
            assert not torch.equal(tensor, init[key]), f"{key} left at init"
            continue
        candidates = values.get(tuple(tensor.shape), [])
        assert any(torch.equal(tensor, v.to(tensor.dtype)) for v in candidates), f"{key} not filled from the file"
    loaded, total = re.search(r"loaded (\d+)/(\d+) model tensors", model.weights_source["report"]).groups()
    assert loaded == total  # every model tensor named in the file (the per-tensor check above: filled from it)
    return model


def _forward(model, size: int):
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert torch.isfinite(out.pooled).all()
    return out


SAM_RESIZED = ("model.pos_embed", "blocks.1.attn.rel_pos_h", "blocks.1.attn.rel_pos_w")  # global block 1's tables


def test_sam_vit_b_release_loads_at_224(tmp_path: Path):
    overrides = {"depth": DEPTH, "global_attn_indexes": (1,)}
    model = load_release(tmp_path, "sam_vit_b", rl.sam_release(DEPTH, global_blocks=(1,)), overrides=overrides,
                         resampled=SAM_RESIZED)  # fmt: skip
    out = _forward(model, 224)
    assert out.tokens[-1].shape == (1, 14 * 14, 768) and out.pooled.shape == (1, 768)
    assert "unexpected" in model.weights_source["report"] or model.weights_source["unexpected_keys"] == []


@pytest.mark.slow
def test_sam_vit_b_release_runs_at_1024(tmp_path: Path):
    overrides = {"depth": DEPTH, "global_attn_indexes": (1,)}
    model = load_release(tmp_path, "sam_vit_b", rl.sam_release(DEPTH, global_blocks=(1,)), 1024, overrides)
    assert _forward(model, 1024).tokens[-1].shape == (1, 64 * 64, 768)


def test_sam_tables_are_resized_once_at_load_as_the_seed(tmp_path: Path):
    """At 224 the WACV seed builds SAM's encoder at 224 and resizes the release's tables at load: the global blocks'
    relative-position tables (127 → 27 rows) with F.interpolate's default mode (nearest), the 64 × 64 table bicubic
    with antialias (→ 14 × 14); the windowed blocks' 27-row tables load as released. These are the parameters
    fine-tuning trains, as in the seed."""
    release = rl.sam_release(DEPTH, (1,))
    model = load_release(tmp_path, "sam_vit_b", release, overrides={"depth": DEPTH, "global_attn_indexes": (1,)},
                         resampled=SAM_RESIZED)  # fmt: skip
    timm_model = model.adapter.model
    blocks = timm_model.blocks
    assert blocks[0].attn.rel_pos_h.shape == (27, 64) and blocks[1].attn.rel_pos_h.shape == (27, 64)
    assert torch.equal(blocks[0].attn.rel_pos_h, release["image_encoder.blocks.0.attn.rel_pos_h"])
    table = release["image_encoder.blocks.1.attn.rel_pos_w"]  # (127, 64): row 63 is offset 0
    nearest = table[[(i * 127) // 27 for i in range(27)]]  # nearest's source row for each target row
    assert torch.equal(blocks[1].attn.rel_pos_w, nearest)
    grid = release["image_encoder.pos_embed"].permute(0, 3, 1, 2)
    bicubic = torch.nn.functional.interpolate(grid, size=14, mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(timm_model.pos_embed, bicubic, rtol=0, atol=1e-6)
    assert all(m.eps == 1e-6 for m in timm_model.modules() if isinstance(m, torch.nn.LayerNorm))  # SAM's, not timm's


def test_blip_model_base_loads_at_224_and_384(tmp_path: Path):
    obj = rl.blip_release(DEPTH)
    overrides = {"num_hidden_layers": DEPTH}
    model = load_release(tmp_path, "blip_base", obj, 224, overrides)
    assert model.img_size == 224
    hf = model.adapter.model
    assert hf.config.layer_norm_eps == 1e-6  # BLIP's own ViT, not transformers' default 1e-5
    out = _forward(model, 224)
    assert out.tokens[-1].shape == (1, 197, 768)
    # CLS is token 0 of the normed last layer, equal to BLIP's visual_encoder output[:, 0]
    assert torch.allclose(out.pooled, out.pooled_cls[-1])
    big = load_release(tmp_path, "blip_base", obj, 384, overrides, resampled=("embeddings.position_embedding",))
    assert _forward(big, 384).tokens[-1].shape == (1, 577, 768)


def test_blip_default_size_is_the_papers():
    from fmcache.models import get_spec

    spec = get_spec("blip_base")
    assert spec.default_img_size == 224
    assert "model_base.pth" in spec.paper_weights


def test_blip_momentum_encoder_is_not_taken_for_the_encoder(tmp_path: Path):
    obj = rl.blip_release(DEPTH)
    del obj["model"]["visual_encoder.cls_token"]
    torch.save(obj, tmp_path / "w.pth")
    with pytest.raises(FmcacheError, match="missing"):
        create_foundation("blip_base", weights=tmp_path / "w.pth", arch_overrides={"num_hidden_layers": DEPTH})


def test_dinov2_release_loads_at_224(tmp_path: Path):
    """Built at 518 as the seed's hub model: the 37 × 37 table loads as released and stays the parameter (resampled
    on every forward), at any input size."""
    model = load_release(tmp_path, "dinov2_vitb14", rl.dinov2_release(DEPTH), 224, {"depth": DEPTH})
    assert model.adapter.model.pos_embed.shape == (1, 1 + 37 * 37, 768)
    assert _forward(model, 224).tokens[-1].shape == (1, 1 + 16 * 16, 768)


def test_dinov2_giant_swiglu_release_loads(tmp_path: Path):
    model = load_release(tmp_path, "dinov2_vitg14", rl.dinov2_release(DEPTH, dim=1536), 224, {"depth": DEPTH})
    assert _forward(model, 224).tokens[-1].shape == (1, 1 + 16 * 16, 1536)


@pytest.mark.slow
def test_dinov2_release_loads_at_1024(tmp_path: Path):
    model = load_release(tmp_path, "dinov2_vitb14", rl.dinov2_release(DEPTH), 1022, {"depth": DEPTH})
    assert model.adapter.model.pos_embed.shape == (1, 1 + 37 * 37, 768)
    assert _forward(model, 1022).tokens[-1].shape == (1, 1 + 73 * 73, 768)


@pytest.mark.parametrize(
    ("name", "builder"),
    [("deit_base", rl.deit_release), ("dino_vitb16", rl.dino_release), ("mae_vitb16", rl.mae_release)],
)
def test_timm_style_vit_releases_load(tmp_path: Path, name: str, builder):
    model = load_release(tmp_path, name, builder(DEPTH), 224, {"depth": DEPTH})
    assert _forward(model, 224).tokens[-1].shape == (1, 197, 768)


def test_deit_classifier_is_reported_not_loaded(tmp_path: Path):
    model = load_release(tmp_path, "deit_base", rl.deit_release(DEPTH), 224, {"depth": DEPTH})
    assert set(model.weights_source["unexpected_keys"]) == {"head.bias", "head.weight"}


def test_aimv2_release_loads(tmp_path: Path):
    from safetensors.torch import save_file

    state = rl.aimv2_release(DEPTH)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    model = create_foundation("aimv2_l14", weights=path, img_size=224, arch_overrides={"depth": DEPTH})
    values = _file_values(state)
    for key, tensor in _model_state(model).items():
        assert any(torch.equal(tensor, v) for v in values.get(tuple(tensor.shape), [])), key
    assert _forward(model, 224).tokens[-1].shape == (1, 256, 1024)


def test_sam2_release_loads_trunk_and_neck(tmp_path: Path):
    stages = (1, 2, 2, 1)  # SAM2.1 b+ widths and tables, fewer blocks per stage
    overrides = {"stages": stages, "global_att_blocks": (4,)}
    model = load_release(tmp_path, "sam2_b", rl.sam2_release(stages), 224, overrides)
    out = _forward(model, 224)
    assert [t.shape[-1] for t in out.tokens] == [112, 224, 448, 896]
    assert out.tokens[2].shape[1] == 14 * 14
    assert out.pooled_kind == "pooled" and out.pooled.shape == (1, 256)  # the neck's vision_features, pooled


def test_sam2_paper_feature_is_the_fused_stride16_level(tmp_path: Path):
    stages = (1, 2, 2, 1)
    model = load_release(
        tmp_path, "sam2_b", rl.sam2_release(stages), 224, {"stages": stages, "global_att_blocks": (4,)}
    )
    x = torch.randn(1, 3, 224, 224)
    enc = model.adapter.encoder
    with torch.no_grad():
        s = enc.forward_stages(x)
        top = torch.nn.functional.conv2d(s[3], enc.neck.convs[0].conv.weight, enc.neck.convs[0].conv.bias)
        lat = torch.nn.functional.conv2d(s[2], enc.neck.convs[1].conv.weight, enc.neck.convs[1].conv.bias)
        expected = (lat + top.repeat_interleave(2, -1).repeat_interleave(2, -2)).mean((2, 3))
        assert torch.allclose(model(x).pooled, expected, atol=1e-5)


@pytest.mark.parametrize("counters", [True, False])
def test_torchvision_resnet_release_loads(tmp_path: Path, counters: bool):
    model = load_release(tmp_path, "resnet50", rl.torchvision_resnet_release("resnet50", counters))
    assert model.weights_source["unexpected_keys"] == ["fc.bias", "fc.weight"]
    assert _forward(model, 224).pooled.shape == (1, 2048)


def _clip_overrides(cfg: dict) -> dict:
    return {"vision_cfg": dict(cfg["vision_cfg"], layers=DEPTH), "text_cfg": dict(cfg["text_cfg"], layers=1)}


def test_open_clip_release_loads(tmp_path: Path):
    overrides = _clip_overrides(_CLIP)
    model = load_release(tmp_path, "clip_vitb16", rl.open_clip_release("ViT-B-16", overrides), 224, overrides)
    assert _forward(model, 224).pooled.shape == (1, 512)


def test_coca_release_loads(tmp_path: Path):
    overrides = {**_clip_overrides(_COCA), "multimodal_cfg": dict(_COCA["multimodal_cfg"], layers=1)}
    model = load_release(tmp_path, "coca_vitb32", rl.open_clip_release("coca_ViT-B-32", overrides), 224, overrides)
    assert _forward(model, 224).pooled.shape[0] == 1


def test_hub_errors_say_what_failed(monkeypatch):
    import timm

    def broken(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for VisionTransformer: size mismatch for pos_embed")

    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(FmcacheError) as info:
        create_foundation("deit_base")
    assert "offline" not in str(info.value) and "size mismatch" in str(info.value)


def test_sam_hub_weights_are_resized_as_a_release_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The hub's SAM (timm builds it at 1024 with the released tables) goes through the same seed resizing at 224 as
    a release file does: the two give the same model."""
    import fmcache.models.backends as backends

    overrides = {"depth": DEPTH, "global_attn_indexes": (1,)}
    release = rl.sam_release(DEPTH, (1,))
    from_file = load_release(tmp_path, "sam_vit_b", release, overrides=overrides, resampled=SAM_RESIZED)
    real = backends._create_timm

    def offline_hub(name, pretrained, img_size, kwargs):
        model = real(name.split(".")[0], False, img_size, kwargs)
        if pretrained:  # what timm's hub loading gives: the release at 1024, through timm's SAM filter
            assert img_size == 1024
            from timm.models.vision_transformer_sam import checkpoint_filter_fn

            model.load_state_dict(checkpoint_filter_fn(release, model), strict=False)
        return model

    monkeypatch.setattr(backends, "_create_timm", offline_hub)
    from_hub = create_foundation("sam_vit_b", img_size=224, arch_overrides=overrides)
    hub_state, file_state = from_hub.adapter.state_dict(), from_file.adapter.state_dict()
    assert hub_state.keys() == file_state.keys()
    assert all(torch.equal(hub_state[k], file_state[k]) for k in hub_state if not k.startswith("model.neck."))
