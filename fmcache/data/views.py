"""Images with their seeded augmented views, for ``fmcache extract --views K``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from fmcache.data.images import load_image
from fmcache.data.index import DatasetIndex
from fmcache.data.pixels import CropSource, crop_image
from fmcache.data.torch_dataset import ImageDataset
from fmcache.data.transforms import draw_view, view_seed

TRAIN = 0  # split code of the train split, the only one with views


class ViewsImageDataset(ImageDataset):
    """Items are ``(center crop, global index, views)``; ``views`` is (K, C, H, W) for train samples, else None.

    The image is decoded once for its center crop and its K views. View v of sample i comes from
    :func:`~fmcache.data.transforms.view_seed` (i, v, ``seed``), so it does not depend on batching, worker, rank or
    resume. With ``source`` (a pixel cache, :mod:`fmcache.data.pixels`) nothing is decoded: the stored crop enters
    ``transform`` and ``augment``, which are then the steps after the resize and center crop; the same seed gives
    the same views.
    """

    def __init__(
        self,
        index: DatasetIndex,
        indices: np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor],
        augment: Callable[[Image.Image], torch.Tensor],
        k: int,
        seed: int,
        source: CropSource | None = None,
    ) -> None:
        super().__init__(index, indices, transform)
        self.augment, self.k, self.seed, self.source = augment, k, seed, source

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        global_index = int(self.indices[i])
        if self.source is not None:
            image = crop_image(self.source.read(global_index))
        else:
            image = load_image(self.index.paths[global_index])
        views = None
        if self.k and int(self.index.split[global_index]) == TRAIN:
            views = torch.stack(
                [draw_view(self.augment, image, view_seed(global_index, v, self.seed)) for v in range(self.k)]
            )
        return self.transform(image), global_index, views
