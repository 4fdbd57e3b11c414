"""Backend adapters: each turns one library's model into per-layer token sequences.

An adapter's ``forward`` returns ``(tokens, normed, pooled)``: ``tokens`` holds every layer's raw output as
(B, T, D) with prefix tokens (CLS, registers) first; ``normed`` the same after the model's final norm where that
norm applies to the layer (so the last layer of a ViT gives exactly ``forward_features``); ``pooled`` the backend's
own pooled output, or None. Weights are placed by :mod:`fmcache.models.foundation`.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch
from torch import nn

from fmcache.errors import FmcacheError
from fmcache.models import sam2
from fmcache.models.blip import BLIP_ORIGINAL_EPS, blip_to_hf, is_blip_original
from fmcache.models.blocks import BlipStages, FocalStages, OpenClipStages, TimmSamStages, TimmVitStages
from fmcache.models.open_clip_pool import coca_head_tokens, open_clip_pool
from fmcache.models.positions import sam_seed_tables, use_dinov2_hub_positions
from fmcache.models.registry import ModelSpec
from fmcache.models.seem_focal import SeemFocalNet
from fmcache.weightfiles import LoadReport, load_weights_file, read_state_dict

# (every layer's tokens, the same after the final norm, the backend's pooled output or None, the tokens the paper's
# DeiT head reads when they are not a layer's own (CoCa's attention-pooler outputs, SAM2's neck) or None)
LayerOut = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]


_NETWORK_ERRORS = (
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
)


def _hub_error(spec: ModelSpec, exc: Exception) -> FmcacheError:
    """Say what failed while getting hub weights; blame the network only when the error is a network error."""
    chain = [exc, *([exc.__cause__] if exc.__cause__ else []), *([exc.__context__] if exc.__context__ else [])]
    network = any(type(e).__name__ in _NETWORK_ERRORS for e in chain)
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if network:
        return FmcacheError(
            f"could not download hub weights for {spec.name} ({spec.hub_id}): no connection to the hub ({what}); "
            "pass --weights FILE, or --random-init to run with random weights on purpose"
        )
    return FmcacheError(
        f"loading hub weights for {spec.name} ({spec.hub_id}) failed: {what}; pass --weights FILE with the "
        "original checkpoint, or report this"
    )


def _flatten(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature map → (B, H·W, C) tokens."""
    return t.flatten(2).transpose(1, 2)


def _norm_tokens(norm: nn.Module | None, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a final norm to (B, T, D) tokens when it normalises D; otherwise return the tokens unchanged."""
    if norm is None or isinstance(norm, nn.Identity):
        return tokens
    shape = getattr(norm, "normalized_shape", None)
    if shape is None or tuple(shape) != (tokens.shape[-1],):
        return tokens
    if type(norm).__name__.endswith("2d"):  # channel norms on NCHW maps: same math on the last dim of NLC
        return nn.functional.layer_norm(tokens, shape, norm.weight, norm.bias, norm.eps)
    return norm(tokens)


class TimmAdapter(nn.Module):
    """timm models through ``forward_intermediates`` (ViTs in NLC with prefix tokens, CNNs/Hiera as stages)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward_intermediates).parameters
        self.vit_like = "return_prefix_tokens" in params
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0) if self.vit_like else 0
        self.final_norm = getattr(model, "norm", None)

    def forward(self, x: torch.Tensor) -> LayerOut:
        if self.vit_like:
            outs = self.model.forward_intermediates(
                x, indices=None, norm=False, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
            )
            tokens = [torch.cat([o[1], o[0]], dim=1) if isinstance(o, tuple) else o for o in outs]
        else:
            outs = self.model.forward_intermediates(
                x, indices=None, norm=False, output_fmt="NCHW", intermediates_only=True
            )
            tokens = [_flatten(o) for o in outs]
        normed = [_norm_tokens(self.final_norm, t) for t in tokens]
        return tokens, normed, None, None

    root_attr = "model"  # the module whose state dict is the model's own key layout (export, --weights)

    def block_layout(self, foundation):
        """timm's plain ViTs and SAM's encoder are blocks; CNNs and hierarchical models are stages (None)."""
        from timm.models.vision_transformer import VisionTransformer  # deferred: timm
        from timm.models.vision_transformer_sam import VisionTransformerSAM  # deferred: timm

        if type(self.model) is VisionTransformerSAM:
            return TimmSamStages(foundation)
        if type(self.model) is VisionTransformer and self.vit_like:
            return TimmVitStages(foundation)
        return None

    @property
    def layer_unit(self) -> str:
        from timm.models.resnet import ResNet  # deferred: timm

        return "stages (stem + 4 stages)" if isinstance(self.model, ResNet) else "stages"


