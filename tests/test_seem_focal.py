"""SEEM's FocalNet-T: the paper's checkpoint layout loads strictly, stage shapes, a locked regression value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmcache.errors import FmcacheError
from fmcache.models import create_foundation
from fmcache.models.seem_focal import SeemFocalNet


def seem_focalt_layout() -> dict[str, tuple[int, ...]]:
    """The backbone tensors of ``seem_focalt_v0.pt`` (``backbone.`` stripped) and their shapes, written out from
    SEEM's focal-T config (width 96, depths 2-2-6-2, 3 focal levels of windows 3/5/7, conv embedding, layer scale),
    independently of :mod:`fmcache.models.seem_focal`."""
    out: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (96, 3, 7, 7),
        "patch_embed.proj.bias": (96,),
        "patch_embed.norm.weight": (96,),
        "patch_embed.norm.bias": (96,),
    }
    for i, depth in enumerate((2, 2, 6, 2)):
        c = 96 * 2**i
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            out |= {
                b + "dw1.weight": (c, 1, 3, 3),
                b + "dw1.bias": (c,),
                b + "norm1.weight": (c,),
                b + "norm1.bias": (c,),
                b + "modulation.f.weight": (2 * c + 4, c),
                b + "modulation.f.bias": (2 * c + 4,),
                b + "modulation.h.weight": (c, c, 1, 1),
                b + "modulation.h.bias": (c,),
                b + "modulation.proj.weight": (c, c),
                b + "modulation.proj.bias": (c,),
                **{b + f"modulation.focal_layers.{k}.0.weight": (c, 1, 3 + 2 * k, 3 + 2 * k) for k in range(3)},
                b + "dw2.weight": (c, 1, 3, 3),
                b + "dw2.bias": (c,),
                b + "norm2.weight": (c,),
                b + "norm2.bias": (c,),
                b + "mlp.fc1.weight": (4 * c, c),
                b + "mlp.fc1.bias": (4 * c,),
                b + "mlp.fc2.weight": (c, 4 * c),
                b + "mlp.fc2.bias": (c,),
                b + "gamma_1": (c,),
                b + "gamma_2": (c,),
            }
        if i < 3:
            d = f"layers.{i}.downsample."
            out |= {
                d + "proj.weight": (2 * c, c, 3, 3),
                d + "proj.bias": (2 * c,),
                d + "norm.weight": (2 * c,),
                d + "norm.bias": (2 * c,),
            }
    for i in range(4):
        out |= {f"norm{i}.weight": (96 * 2**i,), f"norm{i}.bias": (96 * 2**i,)}
    return out


@pytest.fixture(scope="module")
def seem_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random file in the layout of SEEM's release: one flat dict, the backbone under ``backbone.``, beside
    tensors of the rest of SEEM (pixel decoder, predictor)."""
    gen = torch.Generator().manual_seed(123)
    state = {f"backbone.{k}": torch.randn(shape, generator=gen) for k, shape in seem_focalt_layout().items()}
    state["sem_seg_head.pixel_decoder.adapter_1.weight"] = torch.randn(512, 96, 1, 1, generator=gen)
    state["sem_seg_head.pixel_decoder.layer_1.norm.weight"] = torch.randn(512, generator=gen)
    state["sem_seg_head.predictor.query_feat.weight"] = torch.randn(101, 512, generator=gen)
    state["sem_seg_head.predictor.lang_encoder.logit_scale"] = torch.randn((), generator=gen)
    path = tmp_path_factory.mktemp("seem") / "seem_focalt_v0.pt"
    torch.save(state, path)
    return path, state


def test_module_layout_is_seem_focalt():
    """Every key, shape and order of the checkpoint's backbone, and nothing else (no buffers)."""
    model = SeemFocalNet()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == seem_focalt_layout()
    assert len(got) == 300
    assert not list(model.buffers())


