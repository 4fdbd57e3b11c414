"""A torch Dataset over some samples of a :class:`DatasetIndex`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fmcache.data.images import load_image
from fmcache.data.index import DatasetIndex


class ImageDataset(Dataset):
    """Images of ``index`` at the global ``indices``, transformed; items are ``(tensor, global_index)``.

    The global index travels with each tensor so writers can store features by sample id, whatever the
    DataLoader's batching or worker order.
    """

    def __init__(
        self,
        index: DatasetIndex,
        indices: np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise ValueError("indices must be a 1-D integer array of global sample indices")
        if indices.size and (indices.min() < 0 or indices.max() >= len(index)):
            raise ValueError(f"indices must lie in [0, {len(index)}), the size of dataset {index.name}")
        self.index = index
        self.indices = indices.astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        global_index = int(self.indices[i])
        image = load_image(self.index.paths[global_index])
        return self.transform(image), global_index