class OpenClipAdapter(nn.Module):
    """open_clip vision towers; the pooled output is CLIP's projection or CoCa's attention pooler."""

    num_prefix_tokens = 1

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    @property
    def final_norm(self) -> nn.Module:
        # a property, not an attribute: registering ln_post twice would duplicate its keys in the state dict
        return self.visual.ln_post

    def forward(self, x: torch.Tensor) -> LayerOut:
        out = self.visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True)
        prefix = out["image_intermediates_prefix"]
        tokens = [torch.cat([p, t], dim=1) for p, t in zip(prefix, out["image_intermediates"], strict=True)]
        normed = [_norm_tokens(self.final_norm, t) for t in tokens]
        # open_clip's own pooling of the last block (CLIP: ln_post(CLS) @ proj; CoCa: attention pooler, ln_post)
        pooled, pool_tokens = open_clip_pool(self.visual, tokens[-1])
        head_tokens = None
        if getattr(self.visual, "attn_pool", None) is not None:  # CoCa
            head_tokens = coca_head_tokens(pooled, pool_tokens)
        return tokens, normed, pooled, head_tokens

    root_attr = "visual"
    layer_unit = "stages"

    def block_layout(self, foundation):
        return OpenClipStages(foundation) if hasattr(self.visual, "transformer") else None


class HfAdapter(nn.Module):
    """transformers vision models through ``output_hidden_states`` (hidden_states[0] is the embedding, skipped)."""

    def __init__(self, model: nn.Module, patch_size: int, native_size: int):
        super().__init__()
        self.model = model
        self.patch_size = patch_size
        self.native_size = native_size
        self.final_norm = getattr(model, "post_layernorm", None) or getattr(model, "layernorm", None)
        self.num_prefix_tokens = -1  # known after the first forward (depends on CLS/register tokens)

    def forward(self, x: torch.Tensor) -> LayerOut:
        kwargs = {"interpolate_pos_encoding": True} if x.shape[-1] != self.native_size else {}
        out = self.model(pixel_values=x, output_hidden_states=True, **kwargs)
        tokens = list(out.hidden_states[1:])
        grid = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        self.num_prefix_tokens = tokens[-1].shape[1] - grid
        normed = [_norm_tokens(self.final_norm, t) for t in tokens]
        return tokens, normed, None, None

    root_attr = "model"
    layer_unit = "stages"

    def block_layout(self, foundation):
        return None


class BlipAdapter(HfAdapter):
    """BLIP's vision tower: a transformers ViT whose ``encoder.layers`` are blocks."""

    def block_layout(self, foundation):
        return BlipStages(foundation)


# -- builders -----------------------------------------------------------------------------------------------------


