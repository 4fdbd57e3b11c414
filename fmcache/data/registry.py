"""Dataset registry: name → loader, the seed's normalisation and the paper's metric."""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fmcache.data import aptos, chexpert, isic
from fmcache.data._io import resolve_root
from fmcache.data.aptos import load_aptos2019
from fmcache.data.chexpert import load_chexpert
from fmcache.data.ddsm import load_cbis_ddsm
from fmcache.data.generic import load_csv, load_imagefolder
from fmcache.data.index import DatasetIndex
from fmcache.data.isic import load_isic2019
from fmcache.errors import FmcacheError

Norm = tuple[tuple[float, float, float], tuple[float, float, float]]


def _gray(mean: float, std: float) -> Norm:
    # Grayscale datasets are fed as three identical channels, so their statistics repeat too.
    return (mean, mean, mean), (std, std, std)


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset. ``metric`` is the paper's metric name (:data:`fmcache.metrics.METRICS`); the generic
    layouts name accuracy, which becomes mean AUC when their labels are multi-label (:func:`metric_for`)."""

    name: str
    loader: Callable[..., DatasetIndex]
    description: str
    norm: Norm | None
    metric: str = "accuracy"
    official_images: int | None = None  # images in the official release (the paper's sizes); a dry run plans with it
    classes: int | None = None

    def option_defaults(self) -> dict[str, object]:
        """The loader's keyword options and their defaults (the valid ``load_dataset`` options)."""
        params = inspect.signature(self.loader).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "aptos2019",
            load_aptos2019,
            "APTOS 2019 diabetic retinopathy, 5 grades",
            ((0.415, 0.221, 0.073), (0.275, 0.150, 0.081)),
            metric="qwk",
            official_images=3662,
            classes=len(aptos.CLASS_NAMES),
        ),
        DatasetSpec("cbis_ddsm", load_cbis_ddsm, "CBIS-DDSM mammograms, binary", _gray(0.286, 0.267), "auc", 10239, 2),
        DatasetSpec(
            "isic2019",
            load_isic2019,
            "ISIC 2019 dermoscopy, 8 classes",
            ((0.6678, 0.5296, 0.5243), (0.2238, 0.2036, 0.2154)),
            metric="macro_recall",
            official_images=25331,
            classes=len(isic.CLASS_NAMES),
        ),
        DatasetSpec(
            "chexpert",
            load_chexpert,
            "CheXpert chest X-rays, 14 labels",
            _gray(0.503, 0.292),
            "mean_auc",
            224316,
            len(chexpert.OBSERVATIONS),
        ),
        DatasetSpec("csv", load_csv, "any images listed in a CSV manifest", None),
        DatasetSpec("imagefolder", load_imagefolder, "any images in class folders", None),
    )
}


def dataset_names() -> list[str]:
    """Registered dataset names, in registry order."""
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset; an unknown name is an error listing the valid ones."""
    if name not in DATASETS:
        raise FmcacheError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, root: str | Path, **options: object) -> DatasetIndex:
    """Index the dataset ``name`` found at ``root``.

    ``options`` are the loader's keyword options (see ``DATASETS[name].option_defaults()``); a None value
    means "use the default", so CLI flags left unset can be passed through. An unknown option is an error.
    """
    spec = get_spec(name)
    options = {k: v for k, v in options.items() if v is not None}
    valid = spec.option_defaults()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise FmcacheError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name}; valid options: {', '.join(valid) or 'none'}"
        )
    with _gc_paused():
        return spec.loader(resolve_root(root, name), **options)


@contextmanager
def _gc_paused() -> Iterator[None]:
    # Indexing CheXpert creates millions of small objects that all survive; the cyclic GC would rescan them
    # again and again (about 40% of the load time) while finding nothing to free.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def dataset_norm(name: str) -> Norm | None:
    """The seed's per-dataset (mean, std), three channels each; None for csv/imagefolder."""
    return get_spec(name).norm


def dataset_metric(name: str) -> str:
    """The paper's metric name for a dataset (generic layouts: accuracy, or mean AUC when multi-label)."""
    return get_spec(name).metric


def metric_for(name: str, multilabel: bool) -> str:
    """The metric a dataset reports for its label kind (multi-label csv/imagefolder: mean AUC)."""
    from fmcache.metrics import metric_for_labels

    return metric_for_labels(dataset_metric(name), multilabel, owner=f"dataset {name!r}")


def default_metric(index: DatasetIndex) -> str:
    """The metric to report for a loaded index, by dataset and label kind."""
    return metric_for(index.name, index.multilabel)
