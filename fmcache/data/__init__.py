"""Datasets: official on-disk layouts, labels, deterministic splits, image reading and transforms.

The four paper datasets (:data:`PAPER_DATASETS`) and the external-validation sets that share their tasks
(:data:`EXTERNAL_DATASETS`, all test by default) carry raw labels and per-sample metadata in their index.

``load_dataset(name, root, **options)`` returns a :class:`DatasetIndex` (paths, labels, split in a canonical
order); :class:`ImageDataset` with :func:`build_transform` turns it into tensors. :func:`write_split_csv`
exports a split that the ``split="file:FILE.csv"`` option of every loader reads back.
"""

from __future__ import annotations

from fmcache.data.describe import describe, format_description
from fmcache.data.images import IMAGE_EXTENSIONS, load_image
from fmcache.data.index import SPLITS, DatasetIndex, random_split, split_code
from fmcache.data.registry import (
    DATASETS,
    EXTERNAL_DATASETS,
    PAPER_DATASETS,
    DatasetSpec,
    dataset_metric,
    dataset_names,
    dataset_norm,
    default_metric,
    load_dataset,
)
from fmcache.data.splits import read_split_csv, write_split_csv
from fmcache.data.torch_dataset import ImageDataset
from fmcache.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transform,
    default_resize,
    train_augmentation,
    train_augmentation_spec,
)

__all__ = [
    "DATASETS",
    "EXTERNAL_DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "PAPER_DATASETS",
    "SPLITS",
    "DatasetIndex",
    "DatasetSpec",
    "ImageDataset",
    "build_transform",
    "dataset_metric",
    "dataset_names",
    "dataset_norm",
    "default_metric",
    "default_resize",
    "describe",
    "format_description",
    "load_dataset",
    "load_image",
    "random_split",
    "read_split_csv",
    "split_code",
    "train_augmentation",
    "train_augmentation_spec",
    "write_split_csv",
]