def _timm_convert(model: nn.Module):
    """timm's own checkpoint filter for the model's family: maps original-repo keys (DINOv2, MAE, FocalNet, …)
    to timm's and resamples position embeddings to the built image size."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _create_timm(name: str, pretrained: bool, img_size: int, kwargs: dict) -> nn.Module:
    import timm  # deferred: timm

    try:
        return timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    # CNNs and Hiera take any input size and have no img_size argument.
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def build_timm(spec: ModelSpec, source: str, img_size: int, weights: Path | None, overrides: dict):
    import timm  # deferred: timm

    name = f"{spec.arch}.{spec.tag}" if spec.tag else spec.arch
    if not timm.is_model(spec.arch):
        raise FmcacheError(f"unknown timm model '{spec.arch}'; see timm.list_models()")
    kwargs = {"num_classes": 0, **spec.create_kwargs, **overrides}
    if spec.positions == "dinov2_hub":  # its patch embedding then takes any input size (a multiple of 14)
        kwargs["dynamic_img_size"] = True
    # DINOv2 is built where its table belongs; SAM's hub weights load where theirs do, then are resized as the seed
    native = spec.positions == "dinov2_hub" or (source == "hub" and spec.positions == "sam_seed")
    build_size = spec.native_img_size if native else img_size
    try:
        model = _create_timm(name, source == "hub", build_size, kwargs)
        if source == "hub" and spec.positions == "sam_seed" and img_size != spec.native_img_size:
            model = _resized_sam(model, spec.arch, img_size, kwargs)
    except Exception as exc:
        if source == "hub":
            raise _hub_error(spec, exc) from exc
        raise FmcacheError(f"cannot build timm model {name}: {exc}") from exc
    if spec.layer_norm_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = spec.layer_norm_eps
    report = None
    if source == "file":
        convert = _timm_convert(model)
        if spec.positions == "sam_seed":
            convert = _then_sam_seed_tables(convert)
        report = load_weights_file(model, weights, convert=convert)
    if spec.positions == "dinov2_hub":
        use_dinov2_hub_positions(model)
    return TimmAdapter(model), report


def _resized_sam(released: nn.Module, arch: str, img_size: int, kwargs: dict) -> nn.Module:
    """The hub's SAM (built at 1024, tables as released) as the WACV seed builds it at ``img_size``: a model of
    that size whose tables are the released ones resized once (:func:`sam_seed_tables`)."""
    model = _create_timm(arch, False, img_size, kwargs)
    model.load_state_dict(sam_seed_tables(released.state_dict(), model))
    return model


def _then_sam_seed_tables(convert):
    """timm's SAM filter (``image_encoder.`` stripped, ``lin`` → ``fc``), then the seed's table resizing."""

    def both(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return sam_seed_tables(convert(state, model) if convert is not None else state, model)

    return both


def build_open_clip(spec: ModelSpec, source: str, img_size: int, weights: Path | None, overrides: dict):
    import open_clip  # deferred: open_clip

    if open_clip.get_model_config(spec.arch) is None:
        raise FmcacheError(f"unknown open_clip architecture '{spec.arch}'; see open_clip.list_models()")
    if source == "hub" and not spec.tag:
        raise FmcacheError(f"{spec.name} names no pretrained tag; use open_clip:{spec.arch}:<tag> or --weights FILE")
    if "vision_cfg" in overrides:  # a replaced vision config would otherwise drop force_image_size
        overrides = {**overrides, "vision_cfg": {**overrides["vision_cfg"], "image_size": img_size}}
    try:
        model = open_clip.create_model(
            spec.arch, pretrained=spec.tag if source == "hub" else None, force_image_size=img_size, **overrides
        )
    except Exception as exc:
        if source == "hub":
            raise _hub_error(spec, exc) from exc
        raise FmcacheError(f"cannot build open_clip model {spec.arch}: {exc}") from exc
    visual = model.visual
    report = load_weights_file(visual, weights, convert=_open_clip_resize) if source == "file" else None
    return OpenClipAdapter(visual), report


def _open_clip_resize(state: dict[str, torch.Tensor], visual: nn.Module) -> dict[str, torch.Tensor]:
    """Resample a checkpoint's position embedding to the built image size (open_clip's own routine)."""
    from open_clip.model import resize_pos_embed  # deferred: open_clip

    prefixed = {f"visual.{k}": v for k, v in state.items()}
    resize_pos_embed(prefixed, nn.ModuleDict({"visual": visual}))
    return {k[len("visual.") :]: v for k, v in prefixed.items()}


def _build_blip(spec: ModelSpec, source: str, img_size: int, weights: Path | None, overrides: dict):
    from transformers import BlipVisionConfig, BlipVisionModel  # deferred: transformers

    if source == "hub":
        try:
            from transformers import BlipForConditionalGeneration  # deferred: transformers

            model = BlipForConditionalGeneration.from_pretrained(spec.arch).vision_model
        except Exception as exc:
            raise _hub_error(spec, exc) from exc
        return BlipAdapter(model, model.config.patch_size, model.config.image_size), None
    # BLIP's config initialises with std 1e-10 (meant to be overwritten by weights), which would make random-init
    # features constant; use a usual ViT std instead. Built at the requested size (224 or 384).
    config = {"initializer_range": 0.02, "image_size": img_size, **overrides}
    model = BlipVisionModel(BlipVisionConfig(**config))
    report = None
    if source == "file":
        raw_layout = {"original": False}

        def convert(state: dict[str, torch.Tensor], m: nn.Module) -> dict[str, torch.Tensor]:
            raw_layout["original"] = raw_layout["original"] or is_blip_original(state)
            return blip_to_hf(state, m)

        report = load_weights_file(model, weights, convert=convert)
        if raw_layout["original"]:  # BLIP's own ViT normalises with eps 1e-6; keep its numbers
            model.config.layer_norm_eps = BLIP_ORIGINAL_EPS
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = BLIP_ORIGINAL_EPS
    return BlipAdapter(model, model.config.patch_size, model.config.image_size), report


def build_hf(spec: ModelSpec, source: str, img_size: int, weights: Path | None, overrides: dict):
    if spec.family == "blip":
        return _build_blip(spec, source, img_size, weights, overrides)
    from transformers import AutoConfig, AutoModel  # deferred: transformers

    try:
        if source == "hub":
            model = AutoModel.from_pretrained(spec.arch)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(spec.arch, **overrides))
    except Exception as exc:
        raise _hub_error(spec, exc) from exc
    model = getattr(model, "vision_model", model)
    cfg = model.config
    report = load_weights_file(model, weights) if source == "file" else None
    return HfAdapter(model, int(cfg.patch_size), int(cfg.image_size)), report


def build_sam2(spec: ModelSpec, source: str, img_size: int, weights: Path | None, overrides: dict):
    """SAM2's image encoder from its release file (hub: the ``<repo>/<file>`` in the tag; or --weights)."""
    # img_size is not needed: Hiera resamples its position table to the input at run time, as SAM2 does.

    try:
        encoder = sam2.build_encoder(spec.arch, overrides)
    except Exception as exc:
        raise FmcacheError(f"cannot build SAM2 encoder {spec.arch}: {exc}") from exc
    report = None
    if source == "hub":
        try:
            path = sam2.hub_file(spec.tag or "")
        except Exception as exc:
            raise _hub_error(spec, exc) from exc
        load_weights_file(encoder, path, convert=sam2.convert_release)
    elif source == "file":
        report = load_weights_file(encoder, weights, convert=sam2.convert_release)
    return sam2.Sam2Adapter(encoder), report


