"""Random state dicts in the exact key layout of each paper checkpoint's original release file.

Each builder writes the names, nesting, prefixes and shapes of the file users download (facts from the releases:
SAM's ``sam_vit_b_01ec64.pth``, BLIP's ``model_base.pth``, DINOv2's ``dinov2_vitb14_pretrain.pth``, MAE's
``mae_pretrain_vit_base.pth``, DeiT's ``deit_base_patch16_224-b5f2ef4d.pth``, DINO's ``dino_vitbase16_pretrain.pth``,
AIMv2's ``apple/aimv2-large-patch14-224`` safetensors, SAM2.1's ``sam2.1_hiera_base_plus.pt``, torchvision's
ResNet files, open_clip's ``open_clip_pytorch_model.bin``). ``depth`` shortens the block stack so tests stay fast;
every other shape is the release's. Values are random, so a model tensor equal to a file tensor was loaded from it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Shapes = dict[str, tuple[int, ...]]


def fill(shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(12345, dtype=torch.int64)
        elif key.endswith("running_var"):  # a variance must stay positive for the forward to be finite
            out[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            out[key] = torch.randn(shape, generator=gen) * 0.02
    return out


def _vit_blocks(
    prefix: str, depth: int, dim: int, hidden: int, *, layer_scale: bool = False, swiglu: bool = False
) -> Shapes:
    shapes: Shapes = {}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        shapes.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
        })  # fmt: skip
        if swiglu:  # DINOv2-g's fused SwiGLU: w12 holds both gates
            shapes.update({
                b + "mlp.w12.weight": (2 * hidden, dim), b + "mlp.w12.bias": (2 * hidden,),
                b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,),
            })  # fmt: skip
        else:
            shapes.update({
                b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,),
            })  # fmt: skip
        if layer_scale:
            shapes[b + "ls1.gamma"] = (dim,)
            shapes[b + "ls2.gamma"] = (dim,)
    return shapes


def timm_style_vit(depth: int, *, dim: int = 768, patch: int = 16, grid: int = 14, prefix: str = "") -> Shapes:
    """The ViT layout DeiT, DINO, MAE and BLIP release (timm's original naming)."""
    return {
        f"{prefix}cls_token": (1, 1, dim),
        f"{prefix}pos_embed": (1, 1 + grid * grid, dim),
        f"{prefix}patch_embed.proj.weight": (dim, 3, patch, patch),
        f"{prefix}patch_embed.proj.bias": (dim,),
        **_vit_blocks(prefix, depth, dim, 4 * dim),
        f"{prefix}norm.weight": (dim,),
        f"{prefix}norm.bias": (dim,),
    }


def dinov2_release(depth: int, dim: int = 768) -> dict:
    """``dinov2_vit?14_pretrain.pth``: a flat dict, made at 518 px (37 × 37 grid), with mask token and layer scale;
    the giant (width 1536) has a fused SwiGLU MLP of hidden width 4096."""
    giant = dim == 1536
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + 37 * 37, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        **_vit_blocks("", depth, dim, 4096 if giant else 4 * dim, layer_scale=True, swiglu=giant),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    return fill(shapes)


def deit_release(depth: int) -> dict:
    """``deit_base_patch16_224-b5f2ef4d.pth``: ``{'model': {...}}`` with the ImageNet classifier."""
    shapes = {**timm_style_vit(depth), "head.weight": (1000, 768), "head.bias": (1000,)}
    return {"model": fill(shapes)}


def dino_release(depth: int) -> dict:
    """``dino_vitbase16_pretrain.pth``: a flat backbone dict."""
    return fill(timm_style_vit(depth))


def mae_release(depth: int) -> dict:
    """``mae_pretrain_vit_base.pth``: ``{'model': {...}}``, the encoder only."""
    return {"model": fill(timm_style_vit(depth))}


def blip_release(depth: int) -> dict:
    """BLIP's ``model_base.pth``: ``{'model': {...}}``; the ViT-B/16 at 224 under ``visual_encoder.``, beside its
    momentum copy ``visual_encoder_m.``, the text encoder and the contrastive heads (a few of each here)."""
    shapes = {
        **timm_style_vit(depth, prefix="visual_encoder."),
        "visual_encoder_m.cls_token": (1, 1, 768),
        "visual_encoder_m.pos_embed": (1, 197, 768),
        "visual_encoder_m.blocks.0.norm1.weight": (768,),
        "text_encoder.embeddings.LayerNorm.weight": (768,),
        "text_encoder.encoder.layer.0.attention.self.query.weight": (768, 768),
        "vision_proj.weight": (256, 768),
        "text_proj.weight": (256, 768),
        "itm_head.weight": (2, 768),
        "temp": (),
    }
    return {"model": fill(shapes)}


SAM_GLOBAL = {"b": (2, 5, 8, 11), "l": (5, 11, 17, 23), "h": (7, 15, 23, 31)}


def sam_release(depth: int, global_blocks: Iterable[int], dim: int = 768, heads: int = 12) -> dict:
    """``sam_vit_b_01ec64.pth``: a flat dict of the whole SAM; the encoder under ``image_encoder.`` (MLP ``lin1``/
    ``lin2``, 64 × 64 position table, relative-position tables for 14-token windows or the 64-token global grid),
    with the prompt encoder and mask decoder beside it."""
    head_dim = dim // heads
    p = "image_encoder."
    shapes: Shapes = {
        p + "pos_embed": (1, 64, 64, dim),
        p + "patch_embed.proj.weight": (dim, 3, 16, 16),
        p + "patch_embed.proj.bias": (dim,),
    }
    global_blocks = set(global_blocks)
    for i in range(depth):
        b = f"{p}blocks.{i}."
        size = 64 if i in global_blocks else 14
        shapes.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.rel_pos_h": (2 * size - 1, head_dim), b + "attn.rel_pos_w": (2 * size - 1, head_dim),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.lin1.weight": (4 * dim, dim), b + "mlp.lin1.bias": (4 * dim,),
            b + "mlp.lin2.weight": (dim, 4 * dim), b + "mlp.lin2.bias": (dim,),
        })  # fmt: skip
    shapes.update({
        p + "neck.0.weight": (256, dim, 1, 1), p + "neck.1.weight": (256,), p + "neck.1.bias": (256,),
        p + "neck.2.weight": (256, 256, 3, 3), p + "neck.3.weight": (256,), p + "neck.3.bias": (256,),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
        "prompt_encoder.point_embeddings.0.weight": (1, 256),
        "prompt_encoder.no_mask_embed.weight": (1, 256),
        "mask_decoder.iou_token.weight": (1, 256),
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight": (256, 256),
    })  # fmt: skip
    return fill(shapes)


