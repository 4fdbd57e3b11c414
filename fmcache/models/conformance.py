"""Conformance: fmcache's foundation against the official implementation, layer by layer, for the same weights.

Users publish numbers made with fmcache, so a silent departure from the official model (a pre-norm token cached as
post-norm, CLS pooled instead of the patch mean, another position-table interpolation) is the worst bug it could
have. :func:`check_conformance` builds both sides from one weights file in the release's own layout (a user's
release file, or random weights saved in that layout with ``random_init``), loads it into fmcache through the same
``--weights`` path ``extract`` uses and into the official model the way the paper's seed code does, forwards the same
synthetic images and compares every cached layer, the paper's pooled feature and the DeiT head's tokens.

The official side, per family (each imported only here, lazily):

| family | official implementation (pip package) | how the seed loads it |
|---|---|---|
| dinov2 | ``dinov2`` (facebookresearch/dinov2's ``DinoVisionTransformer``) | torch.hub model: built at 518 px |
| sam | ``segment-anything`` (``ImageEncoderViT``) | built at the input size, tables resized at load (the seed) |
| sam2 | ``sam2`` (Hiera + ``FpnNeck`` in ``ImageEncoder``, scalp 1) | the release's ``image_encoder.*`` |
| openclip, coca | ``open-clip-torch`` (``load_checkpoint``, ``encode_image``) | open_clip's own loader |
| deit, dino, mae | ``timm`` (their releases are timm's ViT layout; DINO's own ViT has the same arithmetic) | timm module |
| blip | ``timm`` ViT with BLIP's settings (BLIP's ``vit.py`` is timm's ViT with LayerNorm eps 1e-6) | ``visual_encoder.*`` |
| aimv2 | ``transformers`` (``Aimv2VisionModel``; the release's ``preprocessor/trunk`` names mapped to it) | |
| resnet | ``torchvision`` (``resnet50/152``) | torchvision's file |

SEEM's FocalNet ships only inside the SEEM repository (no package installs it); ``tests/test_seem_focal.py`` checks
fmcache's module against that release's arithmetic instead.
"""

from __future__ import annotations

import importlib
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fmcache.errors import FmcacheError
from fmcache.models.foundation import Foundation, create_foundation
from fmcache.models.registry import ModelSpec, get_spec
from fmcache.weightfiles import read_state_dict

TOLERANCE = 1e-5  # max |diff| in fp32; two correct implementations differ by ~1e-6 on O(10) activations


# -- comparing outputs: one helper, whose message names the layer ------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One compared output: ``name`` (``layer 7 (tokens)``, ``pooled (cls)``, ``head tokens (prenorm)``)."""

    name: str
    max_abs_diff: float
    tolerance: float
    note: str = ""  # set when the shapes differ (max_abs_diff is then inf)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        """``layer 7 (tokens): max |diff| 3.2e-02 > 1e-05`` (or ``≤`` when it passes)."""
        if self.note:
            return f"{self.name}: {self.note}"
        return f"{self.name}: max |diff| {self.max_abs_diff:.1e} {'≤' if self.passed else '>'} {self.tolerance:.0e}"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "note": self.note,
        }


def compare_outputs(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tolerance: float = TOLERANCE
) -> list[Verdict]:
    """A verdict per output the official side gives, in its order; an output fmcache lacks or shapes differently
    fails with a note saying so."""
    verdicts = []
    for name, want in theirs.items():
        got = ours.get(name)
        if got is None:
            verdicts.append(Verdict(name, math.inf, tolerance, "missing on fmcache's side"))
        elif tuple(got.shape) != tuple(want.shape):
            verdicts.append(
                Verdict(name, math.inf, tolerance, f"shape {tuple(got.shape)} vs official {tuple(want.shape)}")
            )
        else:
            diff = (got.detach().double() - want.detach().double()).abs().max().item()
            verdicts.append(Verdict(name, diff if math.isfinite(diff) else math.inf, tolerance))
    return verdicts


def failure_message(verdicts: list[Verdict]) -> str:
    """The failing verdicts, one per line (empty when all pass): what a test or the CLI prints."""
    return "\n".join(v.line() for v in verdicts if not v.passed)