BUILDERS = {"timm": build_timm, "open_clip": build_open_clip, "hf": build_hf, "sam2": build_sam2}


def build_backend(
    spec: ModelSpec, source: str, img_size: int, weights: Path | None, overrides: dict
) -> tuple[nn.Module, LoadReport | None]:
    """Build the adapter for ``spec`` with weights from ``source`` ('hub', 'file' or 'random')."""
    builder = BUILDERS.get(spec.backend)
    if builder is None:
        raise FmcacheError(f"unknown backend '{spec.backend}'; known: {', '.join(BUILDERS)}")
    return builder(spec, source, img_size, weights, overrides)


# -- SEEM's FocalNet-T (our own implementation, fmcache.models.seem_focal) -------------------------------------------

SEEM_PREFIX = "backbone."  # SEEM checkpoints hold the whole SEEM model; its image backbone is under this prefix


class SeemAdapter(nn.Module):
    """SEEM's FocalNet stages as layers: each (B, C, H, W) map flattened to (B, H·W, C) tokens, no prefix tokens.

    ``normed`` is ``tokens``: every stage already went through its own output norm (norm0..norm3), and there is no
    final norm. No pooled output: the paper's feature is the mean of the last stage's tokens.
    """

    num_prefix_tokens = 0

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> LayerOut:
        tokens = [_flatten(t) for t in self.model.forward_stages(x)]
        return tokens, tokens, None, None

    root_attr = "model"
    layer_unit = "FocalNet stages"

    def block_layout(self, foundation):
        return FocalStages(foundation)


def _load_seem_hub(model: nn.Module, spec: ModelSpec) -> None:
    """Download SEEM's checkpoint and load its ``backbone.*`` tensors strictly, as the paper's seed does."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(spec.arch, spec.tag or "")
    except Exception as exc:
        raise _hub_error(spec, exc) from exc
    state = read_state_dict(Path(path))
    backbone = {k[len(SEEM_PREFIX) :]: v for k, v in state.items() if k.startswith(SEEM_PREFIX)}
    if not backbone:
        raise FmcacheError(f"{path} ({spec.hub_id}) holds no '{SEEM_PREFIX}*' tensors; is it a SEEM checkpoint?")
    try:
        model.load_state_dict(backbone, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise FmcacheError(
            f"refused {path} ({spec.hub_id}): its backbone does not match SEEM FocalNet: {first}"
        ) from exc


def build_seem(spec: ModelSpec, source: str, img_size: int, weights: Path | None, overrides: dict):
    # img_size is not needed: the network has no position tables and takes any size (padded to strides 4 and 2).

    try:
        model = SeemFocalNet(**overrides)
    except (TypeError, ValueError) as exc:
        raise FmcacheError(f"cannot build SEEM FocalNet with {overrides}: {exc}") from exc
    report = None
    if source == "hub":
        _load_seem_hub(model, spec)
    elif source == "file":
        report = load_weights_file(model, weights)  # strips backbone. and refuses missing or mis-shaped tensors
    return SeemAdapter(model), report


BUILDERS["seem"] = build_seem