def aimv2_release(depth: int, dim: int = 1024, hidden: int = 2816) -> dict:
    """``apple/aimv2-large-patch14-224`` (safetensors): ``preprocessor.*`` (RMS-normed patchifier, 16 × 16 table) and
    ``trunk.*`` (bias-free attention, SwiGLU ``fc1``/``fc2``/``fc3``, ``norm_1``/``norm_2``, ``post_trunk_norm``)."""
    shapes: Shapes = {
        "preprocessor.patchifier.proj.weight": (dim, 3, 14, 14),
        "preprocessor.patchifier.proj.bias": (dim,),
        "preprocessor.patchifier.norm.weight": (dim,),
        "preprocessor.pos_embed": (1, 256, dim),
        "trunk.post_trunk_norm.weight": (dim,),
    }
    for i in range(depth):
        b = f"trunk.blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.proj.weight": (dim, dim),
            b + "norm_1.weight": (dim,), b + "norm_2.weight": (dim,),
            b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc3.weight": (hidden, dim),
        })  # fmt: skip
    return fill(shapes)


SAM2_STAGES = {"b": ((2, 3, 16, 3), 112, 2), "l": ((2, 6, 36, 4), 144, 2)}  # stages, width, heads


def sam2_release(stages: tuple[int, ...], dim: int = 112, heads: int = 2) -> dict:
    """``sam2.1_hiera_base_plus.pt``: ``{'model': {...}}``; Hiera under ``image_encoder.trunk.`` (MLP
    ``mlp.layers.0/1``, a dim-changing ``proj`` on each stage's first block), the FPN neck's lateral convs under
    ``image_encoder.neck.convs.{i}.conv`` (deepest stage first), then SAM2's decoder and memory modules."""
    p = "image_encoder.trunk."
    shapes: Shapes = {
        p + "pos_embed": (1, dim, 7, 7) if dim == 144 else (1, dim, 14, 14),
        p + "pos_embed_window": (1, dim, 8, 8),
        p + "patch_embed.proj.weight": (dim, 3, 7, 7),
        p + "patch_embed.proj.bias": (dim,),
    }
    block, width, widths = 0, dim, []
    for stage, count in enumerate(stages):
        for j in range(count):
            out = dim * 2**stage
            b = f"{p}blocks.{block}."
            shapes.update({
                b + "norm1.weight": (width,), b + "norm1.bias": (width,),
                b + "attn.qkv.weight": (3 * out, width), b + "attn.qkv.bias": (3 * out,),
                b + "attn.proj.weight": (out, out), b + "attn.proj.bias": (out,),
                b + "norm2.weight": (out,), b + "norm2.bias": (out,),
                b + "mlp.layers.0.weight": (4 * out, out), b + "mlp.layers.0.bias": (4 * out,),
                b + "mlp.layers.1.weight": (out, 4 * out), b + "mlp.layers.1.bias": (out,),
            })  # fmt: skip
            if j == 0 and stage > 0:
                shapes[b + "proj.weight"] = (out, width)
                shapes[b + "proj.bias"] = (out,)
            width = out
            block += 1
        widths.append(width)
    for i, c in enumerate(reversed(widths)):
        shapes[f"image_encoder.neck.convs.{i}.conv.weight"] = (256, c, 1, 1)
        shapes[f"image_encoder.neck.convs.{i}.conv.bias"] = (256,)
    shapes.update({
        "sam_mask_decoder.iou_token.weight": (1, 256),
        "sam_prompt_encoder.no_mask_embed.weight": (1, 256),
        "memory_attention.layers.0.self_attn.q_proj.weight": (256, 256),
        "memory_encoder.pix_feat_proj.weight": (256, 256, 1, 1),
        "maskmem_tpos_enc": (7, 1, 1, 64),
        "no_mem_embed": (1, 1, 256),
    })  # fmt: skip
    return {"model": fill(shapes)}


def torchvision_resnet_release(arch: str, with_batch_counters: bool) -> dict:
    """torchvision's ``resnet50-*.pth``: the flat state dict of torchvision's own module (its names are the release's);
    files older than BatchNorm's ``num_batches_tracked`` lack those counters."""
    import torchvision

    shapes = {k: tuple(v.shape) for k, v in getattr(torchvision.models, arch)().state_dict().items()}
    if not with_batch_counters:
        shapes = {k: s for k, s in shapes.items() if not k.endswith("num_batches_tracked")}
    return fill(shapes)


def open_clip_release(arch: str, overrides: dict) -> dict:
    """``open_clip_pytorch_model.bin``: the flat state dict of the whole open_clip model (text tower included)."""
    import open_clip

    model = open_clip.create_model(arch, pretrained=None, **overrides)
    return fill({k: tuple(v.shape) for k, v in model.state_dict().items()})