def foundation_outputs(
    model: Foundation, images: torch.Tensor, spec: ModelSpec | None = None
) -> dict[str, torch.Tensor]:
    """fmcache's side: every cached layer's tokens, the paper's pooled feature and the DeiT head's tokens, named as
    the registry's ``spec`` names them (default: the model's own), so a planted change still meets its reference."""
    with torch.no_grad():
        out = model(images)
    return _named(list(out.tokens), out.pooled, out.head_tokens, spec or model.spec)


def _named(layers: list[torch.Tensor], pooled: torch.Tensor, head: torch.Tensor, spec: ModelSpec) -> dict:
    """The official side's outputs under the names :func:`foundation_outputs` gives fmcache's."""
    kind = spec.pooled if spec.pooled != "auto" else "cls"  # the escape hatches have no reference here
    named = {f"layer {i + 1} (tokens)": t for i, t in enumerate(layers)}
    named[f"pooled ({kind})"] = pooled
    named[f"head tokens ({spec.head_tokens})"] = head
    return named


# -- random weights with signal ---------------------------------------------------------------------------------------


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every tensor, so no difference hides behind a zero init (SAM's relative-position tables,
    DINOv2's layer scale and many position tables start at zero): norms' weights 1 + 0.1·N, their biases 0.1·N;
    position tables and tokens 0.5·N; matrices N / sqrt(fan-in) (activations stay O(1)); other vectors 0.1·N."""
    gen = torch.Generator().manual_seed(seed)
    norms = {
        id(p): name
        for m in model.modules()
        if "norm" in type(m).__name__.lower()
        for name, p in m.named_parameters(recurse=False)
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if id(p) in norms:
                value = 1 + 0.1 * noise if norms[id(p)] == "weight" else 0.1 * noise
            elif any(k in name for k in ("pos", "cls_token", "class_embedding", "query", "register")):
                value = 0.5 * noise
            elif p.ndim >= 2:
                value = noise / math.sqrt(p[0].numel())
            else:
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model


def synthetic_images(batch: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """Deterministic normalised images: smooth gradients and blobs (structure across patches) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1.5, 1.5, img_size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    images = []
    for _ in range(batch):
        a, b, c = (torch.rand(3, generator=gen) * 2 - 1).tolist()
        base = torch.stack([a * xx + b * yy, torch.sin(3 * (xx + c)) * torch.cos(2 * yy), (xx**2 + yy**2) - 1])
        images.append(base + 0.3 * torch.randn(3, img_size, img_size, generator=gen))
    return torch.stack(images)


# -- the official side, per family ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """How one family's official implementation is built, saved in its release layout, loaded and run.

    ``build(spec, img_size, arch)`` builds the official model as the seed does for that input size; ``release``
    turns a model built at ``release_size`` into the object of the release file; ``load(model, path, img_size)``
    loads a release file as the seed does; ``run(model, images, spec)`` gives the named outputs;
    ``overrides(arch)`` is the same architecture as fmcache ``arch_overrides``.
    """

    package: str  # what to pip install
    module: str  # what must import
    what: str
    build: Callable[[ModelSpec, int, dict], nn.Module]
    release: Callable[[nn.Module], dict]
    load: Callable[[nn.Module, Path, int], None]
    run: Callable[[nn.Module, torch.Tensor, ModelSpec], dict]
    overrides: Callable[[dict], dict] = dict
    release_size: int | None = None  # None: the input size


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], allowed_missing: tuple[str, ...] = ()) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit: the file is not this architecture (or size)
        first = str(exc).strip().splitlines()
        raise FmcacheError(f"the official model refused the file: {' '.join(first[:2])[:300]}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(allowed_missing)]
    if missing:
        raise FmcacheError(f"the official model did not get {len(missing)} tensors from the file (e.g. {missing[0]})")


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# DINOv2 (facebookresearch/dinov2; the seed's torch.hub models: 518 px, init_values 1, the giant's fused SwiGLU)
_DINOV2 = {
    "dinov2_vits14": (384, 12, 6),
    "dinov2_vitb14": (768, 12, 12),
    "dinov2_vitl14": (1024, 24, 16),
    "dinov2_vitg14": (1536, 40, 24),
}


def _dinov2_build(spec: ModelSpec, img_size: int, arch: dict) -> nn.Module:
    import inspect

    from dinov2.models.vision_transformer import DinoVisionTransformer  # deferred: dinov2

    dim, depth, heads = _DINOV2[spec.name]
    kwargs = {"embed_dim": dim, "depth": depth, "num_heads": heads, **arch}
    kwargs.update(
        img_size=518,
        patch_size=14,
        mlp_ratio=4,
        init_values=1.0,
        block_chunks=0,
        ffn_layer="swiglufused" if spec.name == "dinov2_vitg14" else "mlp",
    )
    params = inspect.signature(DinoVisionTransformer).parameters
    if "interpolate_offset" in params:  # newer releases name the hub's settings; older ones hard-code the same
        kwargs.update(interpolate_offset=0.1, interpolate_antialias=False, num_register_tokens=0)
    return DinoVisionTransformer(**kwargs)


def _dinov2_run(model: nn.Module, x: torch.Tensor, spec: ModelSpec) -> dict:
    layers = model.get_intermediate_layers(x, n=len(model.blocks), return_class_token=True, norm=False)
    feats = model.forward_features(x)
    tokens = [torch.cat([cls[:, None], patches], dim=1) for patches, cls in layers]
    return _named(tokens, feats["x_norm_clstoken"], feats["x_prenorm"][:, 1:], spec)


# SAM (segment-anything's ImageEncoderViT; the WACV seed builds it at the input size and resizes the tables at load)
_SAM = {
    "sam_vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "sam_vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "sam_vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def _sam_arch(spec: ModelSpec, arch: dict) -> dict:
    dim, depth, heads, global_blocks = _SAM[spec.name]
    base = {"embed_dim": dim, "depth": depth, "num_heads": heads, "global_attn_indexes": global_blocks}
    return {"window_size": 14, **base, **arch}


def _sam_build(spec: ModelSpec, img_size: int, arch: dict) -> nn.Module:
    from segment_anything.modeling.image_encoder import ImageEncoderViT  # deferred: segment_anything

    return ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        mlp_ratio=4,
        qkv_bias=True,
        use_rel_pos=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        out_chans=256,
        **_sam_arch(spec, arch),
    )


def _sam_load(model: nn.Module, path: Path, img_size: int) -> None:
    """The WACV seed's ``filter_interpolate_weights``, written out: the encoder without its neck; below 1024 px the
    global blocks' relative-position tables resized with F.interpolate's default (nearest) to 2·(size/16) − 1 and
    the absolute table bicubic with antialias to size/16."""
    state = _strip(read_state_dict(path), "image_encoder.")
    state = {k: v for k, v in state.items() if not k.startswith("neck.")}
    grid = img_size // 16
    if img_size != 1024:
        global_blocks = [i for i, block in enumerate(model.blocks) if block.window_size == 0]
        for i in global_blocks:
            for axis in ("h", "w"):
                key = f"blocks.{i}.attn.rel_pos_{axis}"
                table = state[key].reshape(1, *state[key].shape).permute(0, 2, 1)
                state[key] = F.interpolate(table, size=2 * grid - 1).permute(0, 2, 1)[0]
        table = state["pos_embed"].permute(0, 3, 1, 2)
        state["pos_embed"] = F.interpolate(table, size=grid, mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    _load_strict(model, state, allowed_missing=("neck.",))


def _sam_run(model: nn.Module, x: torch.Tensor, spec: ModelSpec) -> dict:
    h = model.patch_embed(x) + model.pos_embed  # the seed's forward (and the official one at the built size)
    tokens = []
    for block in model.blocks:
        h = block(h)
        tokens.append(h.reshape(h.shape[0], -1, h.shape[-1]))
    return _named(tokens, tokens[-1].mean(dim=1), tokens[-1], spec)


# SAM2 (sam2's Hiera + FpnNeck in an ImageEncoder with scalp 1, as configs/sam2.1/sam2.1_hiera_{b+,l}.yaml)
_SAM2 = {
    "sam2_b": {"embed_dim": 112, "num_heads": 2},
    "sam2_l": {
        "embed_dim": 144,
        "num_heads": 2,
        "stages": (2, 6, 36, 4),
        "global_att_blocks": (23, 33, 43),
        "window_pos_embed_bkg_spatial_size": (7, 7),
        "window_spec": (8, 4, 16, 8),
    },
}


def _sam2_build(spec: ModelSpec, img_size: int, arch: dict) -> nn.Module:
    from sam2.modeling.backbones.hieradet import Hiera  # deferred: sam2
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder  # deferred: sam2
    from sam2.modeling.position_encoding import PositionEmbeddingSine  # deferred: sam2

    trunk = Hiera(**{**_SAM2[spec.name], **arch})
    neck = FpnNeck(
        PositionEmbeddingSine(num_pos_feats=256, normalize=True, scale=None, temperature=10000),
        d_model=256,
        backbone_channel_list=trunk.channel_list,
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    return ImageEncoder(trunk=trunk, neck=neck, scalp=1)


def _sam2_overrides(arch: dict) -> dict:
    renamed = {"window_pos_embed_bkg_spatial_size": "global_pos_size"}  # timm's name for the same table size
    return {renamed.get(k, k): v for k, v in arch.items()}


def _sam2_run(model: nn.Module, x: torch.Tensor, spec: ModelSpec) -> dict:
    stages = model.trunk(x)
    neck = model(x)["vision_features"]
    tokens = [s.flatten(2).transpose(1, 2) for s in stages]
    return _named(tokens, neck.mean(dim=(2, 3)), neck.flatten(2).transpose(1, 2), spec)


# OpenCLIP and CoCa (open_clip: its own loader; CLIP's pooled is encode_image, CoCa's DeiT input the pooler's outputs)
def _open_clip_build(spec: ModelSpec, img_size: int, arch: dict) -> nn.Module:
    import open_clip  # deferred: open_clip

    if "vision_cfg" in arch:  # a replaced vision config would drop force_image_size (as fmcache's builder knows)
        arch = {**arch, "vision_cfg": {**arch["vision_cfg"], "image_size": img_size}}
    return open_clip.create_model(spec.arch, pretrained=None, force_image_size=img_size, **arch)


def _open_clip_load(model: nn.Module, path: Path, img_size: int) -> None:
    import open_clip  # deferred: open_clip

    open_clip.load_checkpoint(model, str(path), strict=True)  # resizes the position table to the built size


def _open_clip_run(model: nn.Module, x: torch.Tensor, spec: ModelSpec) -> dict:
    visual = model.visual
    h = visual._embeds(x)
    batch_first = getattr(visual.transformer, "batch_first", True)
    tokens = []
    for block in visual.transformer.resblocks:
        h = block(h, attn_mask=None) if batch_first else block(h.transpose(0, 1), attn_mask=None).transpose(0, 1)
        tokens.append(h)
    if spec.head_tokens == "pooler":  # CoCa: the follow-up feeds (contrastive token, the pooler's other outputs)
        pooled, pool_tokens = visual(x)
        return _named(tokens, pooled, torch.cat([pooled[:, None], pool_tokens], dim=1), spec)
    return _named(tokens, model.encode_image(x, normalize=False), tokens[-1][:, 1:], spec)


# DeiT, DINO, MAE: their releases are timm's ViT layout; BLIP's ViT is timm's with LayerNorm eps 1e-6
def _timm_vit_build(spec: ModelSpec, img_size: int, arch: dict) -> nn.Module:
    import timm  # deferred: timm

    if spec.family == "blip":
        return timm.create_model(
            "vit_base_patch16_224",
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            **arch,
        )
    return timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=img_size, **arch)


def _blip_overrides(arch: dict) -> dict:
    names = {"depth": "num_hidden_layers", "embed_dim": "hidden_size", "num_heads": "num_attention_heads"}
    out = {names[k]: v for k, v in arch.items()}
    if "hidden_size" in out:
        out["intermediate_size"] = 4 * out["hidden_size"]
    return out


def _timm_vit_release(model: nn.Module, family: str) -> dict:
    state = dict(model.state_dict())
    if family == "blip":  # model_base.pth: {'model': {'visual_encoder.*', ...}}
        return {"model": {f"visual_encoder.{k}": v for k, v in state.items()}}
    return {"model": state} if family in ("deit", "mae") else state


def _timm_vit_load(model: nn.Module, path: Path, img_size: int) -> None:
    """The release's ViT; at another size its table resized as BLIP's and MAE's ``interpolate_pos_embed`` do
    (bicubic, align_corners False, the CLS row kept)."""
    state = read_state_dict(path)
    if any(k.startswith("visual_encoder.") for k in state):
        state = _strip(state, "visual_encoder.")
    table, target = state.get("pos_embed"), model.pos_embed
    if table is not None and table.shape != target.shape:
        old, new = math.isqrt(table.shape[1] - 1), math.isqrt(target.shape[1] - 1)
        grid = table[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        state["pos_embed"] = torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    _load_strict(model, {k: v for k, v in state.items() if not k.startswith("head.")})


def _timm_vit_run(model: nn.Module, x: torch.Tensor, spec: ModelSpec) -> dict:
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    tokens = []
    for block in model.blocks:
        h = block(h)
        tokens.append(h)
    final = model.norm(h)
    pooled = final[:, 0] if spec.pooled == "cls" else final[:, 1:].mean(dim=1)  # MAE: norm, then the patch mean
    head = final[:, 1:] if spec.head_tokens == "final" else h[:, 1:]
    return _named(tokens, pooled, head, spec)


# AIMv2 (transformers' Aimv2VisionModel; the release's apple names mapped to it)
_AIMV2 = {"aimv2_l14": (1024, 24, 8, 2816), "aimv2_h14": (1536, 24, 12, 4096)}


def _aimv2_build(spec: ModelSpec, img_size: int, arch: dict) -> nn.Module:
    from transformers import Aimv2VisionConfig, Aimv2VisionModel  # deferred: transformers

    dim, depth, heads, hidden = _AIMV2[spec.name]
    sizes = {"embed_dim": dim, "depth": depth, "num_heads": heads, "hidden": hidden, **arch}
    config = Aimv2VisionConfig(
        hidden_size=sizes["embed_dim"],
        num_hidden_layers=sizes["depth"],
        num_attention_heads=sizes["num_heads"],
        intermediate_size=sizes["hidden"],
        image_size=img_size,
        patch_size=14,
        use_head=False,
        rms_norm_eps=1e-5,
    )
    return Aimv2VisionModel(config)


def _aimv2_overrides(arch: dict) -> dict:
    out = {k: v for k, v in arch.items() if k != "hidden"}
    if "hidden" in arch:  # timm's SwiGLU hidden width = embed_dim · mlp_ratio
        out["mlp_ratio"] = arch["hidden"] / arch.get("embed_dim", 1024)
    return out


# apple's aimv2 release names → transformers' (the qkv matrix is split into q, k, v)
_AIMV2_NAMES = (
    ("preprocessor.patchifier.proj.", "embeddings.patch_embed."),
    ("preprocessor.patchifier.norm.", "embeddings.rms_norm."),
    ("trunk.post_trunk_norm.", "rms_norm."),
    ("trunk.blocks.", "encoder.layers."),
    (".attn.proj.", ".attention.out_proj."),
    (".norm_1.", ".rms_norm1."),
    (".norm_2.", ".rms_norm2."),
    (".mlp.fc1.", ".ffn.gate_proj."),
    (".mlp.fc2.", ".ffn.down_proj."),
    (".mlp.fc3.", ".ffn.up_proj."),
)


def _aimv2_release(model: nn.Module) -> dict:
    out = {}
    for key, value in model.state_dict().items():
        new = key
        for apple, hf in _AIMV2_NAMES:
            new = new.replace(hf, apple)
        out[new] = value
    out["preprocessor.pos_embed"] = out.pop("embeddings.position_embedding.weight")[None]
    for prefix in {k.rsplit(".attention.", 1)[0] for k in out if ".attention.q_proj." in k}:
        qkv = [out.pop(f"{prefix}.attention.{p}_proj.weight") for p in "qkv"]
        out[f"{prefix}.attn.qkv.weight"] = torch.cat(qkv, dim=0)
    return out


def _aimv2_load(model: nn.Module, path: Path, img_size: int) -> None:
    state = {}
    for key, value in read_state_dict(path).items():
        new = key
        for apple, hf in _AIMV2_NAMES:
            new = new.replace(apple, hf)
        if new.endswith(".attn.qkv.weight"):
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                state[new.replace(".attn.qkv.", f".attention.{name}_proj.")] = part
        elif new == "preprocessor.pos_embed":
            state["embeddings.position_embedding.weight"] = value[0]
        else:
            state[new] = value
    _load_strict(model, state)


def _aimv2_run(model: nn.Module, x: torch.Tensor, spec: ModelSpec) -> dict:
    out = model(pixel_values=x, output_hidden_states=True)
    final = out.last_hidden_state  # after the trunk's final RMSNorm
    return _named(list(out.hidden_states[1:]), final.mean(dim=1), final, spec)


# ResNet (torchvision, whose files the registry's tv_in1k weights are)
def _resnet_build(spec: ModelSpec, img_size: int, arch: dict) -> nn.Module:
    import torchvision  # deferred: torchvision

    return getattr(torchvision.models, spec.arch)(**arch)


def _resnet_run(model: nn.Module, x: torch.Tensor, spec: ModelSpec) -> dict:
    h = model.relu(model.bn1(model.conv1(x)))
    maps = [h]
    h = model.maxpool(h)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        h = layer(h)
        maps.append(h)
    tokens = [m.flatten(2).transpose(1, 2) for m in maps]
    return _named(tokens, model.avgpool(h).flatten(1), tokens[-1], spec)


def _state_only(model: nn.Module) -> dict:
    return dict(model.state_dict())


def _load_flat(model: nn.Module, path: Path, img_size: int) -> None:
    _load_strict(model, read_state_dict(path))


def _sam2_load(model: nn.Module, path: Path, img_size: int) -> None:
    _load_strict(model, _strip(read_state_dict(path), "image_encoder."))


def _sam_release(model: nn.Module) -> dict:
    return {f"image_encoder.{k}": v for k, v in model.state_dict().items()}  # sam_vit_*.pth: flat, whole SAM


def _sam2_release(model: nn.Module) -> dict:
    return {"model": {f"image_encoder.{k}": v for k, v in model.state_dict().items()}}  # sam2.1_hiera_*.pt


def _timm_reference(what: str, family: str, **kw) -> Reference:
    release = partial(_timm_vit_release, family=family)
    return Reference("timm", "timm", what, _timm_vit_build, release, _timm_vit_load, _timm_vit_run, **kw)


REFERENCES: dict[str, Reference] = {
    "dinov2": Reference(
        "dinov2",
        "dinov2.models.vision_transformer",
        "DINOv2's DinoVisionTransformer (torch.hub)",
        _dinov2_build,
        _state_only,
        _load_flat,
        _dinov2_run,
        release_size=518,
    ),
    "sam": Reference(
        "segment-anything",
        "segment_anything",
        "SAM's ImageEncoderViT, tables resized as the seed",
        _sam_build,
        _sam_release,
        _sam_load,
        _sam_run,
        release_size=1024,
    ),
    "sam2": Reference(
        "sam2",
        "sam2.modeling.backbones.hieradet",
        "SAM2's ImageEncoder (Hiera + FpnNeck, scalp 1)",
        _sam2_build,
        _sam2_release,
        _sam2_load,
        _sam2_run,
        _sam2_overrides,
    ),
    "openclip": Reference(
        "open-clip-torch",
        "open_clip",
        "open_clip's CLIP (load_checkpoint, encode_image)",
        _open_clip_build,
        _state_only,
        _open_clip_load,
        _open_clip_run,
        release_size=224,
    ),
    "coca": Reference(
        "open-clip-torch",
        "open_clip",
        "open_clip's CoCa (load_checkpoint, its attention pooler)",
        _open_clip_build,
        _state_only,
        _open_clip_load,
        _open_clip_run,
        release_size=224,
    ),
    "deit": _timm_reference("DeiT's release (timm's VisionTransformer)", "deit"),
    "dino": _timm_reference("DINO's release (the timm ViT layout and arithmetic)", "dino"),
    "mae": _timm_reference("MAE's release (timm's VisionTransformer)", "mae"),
    "blip": _timm_reference(
        "BLIP's ViT (timm's VisionTransformer, LayerNorm eps 1e-6)", "blip", overrides=_blip_overrides
    ),
    "aimv2": Reference(
        "transformers",
        "transformers",
        "transformers' Aimv2VisionModel",
        _aimv2_build,
        _aimv2_release,
        _aimv2_load,
        _aimv2_run,
        _aimv2_overrides,
    ),
    "resnet": Reference(
        "torchvision", "torchvision", "torchvision's ResNet", _resnet_build, _state_only, _load_flat, _resnet_run
    ),
}
NO_PACKAGE = {
    "focalnet": "SEEM's FocalNet ships only inside the SEEM repository (no pip package installs it); "
    "tests/test_seem_focal.py checks fmcache's module against that release's arithmetic",
}


def reference_for(spec: ModelSpec) -> Reference:
    """The family's official side, its package importable, or one line saying what to install or why none exists."""
    if spec.family in NO_PACKAGE:
        raise FmcacheError(f"no official package for {spec.name}: {NO_PACKAGE[spec.family]}")
    ref = REFERENCES.get(spec.family)
    if ref is None:
        known = ", ".join(sorted(REFERENCES))
        raise FmcacheError(
            f"no official implementation is wired for {spec.name} (family {spec.family}); "
            f"conformance covers the families {known}"
        )
    try:
        importlib.import_module(ref.module)
    except ImportError as exc:
        raise FmcacheError(
            f"conformance for {spec.name} needs the official implementation: pip install {ref.package} ({exc})"
        ) from exc
    return ref


# -- both sides, the same weights ------------------------------------------------------------------------------------


@dataclass
class Pair:
    """fmcache's foundation and the official model, loaded from one file, and the images both see. Tests may change
    ``ours`` (plant a deviation) before :func:`compare_pair`."""

    spec: ModelSpec
    reference: Reference
    ours: Foundation
    theirs: nn.Module
    images: torch.Tensor
    weights: str  # the file's path, or "random" (saved in the release layout for the run)


def build_pair(
    model_name: str,
    weights: Path | None = None,
    img_size: int | None = None,
    *,
    random_init: bool = False,
    arch: dict | None = None,
    batch: int = 2,
    seed: int = 0,
) -> Pair:
    """Both sides from ``weights`` (a release file) or, with ``random_init``, from random weights saved in the
    release's layout; ``arch`` shrinks the architecture (official keyword names, e.g. ``depth``, ``embed_dim``)."""
    spec = get_spec(model_name)
    if (weights is None) == (not random_init):
        raise FmcacheError("conformance needs exactly one of --weights FILE (a release file) or --random-init")
    ref = reference_for(spec)
    size = int(img_size or spec.default_img_size)
    arch = dict(arch or {})
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="fmcache-conformance-") as tmp:
        torch.manual_seed(seed)
        if random_init:
            released = randomise(ref.build(spec, ref.release_size or size, arch), seed)
            weights = Path(tmp) / "release.pth"
            torch.save(ref.release(released), weights)
        theirs = ref.build(spec, size, arch)
        ref.load(theirs, Path(weights), size)
        ours = create_foundation(model_name, weights=weights, img_size=size, arch_overrides=ref.overrides(arch))
    theirs.eval().requires_grad_(False)
    return Pair(spec, ref, ours, theirs, synthetic_images(batch, size, seed), "random" if random_init else str(weights))


