"""The ``Foundation`` wrapper: one call gives every layer's tokens and the pooled features the paper uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmcache.errors import FmcacheError
from fmcache.models.backends import build_backend
from fmcache.models.registry import ModelSpec, get_spec


@dataclass
class FoundationOutput:
    """Per-layer outputs for a batch.

    ``tokens[l]`` is layer l's raw output (B, T, D_l), prefix tokens first (``num_prefix_tokens`` of them).
    ``pooled_cls[l]`` is prefix token 0 after the final norm (None for models without a CLS token);
    ``pooled_mean[l]`` the mean of the patch tokens after the final norm where it applies to that layer;
    ``pooled`` is the paper's pooled feature (B, D_p), of kind ``pooled_kind`` (cls, mean or pooled).
    ``head_tokens`` (B, T_h, D_h) are the tokens the paper's stacked DeiT head reads (the registry's
    ``head_tokens`` rule: the last layer's patch tokens before or after the final norm, CoCa's attention-pooler
    outputs, SAM2's FPN neck), with no prefix token.
    """

    tokens: list[torch.Tensor]
    num_prefix_tokens: int
    pooled_cls: list[torch.Tensor] | None
    pooled_mean: list[torch.Tensor]
    pooled: torch.Tensor
    pooled_kind: str
    head_tokens: torch.Tensor | None = None


RANDOM_INIT_SEED = 0  # --random-init weights are seeded so every process and every resume builds the same model


class Foundation(nn.Module):
    """A frozen foundation model seen as a stack of layers.

    ``weights_source`` records where the weights came from (hub id, file and its sha256, or random) so that a
    cache can never mix them up.
    """

    def __init__(self, spec: ModelSpec, adapter: nn.Module, img_size: int, weights_source: dict):
        super().__init__()
        self.spec = spec
        self.adapter = adapter
        self.img_size = img_size
        self.weights_source = weights_source

    @property
    def name(self) -> str:
        return self.spec.name

    def block_layout(self):
        """The adapter's :class:`~fmcache.models.blocks.Stages` view (embedding, blocks, post modules), or None
        when the model's layers are stages that cannot be frozen or run one block at a time."""
        return self.adapter.block_layout(self)

    @property
    def root_attr(self) -> str:
        """The adapter attribute holding the backend's own model (``model``, ``visual`` or ``encoder``)."""
        return self.adapter.root_attr

    @property
    def root(self) -> nn.Module:
        """The backend's own model, whose state dict (its own key layout) ``extract --weights`` loads."""
        return getattr(self.adapter, self.adapter.root_attr)

    @property
    def layer_unit(self) -> str:
        """What this model's layers are, in words, for messages that refuse a block number."""
        return self.adapter.layer_unit

    def forward(self, images: torch.Tensor) -> FoundationOutput:
        if images.ndim != 4:
            raise FmcacheError(f"expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
        if images.shape[1] == 1:  # grayscale scans: the foundations were trained on RGB
            images = images.expand(-1, 3, -1, -1)
        tokens, normed, backend_pooled, backend_head_tokens = self.adapter(images)
        prefix = int(self.adapter.num_prefix_tokens)
        # pool in fp32: under bf16 autocast a mean over hundreds of tokens would lose precision
        cls = [t[:, 0].float() for t in normed] if prefix > 0 else None
        mean = [t[:, prefix:].float().mean(dim=1) for t in normed]
        kind = self.spec.pooled
        if kind == "auto":
            kind = "cls" if cls is not None else "mean"
        if kind == "cls":
            if cls is None:
                raise FmcacheError(f"{self.spec.name} has no CLS token; its pooled feature must be 'mean'")
            pooled = cls[-1]
        elif kind == "mean":
            pooled = mean[-1]
        elif kind == "pooled":
            if backend_pooled is None:
                raise FmcacheError(f"{self.spec.name}: the backend returned no pooled output")
            pooled = backend_pooled.float()
        else:
            raise FmcacheError(f"unknown pooled kind '{self.spec.pooled}' for {self.spec.name}")
        head = self.spec.head_tokens
        if head == "prenorm":
            head_tokens = tokens[-1][:, prefix:]
        elif head == "final":
            head_tokens = normed[-1][:, prefix:]
        elif head in ("pooler", "neck"):
            if backend_head_tokens is None:
                raise FmcacheError(f"{self.spec.name}: the backend returned no {head} tokens")
            head_tokens = backend_head_tokens
        else:
            raise FmcacheError(f"unknown head_tokens rule '{head}' for {self.spec.name}")
        return FoundationOutput(tokens, prefix, cls, mean, pooled, kind, head_tokens)


def _weights_source(spec: ModelSpec, weights: Path | None, random_init: bool) -> str:
    if weights is not None and random_init:
        raise FmcacheError("--weights and --random-init exclude each other; pass one")
    if weights is not None:
        return "file"
    if random_init:
        return "random"
    if not spec.hub:
        raise FmcacheError(f"{spec.name} has no hub weights: {spec.notes}; pass --weights FILE (or --random-init)")
    return "hub"


def create_foundation(
    name: str,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    arch_overrides: dict | None = None,
    seed: int = RANDOM_INIT_SEED,
) -> Foundation:
    """Build a registry model in eval mode with weights from exactly one source: the one way extract and finetune
    build a foundation.

    Sources: the hub (default), a local ``weights`` file, or an explicit ``random_init``. There is no silent
    fallback to random weights. The build runs under ``torch.manual_seed(seed)`` (the caller's RNG state is
    restored), so random weights, and any parameter a weights file leaves at its init, are the same in every
    process, resume and run: shards written by different ranks, and a fine-tune's start and its cache, come from
    one model. ``arch_overrides`` are passed to the backend constructor (tests use them to build the real
    architecture at a tiny depth/width).
    """
    spec = get_spec(name)
    source = _weights_source(spec, Path(weights) if weights is not None else None, random_init)
    size = int(img_size or spec.default_img_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter, report = build_backend(
            spec, source, size, Path(weights) if weights else None, dict(arch_overrides or {})
        )
    if source == "file":
        assert report is not None
        info = {"source": "file", "path": report.path, "sha256": report.sha256, "report": report.summary()}
        info["unexpected_keys"] = list(report.unexpected[:50])
    elif source == "hub":
        info = {"source": "hub", "id": spec.hub_id}
        if spec.paper_weights:  # recorded in the manifest, so every result made from this cache names it
            info["differs_from_paper"] = spec.paper_weights
    else:
        info = {"source": "random", "id": "random-init"}
    if arch_overrides:
        info["arch_overrides"] = dict(arch_overrides)
    model = Foundation(spec, adapter, size, info)
    model.eval().requires_grad_(False)
    return model


def weights_available_locally(spec: ModelSpec) -> bool:
    """Whether the hub weights are already in the local Hugging Face cache (no network access)."""
    repo = None
    try:
        if spec.backend == "timm":
            import timm

            cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.{spec.tag}" if spec.tag else spec.arch)
            repo = getattr(cfg, "hf_hub_id", None)
        elif spec.backend == "open_clip":
            import open_clip

            repo = (open_clip.get_pretrained_cfg(spec.arch, spec.tag or "") or {}).get("hf_hub")
        elif spec.backend == "sam2":
            repo = (spec.tag or "").rpartition("/")[0]
        else:
            repo = spec.arch
    except Exception:
        return False
    if not repo:
        return False
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = Path(HF_HUB_CACHE) / ("models--" + repo.strip("/").replace("/", "--"))
    return (folder / "snapshots").is_dir() and any((folder / "snapshots").iterdir())
