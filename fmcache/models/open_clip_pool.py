"""open_clip's pooling of last-block tokens, shared by the adapter (extraction) and the block view (fine-tuning)."""

from __future__ import annotations

import torch
from torch import nn


def open_clip_pool(visual: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's own pooling of last-block tokens ``h``: (pooled, the pooler's other tokens). CLIP: ln_post(CLS)
    @ proj; CoCa: the attention pooler's contrastive token @ proj, and its other outputs."""
    pooled, pool_tokens = visual._pool(h)
    return (pooled @ visual.proj if visual.proj is not None else pooled), pool_tokens


def coca_head_tokens(pooled: torch.Tensor, pool_tokens: torch.Tensor) -> torch.Tensor:
    """The follow-up's CoCa input to the DeiT head: the projected contrastive token, then the pooler's others."""
    return torch.cat([pooled[:, None], pool_tokens], dim=1)
