"""Foundation registry: a name resolves to a backend call, its pooled feature and its preprocessing.

Names follow PROTOCOLS.md. Escape hatches ``timm:<name>``, ``open_clip:<arch>[:<tag>]`` and ``hf:<repo>`` admit
any other model. Routing is by exact name or by the escape-hatch prefix, never by substring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmcache.errors import FmcacheError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BACKENDS = ("timm", "open_clip", "hf", "seem", "sam2")
POOLED_KINDS = ("cls", "mean", "pooled", "auto")
# What the paper's stacked DeiT head reads (``--tokens paper``): the last layer's patch tokens before the final norm
# (the WACV seed: DINOv2, SAM, OpenCLIP; SEEM's last stage), after it (the WACV seed's BLIP; the follow-up's MAE and
# AIMv2), CoCa's attention-pooler outputs or SAM2's FPN neck (the follow-up).
HEAD_TOKENS = ("prenorm", "final", "pooler", "neck")
# How a release's position tables meet another input size (ModelSpec.positions; fmcache.models.positions says how).
POSITION_RULES = ("timm", "dinov2_hub", "sam_seed")


@dataclass(frozen=True)
class ModelSpec:
    """What a registry name means.

    ``pooled`` is the paper's pooled feature: ``cls`` (prefix token 0 after the final norm), ``mean`` (mean of
    the last layer's patch tokens) or ``pooled`` (the backend's own pooled output, e.g. CLIP's projection or
    CoCa's attention pooler). Escape hatches use ``auto``: CLS when the model has one, else the mean.
    """

    name: str
    backend: str
    arch: str
    tag: str | None
    pooled: str
    family: str
    layers: int
    default_img_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hub: bool = True  # weights can be fetched from a hub; False means --weights FILE is required
    create_kwargs: dict = field(default_factory=dict)
    notes: str = ""
    # The size the released checkpoint's position tables are made for (None: the tables follow timm's rule).
    native_img_size: int | None = None
    # How those tables meet another input size, as the paper's seed does it (POSITION_RULES; fmcache.models.positions):
    # "timm" (built at the input size, resampled once at load by timm), "dinov2_hub" (built at native_img_size, the
    # table resampled on every forward as DINOv2's torch.hub model), "sam_seed" (built at the input size, the release's
    # tables resized once at load as the WACV seed).
    positions: str = "timm"
    # Names a change in how fmcache builds this model that changed its features. It enters the cache key when set, so
    # caches extracted before the change are never reused silently; bump it whenever a build change moves numbers.
    build: str = ""
    # The release's LayerNorm eps where timm builds another (timm's samvit falls back to nn.LayerNorm's 1e-5; SAM's
    # encoder uses 1e-6); set on every LayerNorm after the build. None: timm's is the release's.
    layer_norm_eps: float | None = None
    # Set when the hub weights are not the checkpoint the paper used: what the paper used and how to get it.
    paper_weights: str = ""
    head_tokens: str = "prenorm"  # one of HEAD_TOKENS

    @property
    def hub_id(self) -> str:
        """The pretrained identity recorded in caches: backend, architecture and tag."""
        return f"{self.backend}:{self.arch}" + (f":{self.tag}" if self.tag else "")


_REGISTRY: dict[str, ModelSpec] = {}

# Names the papers list but which have no maintained implementation; asking for them explains why.
UNAVAILABLE = {
    "vmamba": (
        "vmamba is not available: the follow-up paper lists it but its code ships no implementation, and no "
        "maintained VMamba exists in timm, open_clip or transformers; pick another name from `fmcache models`"
    ),
}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"duplicate registry name {spec.name}")
    if spec.backend not in BACKENDS or spec.pooled not in POOLED_KINDS or spec.head_tokens not in HEAD_TOKENS:
        raise ValueError(f"bad spec {spec}")
    if spec.positions not in POSITION_RULES or (spec.positions != "timm") != (spec.native_img_size is not None):
        raise ValueError(f"bad position rule in {spec}")
    _REGISTRY[spec.name] = spec
    return spec


def _timm(name: str, arch: str, tag: str, pooled: str, family: str, layers: int, **kw) -> None:
    register(
        ModelSpec(name=name, backend="timm", arch=arch, tag=tag, pooled=pooled, family=family, layers=layers, **kw)
    )


for _size, _arch, _layers in (("s", "small", 12), ("b", "base", 12), ("l", "large", 24), ("g", "giant", 40)):
    _timm(
        f"dinov2_vit{_size}14",
        f"vit_{_arch}_patch14_dinov2",
        "lvd142m",
        "cls",
        "dinov2",
        _layers,
        native_img_size=518,
        positions="dinov2_hub",
        build="dinov2-hub-positions-1",
        notes="built at 518 as the seed's torch.hub model; the 37 x 37 table is resampled on every forward the hub "
        "way (bicubic, no antialias, scale (n + 0.1) / 37)",
    )
for _size, _arch, _layers in (("b", "base", 12), ("l", "large", 24), ("h", "huge", 32)):
    _timm(
        f"sam_vit_{_size}",
        f"samvit_{_arch}_patch16",
        "sa1b",
        "mean",
        "sam",
        _layers,
        native_img_size=1024,
        positions="sam_seed",
        build="sam-seed-tables-1",
        layer_norm_eps=1e-6,
        notes="image encoder (blocks; neck not used); built at the input size, the release's tables resized once "
        "at load as the WACV seed (global relative-position tables nearest, absolute table bicubic)",
    )
for _name, _arch, _file in (
    ("sam2_b", "sam2_hiera_base_plus", "facebook/sam2.1-hiera-base-plus/sam2.1_hiera_base_plus.pt"),
    ("sam2_l", "sam2_hiera_large", "facebook/sam2.1-hiera-large/sam2.1_hiera_large.pt"),
):
    register(
        ModelSpec(
            _name,
            "sam2",
            _arch,
            _file,
            "pooled",
            "sam2",
            4,
            head_tokens="neck",
            notes="layers: the 4 Hiera trunk stages; --freeze K counts Hiera blocks (b+ 24, l 48); paper "
            "pooled: mean of the FPN neck's 256-d vision_features (stride 16)",
        )
    )
register(
    ModelSpec(
        "focal",
        "seem",
        "xdecoder/SEEM",
        "seem_focalt_v0.pt",
        "mean",
        "focalnet",
        4,
        hub=True,
        notes="SEEM's FocalNet-T backbone (fmcache's own implementation), from xdecoder/SEEM "
        "seem_focalt_v0.pt (backbone.* keys, loaded strictly); stages res2..res5 after their norms",
    )
)
for _size, _arch, _layers in (
    ("b16", "base_patch16", 12),
    ("l16", "large_patch16", 24),
    ("h14", "huge_patch14", 32),
):
    _timm(f"mae_vit{_size}", f"vit_{_arch}_224", "mae", "mean", "mae", _layers, head_tokens="final")
_timm(
    "aimv2_l14",
    "aimv2_large_patch14_224",
    "apple_pt",
    "mean",
    "aimv2",
    24,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    head_tokens="final",
)
_timm(
    "aimv2_h14",
    "aimv2_huge_patch14_224",
    "apple_pt",
    "mean",
    "aimv2",
    24,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    head_tokens="final",
)
_timm("deit_base", "deit_base_patch16_224", "fb_in1k", "cls", "deit", 12)
_timm("dino_vitb16", "vit_base_patch16_224", "dino", "cls", "dino", 12)
_timm(
    "resnet50",
    "resnet50",
    "tv_in1k",
    "mean",
    "resnet",
    5,
    notes="stem + 4 stages; mean = global average pool",
)
_timm(
    "resnet152",
    "resnet152",
    "tv_in1k",
    "mean",
    "resnet",
    5,
    notes="stem + 4 stages; mean = global average pool",
)

register(
    ModelSpec(
        "clip_vitb16",
        "open_clip",
        "ViT-B-16",
        "laion2b_s34b_b88k",
        "pooled",
        "openclip",
        12,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    )
)
register(
    ModelSpec(
        "coca_vitb32",
        "open_clip",
        "coca_ViT-B-32",
        "laion2b_s13b_b90k",
        "pooled",
        "coca",
        12,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        notes="attention-pooled output",
        head_tokens="pooler",
    )
)
register(
    ModelSpec(
        "coca_vitl14",
        "open_clip",
        "coca_ViT-L-14",
        "laion2b_s13b_b90k",
        "pooled",
        "coca",
        24,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        notes="attention-pooled output",
        head_tokens="pooler",
    )
)
register(
    ModelSpec(
        "blip_base",
        "hf",
        "Salesforce/blip-image-captioning-base",
        None,
        "cls",
        "blip",
        12,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        notes="vision encoder; CLS is token 0; 224 (paper) or 384",
        head_tokens="final",
        paper_weights="the paper used BLIP's pretrained model_base.pth (ViT-B/16 at 224), which no hub id "
        "holds; the hub default is the captioning-fine-tuned Salesforce/blip-image-captioning-base: "
        "pass --weights model_base.pth to match the paper",
    )
)


def list_models() -> list[ModelSpec]:
    """Every registered name, in registration order."""
    return list(_REGISTRY.values())


def _escape_hatch(name: str) -> ModelSpec:
    backend, _, rest = name.partition(":")
    if not rest:
        raise FmcacheError(f"model '{name}' names no model after '{backend}:'; e.g. timm:vit_small_patch16_224")
    if backend == "timm":
        arch, _, tag = rest.partition(".")
        return ModelSpec(name, "timm", arch, tag or None, "auto", "timm", 0)
    if backend == "open_clip":
        arch, _, tag = rest.partition(":")
        return ModelSpec(name, "open_clip", arch, tag or None, "pooled", "open_clip", 0, mean=CLIP_MEAN, std=CLIP_STD)
    if backend == "hf":
        return ModelSpec(name, "hf", rest, None, "auto", "hf", 0)
    raise FmcacheError(f"unknown model backend '{backend}:' in '{name}'; use one of timm:, open_clip:, hf:")


def get_spec(name: str) -> ModelSpec:
    """Resolve a registry name or escape hatch; unknown names raise an error listing what exists."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in UNAVAILABLE:
        raise FmcacheError(UNAVAILABLE[name])
    if ":" in name:
        return _escape_hatch(name)
    known = ", ".join(_REGISTRY)
    raise FmcacheError(
        f"unknown model '{name}'; known names: {known}; or use timm:<name>, open_clip:<arch>[:<tag>], hf:<repo>"
    )