def compare_pair(pair: Pair, tolerance: float = TOLERANCE) -> dict:
    """Forward both sides and give the verdicts: ``{"model", "family", "reference", "img_size", "weights",
    "tolerance", "layers": [{"name", "max_abs_diff", "tolerance", "passed", "note"}], "passed", "message"}``."""
    with torch.no_grad():
        ours = foundation_outputs(pair.ours, pair.images, pair.spec)
        theirs = pair.reference.run(pair.theirs, pair.images, pair.spec)
    verdicts = compare_outputs(ours, theirs, tolerance)
    return {
        "model": pair.spec.name,
        "family": pair.spec.family,
        "reference": f"{pair.reference.what} (pip: {pair.reference.package})",
        "img_size": int(pair.images.shape[-1]),
        "weights": pair.weights,
        "tolerance": tolerance,
        "layers": [v.as_dict() for v in verdicts],
        "passed": all(v.passed for v in verdicts),
        "message": failure_message(verdicts),
    }


def check_conformance(
    model_name: str,
    weights: Path | None = None,
    img_size: int | None = None,
    *,
    random_init: bool = False,
    arch: dict | None = None,
    batch: int = 2,
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> dict:
    """Compare fmcache's ``model_name`` with its official implementation for the same weights, every cached layer,
    the paper's pooled feature and the DeiT head's tokens (fp32, on the CPU). See :func:`compare_pair` for the
    result; ``message`` lists each failing output as ``layer 7 (tokens): max |diff| 3.2e-02 > 1e-05``."""
    pair = build_pair(model_name, weights, img_size, random_init=random_init, arch=arch, batch=batch, seed=seed)
    return compare_pair(pair, tolerance)