def test_seem_checkpoint_loads_every_tensor_and_runs_at_224(seem_checkpoint):
    path, state = seem_checkpoint
    model = create_foundation("focal", weights=path, img_size=224)
    backbone = model.adapter.model
    own = backbone.state_dict()
    assert len(own) == 300
    for key, tensor in own.items():
        assert torch.equal(tensor, state[f"backbone.{key}"]), key
    assert model.weights_source["source"] == "file"
    assert "backbone." in model.weights_source["report"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert [tuple(t.shape) for t in out.tokens] == [(1, 3136, 96), (1, 784, 192), (1, 196, 384), (1, 49, 768)]
    assert out.num_prefix_tokens == 0 and out.pooled_cls is None
    assert out.pooled.shape == (1, 768) and torch.allclose(out.pooled, out.tokens[-1].mean(1))


@pytest.mark.slow  # about 11 s for the full-size forward on 2 CPU cores
def test_seem_checkpoint_runs_at_1024(seem_checkpoint):
    path, _ = seem_checkpoint
    model = create_foundation("focal", weights=path, img_size=1024)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 1024, 1024))
    assert [t.shape[1] for t in out.tokens] == [256**2, 128**2, 64**2, 32**2]
    assert out.tokens[-1].shape[-1] == 768 and torch.isfinite(out.pooled).all()


def test_hub_route_loads_backbone_keys_strictly(seem_checkpoint, monkeypatch: pytest.MonkeyPatch):
    """The hub route downloads xdecoder/SEEM seem_focalt_v0.pt and keeps its backbone.* tensors, as the seed does."""
    import huggingface_hub

    path, state = seem_checkpoint
    asked = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        asked.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = create_foundation("focal")
    assert asked == [("xdecoder/SEEM", "seem_focalt_v0.pt")]
    assert model.weights_source == {"source": "hub", "id": "seem:xdecoder/SEEM:seem_focalt_v0.pt"}
    own = model.adapter.model.state_dict()
    assert all(torch.equal(v, state[f"backbone.{k}"]) for k, v in own.items())


def test_stage_shapes_at_224():
    torch.manual_seed(0)
    model = SeemFocalNet().eval()
    with torch.no_grad():
        stages = model.forward_stages(torch.randn(2, 3, 224, 224))
    assert [tuple(s.shape[1:]) for s in stages] == [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]
    with torch.no_grad():
        res = model(torch.randn(1, 3, 96, 96))
    assert list(res) == ["res2", "res3", "res4", "res5"]


def test_fixed_input_regression_value():
    """Locked output of a tiny build (values measured once; this module matched SEEM's own focal_dw to 5e-7)."""
    torch.manual_seed(0)
    model = SeemFocalNet(embed_dim=16, depths=(1, 1, 1, 1)).eval()
    x = torch.sin(torch.arange(2 * 3 * 64 * 64, dtype=torch.float32) * 0.01).reshape(2, 3, 64, 64)
    with torch.no_grad():
        stages = model.forward_stages(x)
    assert [tuple(s.shape) for s in stages] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    last = stages[-1]
    assert last[0, 0, 0, 0].item() == pytest.approx(0.492643, abs=1e-4)
    assert last[1, -1, -1, -1].item() == pytest.approx(-0.171681, abs=1e-4)
    assert stages[1][0, 0, 0, 0].item() == pytest.approx(-2.447194, abs=1e-4)
    assert last.abs().sum().item() == pytest.approx(801.9841, abs=1e-2)
    pooled = last.mean(dim=(2, 3))[0, :4].tolist()
    assert pooled == pytest.approx([0.028118, -0.329851, 0.186488, -0.483040], abs=1e-4)


def test_checkpoint_missing_a_tensor_is_refused(seem_checkpoint, tmp_path: Path):
    _, state = seem_checkpoint
    partial = {k: v for k, v in state.items() if k != "backbone.layers.2.blocks.5.gamma_2"}
    path = tmp_path / "partial.pt"
    torch.save(partial, path)
    with pytest.raises(FmcacheError, match="missing"):
        create_foundation("focal", weights=path, img_size=224)


def test_checkpoint_with_a_misshaped_tensor_is_refused(seem_checkpoint, tmp_path: Path):
    _, state = seem_checkpoint
    bad = dict(state)
    bad["backbone.layers.0.blocks.0.modulation.f.weight"] = torch.zeros(96 * 2 + 3, 96)  # 2 focal levels, not 3
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(FmcacheError, match="wrong shape"):
        create_foundation("focal", weights=path, img_size=224)


def test_hub_file_without_backbone_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub

    path = tmp_path / "other.pt"
    torch.save({"sem_seg_head.x": torch.zeros(1)}, path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(path))
    with pytest.raises(FmcacheError, match="backbone"):
        create_foundation("focal")
