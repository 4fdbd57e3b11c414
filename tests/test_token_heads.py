"""Token heads: the DeiT head equals timm's VisionTransformer on the same tokens; weights load strictly."""

from __future__ import annotations

import pickle

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fmcache.errors import FmcacheError
from fmcache.frozen.heads import AttentiveHead, DeiTHead, deit_pretrained_state, load_deit_weights, token_grid

DEPTH = 2
CLASSES = 3


def _timm_twin(head: DeiTHead, dynamic: bool) -> VisionTransformer:
    """timm's DeiT-B layout with patch_embed = Identity, holding the head's weights."""
    vit = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=768, depth=head.depth, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
        num_classes=CLASSES, drop_rate=0.0, drop_path_rate=0.0, dynamic_img_size=dynamic,
    )  # fmt: skip
    vit.patch_embed = _IdentityEmbed(vit.patch_embed.grid_size)
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("proj.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("patch_embed") for k in missing)
    return vit.eval()


class _IdentityEmbed(nn.Identity):
    """Identity that keeps ``grid_size`` (timm's dynamic position resampling reads it)."""

    def __init__(self, grid_size):
        super().__init__()
        self.grid_size = grid_size


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (7, 7)])
def test_deit_head_equals_timm_vit_on_tokens(grid):
    torch.manual_seed(0)
    head = DeiTHead(768, CLASSES, depth=DEPTH).eval()
    head.proj = nn.Identity()  # the consistency check: projection set to identity
    tokens = torch.randn(2, grid[0] * grid[1], 768)
    with torch.no_grad():
        ours = head(tokens)
        if grid == (14, 14):
            theirs = _timm_twin(head, dynamic=False)(tokens)
        else:
            twin = _timm_twin(head, dynamic=True)
            # timm's dynamic size resamples with antialias (a PIL-style cubic kernel, also when upsampling); the
            # seed, and so fmcache, calls plain F.interpolate: give the twin that one resampling step
            twin._pos_embed = _no_antialias(twin)
            theirs = twin(tokens.reshape(2, grid[0], grid[1], 768))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _no_antialias(vit: VisionTransformer):
    from timm.layers import resample_abs_pos_embed

    def pos_embed(x):
        b, h, w, c = x.shape
        table = resample_abs_pos_embed(vit.pos_embed, [h, w], [14, 14], 1, "bicubic", antialias=False)
        return torch.cat([vit.cls_token.expand(b, -1, -1), x.reshape(b, -1, c)], dim=1) + table

    return pos_embed


def test_deit_head_projects_any_width_and_infers_grid():
    torch.manual_seed(0)
    head = DeiTHead(40, CLASSES, depth=1)
    assert head(torch.randn(3, 49, 40)).shape == (3, CLASSES)
    with pytest.raises(FmcacheError, match="square grid"):
        head(torch.randn(3, 50, 40))
    assert token_grid(256) == (16, 16)
    with pytest.raises(FmcacheError, match="head-depth"):
        DeiTHead(40, CLASSES, depth=13)


def test_attentive_head_shapes_and_heads():
    torch.manual_seed(0)
    head = AttentiveHead(128, CLASSES)
    assert head.num_heads == 2
    assert head(torch.randn(4, 10, 128)).shape == (4, CLASSES)
    assert AttentiveHead(1000, 2).num_heads == 10  # 1000 / 64 → 15; the first divisor of 1000 below it
    # the output depends on every token through the attention
    x = torch.randn(1, 5, 128, requires_grad=True)
    head(x).sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


def _deit_state(depth: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DeiT-B state dict in timm's layout (patch embedding and classifier included, as the release files)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(embed_dim=768, depth=depth, num_heads=12, num_classes=1000)
    return vit.state_dict()


@pytest.fixture(scope="module")
def deit_file(tmp_path_factory):
    """DeiT's release layout {'model': {...}} with 2 blocks (a real file has 12; --head-depth 2 takes the first 2)."""
    path = tmp_path_factory.mktemp("deit") / "deit_base_patch16_224.pth"
    torch.save({"model": _deit_state(depth=DEPTH)}, path)
    return path


def test_head_weights_file_loads_blocks_and_drops_classifier(deit_file):
    torch.manual_seed(1)
    head = DeiTHead(384, CLASSES, depth=DEPTH)
    proj_before = head.proj[0].weight.clone()
    info = load_deit_weights(head, deit_file)
    release = torch.load(deit_file, weights_only=True)["model"]
    assert torch.equal(head.blocks[1].mlp.fc2.weight, release["blocks.1.mlp.fc2.weight"])
    assert torch.equal(head.pos_embed, release["pos_embed"]) and torch.equal(head.norm.bias, release["norm.bias"])
    assert torch.equal(head.proj[0].weight, proj_before)  # new parts keep their seeded init
    assert head.head.weight.shape == (CLASSES, 768)
    assert info["source"] == "file" and info["left_out"] == 4  # patch_embed.proj.{weight,bias}, head.{weight,bias}


def test_head_weights_file_refusals(tmp_path, deit_file):
    with pytest.raises(FmcacheError, match="missing"):
        deit_pretrained_state(deit_file, depth=3)  # the file holds 2 blocks
    bad = _deit_state(depth=1)
    bad["pos_embed"] = torch.zeros(1, 50, 768)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(FmcacheError, match="wrong shape"):
        deit_pretrained_state(tmp_path / "bad.pt", depth=1)
    with pytest.raises(FmcacheError, match="does not exist"):
        deit_pretrained_state(tmp_path / "nope.pt", depth=1)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print))
    with pytest.raises(FmcacheError, match="refused"):
        deit_pretrained_state(tmp_path / "evil.pt", depth=1)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _deit_state(depth=1).items()}, tmp_path / "timm.safetensors")
    state, info = deit_pretrained_state(tmp_path / "timm.safetensors", depth=1)
    assert "blocks.0.attn.qkv.weight" in state and info["loaded"] == info["total"]


def test_imagenet_head_weights_offline_is_one_line(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nto load this file")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FmcacheError) as info:
        deit_pretrained_state("imagenet", depth=1)
    message = str(info.value)
    assert "\n" not in message and "--head-weights FILE" in message and "--head-random-init" in message


def test_deit_head_new_layers_keep_pytorch_default_init():
    """The seed builds the projection and the classifier as plain nn.Linear/LayerNorm: PyTorch's default init
    (kaiming-uniform, bound 1/sqrt(fan_in)), not timm's trunc-normal 0.02, which DeiT's own parts keep."""
    torch.manual_seed(0)
    head = DeiTHead(64, 5, depth=1)
    proj, norm = head.proj[0], head.proj[1]
    bound = 1 / 64**0.5
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.1  # trunc-normal 0.02 stays under 0.04
    assert proj.bias.abs().max() > 0  # default Linear bias is uniform, not zeros
    assert norm.eps == 1e-5 and torch.equal(norm.weight, torch.ones(768))
    assert head.head.bias.abs().max() > 0 and head.head.weight.abs().max() <= 1 / 768**0.5
    assert head.blocks[0].attn.qkv.bias.abs().max() == 0  # DeiT's blocks: timm's init (zero biases)
