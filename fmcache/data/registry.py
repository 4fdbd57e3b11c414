"""Dataset registry: name → loader, the seed's normalisation, the paper's metric and the per-sample facts.

The four paper datasets come first, then the external-validation sets (each shares the task of one paper dataset,
its ``source``, and is all test by default), then the generic layouts. External sets have no published
per-dataset normalisation: ``norm`` is None (the model's own); a transfer run should normalise them as its source.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from fmcache.data import (
    aptos,
    chestxray14,
    chexpert,
    cmmd,
    eyepacs,
    ham10000,
    idrid,
    isic,
    messidor2,
    mimic_cxr,
    pad_ufes20,
    vindr_mammo,
)
from fmcache.data._io import resolve_root
from fmcache.data.aptos import load_aptos2019
from fmcache.data.chestxray14 import load_chestxray14
from fmcache.data.chexpert import load_chexpert
from fmcache.data.cmmd import load_cmmd
from fmcache.data.ddsm import load_cbis_ddsm
from fmcache.data.eyepacs import load_eyepacs
from fmcache.data.generic import load_csv, load_imagefolder
from fmcache.data.ham10000 import load_ham10000
from fmcache.data.idrid import load_idrid
from fmcache.data.index import DatasetIndex
from fmcache.data.isic import load_isic2019
from fmcache.data.messidor2 import load_messidor2
from fmcache.data.mimic_cxr import load_mimic_cxr
from fmcache.data.pad_ufes20 import load_pad_ufes20
from fmcache.data.transforms import check_gray
from fmcache.data.vindr_mammo import load_vindr_mammo
from fmcache.errors import FmcacheError
from fmcache.metrics import metric_for_labels

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
    # Per-sample facts (DatasetIndex.metadata): the columns the loader fills when the release has them, and the
    # one that is the independent unit for bootstrap (None: every image). A loader sets index.group_unit to None
    # where the optional file that carries the unit is absent (ISIC's metadata CSV, Messidor-2's exam pairs).
    metadata_columns: tuple[str, ...] = ()
    group_unit: str | None = None
    # External validation: all samples are test by default; ``source`` is the paper dataset with the same task and
    # ``to_source`` a suggested map from this dataset's classes to the source's (a subset where classes differ).
    external: bool = False
    source: str | None = None
    to_source: dict[str, str] = field(default_factory=dict)
    # Datasets whose metadata["image_id"] values share one namespace (so overlaps show by id): "isic" for the
    # ISIC archive's ISIC_00xxxxx ids.
    id_namespace: str | None = None
    grayscale: bool = False  # released as single-channel scans (repeated to three channels when read)

    def option_defaults(self) -> dict[str, object]:
        """The loader's keyword options and their defaults (the valid ``load_dataset`` options)."""
        params = inspect.signature(self.loader).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


_PAPER = (
    DatasetSpec(
        "aptos2019",
        load_aptos2019,
        "APTOS 2019 diabetic retinopathy, 5 grades",
        ((0.415, 0.221, 0.073), (0.275, 0.150, 0.081)),
        metric="qwk",
        official_images=3662,
        classes=len(aptos.CLASS_NAMES),
        metadata_columns=("image_id",),
    ),
    DatasetSpec(
        "cbis_ddsm",
        load_cbis_ddsm,
        "CBIS-DDSM mammograms, binary",
        _gray(0.286, 0.267),
        "auc",
        10239,
        2,
        metadata_columns=("image_id", "patient", "laterality", "view", "breast_density", "abnormality_type"),
        group_unit="patient",
        grayscale=True,
    ),
    DatasetSpec(
        "isic2019",
        load_isic2019,
        "ISIC 2019 dermoscopy, 8 classes",
        ((0.6678, 0.5296, 0.5243), (0.2238, 0.2036, 0.2154)),
        metric="macro_recall",
        official_images=25331,
        classes=len(isic.CLASS_NAMES),
        metadata_columns=("image_id", *isic.METADATA_COLUMNS),
        group_unit="lesion_id",
        id_namespace="isic",
    ),
    DatasetSpec(
        "chexpert",
        load_chexpert,
        "CheXpert chest X-rays, 14 labels",
        _gray(0.503, 0.292),
        "mean_auc",
        224316,
        len(chexpert.OBSERVATIONS),
        metadata_columns=("patient", "study", *chexpert.METADATA_COLUMNS),
        group_unit="patient",
        grayscale=True,
    ),
)


def _external(
    name: str,
    module: ModuleType,
    loader: Callable[..., DatasetIndex],
    description: str,
    metric: str,
    official_images: int,
    metadata_columns: tuple[str, ...],
    id_namespace: str | None = None,
) -> DatasetSpec:
    """An external-validation spec: the module's classes, group unit, source and class map fill the rest."""
    return DatasetSpec(
        name,
        loader,
        description,
        None,
        metric,
        official_images,
        len(module.CLASS_NAMES),
        metadata_columns=metadata_columns,
        group_unit=module.GROUP_UNIT,
        external=True,
        source=module.SOURCE,
        to_source=module.TO_SOURCE,
        id_namespace=id_namespace,
        grayscale=module.GRAYSCALE,
    )


_EXTERNAL = (
    _external(
        "pad_ufes20",
        pad_ufes20,
        load_pad_ufes20,
        "PAD-UFES-20 smartphone skin photographs, 6 classes (external; ISIC's task)",
        "macro_recall",
        2298,
        ("image_id", *pad_ufes20.METADATA_COLUMNS),
    ),
    _external(
        "ham10000",
        ham10000,
        load_ham10000,
        "HAM10000 dermoscopy, 7 classes (inside ISIC 2019: an overlap check, not external for ISIC models)",
        "macro_recall",
        10015,
        ("image_id", *ham10000.METADATA_COLUMNS),
        id_namespace="isic",
    ),
    _external(
        "messidor2",
        messidor2,
        load_messidor2,
        "Messidor-2 fundus, 5 adjudicated DR grades (external; APTOS's task)",
        "qwk",
        1748,
        ("image_id", "dme", "exam"),
    ),
    _external(
        "idrid",
        idrid,
        load_idrid,
        "IDRiD disease grading fundus, 5 DR grades (external; APTOS's task)",
        "qwk",
        516,
        ("image_id", "release_set", "dme_risk"),
    ),
    _external(
        "eyepacs",
        eyepacs,
        load_eyepacs,
        "EyePACS (Kaggle 2015) fundus, 5 DR grades (external; APTOS's task)",
        "qwk",
        88702,
        ("image_id", "patient", "laterality", "release_set", "usage"),
    ),
    _external(
        "chestxray14",
        chestxray14,
        load_chestxray14,
        "NIH ChestX-ray14 chest X-rays, 14 findings (external; CheXpert's task)",
        "mean_auc",
        112120,
        ("image_id", "patient", *chestxray14.METADATA_COLUMNS, "sex"),
    ),
    _external(
        "mimic_cxr",
        mimic_cxr,
        load_mimic_cxr,
        "MIMIC-CXR-JPG chest X-rays, 14 CheXpert labels (external; CheXpert's task)",
        "mean_auc",
        377110,
        ("image_id", "patient", "study", "view"),
    ),
    _external(
        "cmmd",
        cmmd,
        load_cmmd,
        "CMMD digital mammograms, benign vs malignant (external; CBIS-DDSM tcia's task)",
        "auc",
        3728,
        ("image_id", "patient", "laterality", "view", "age", "abnormality", "subtype"),
    ),
    _external(
        "vindr_mammo",
        vindr_mammo,
        load_vindr_mammo,
        "VinDr-Mammo digital mammograms, BI-RADS 1-3 vs 4-5 (external; CBIS-DDSM's task by a BI-RADS rule)",
        "auc",
        20000,
        ("image_id", "study", "laterality", "view", "breast_density", "birads", "release_split"),
    ),
)

_GENERIC = (
    DatasetSpec("csv", load_csv, "any images listed in a CSV manifest", None),
    DatasetSpec("imagefolder", load_imagefolder, "any images in class folders", None),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (*_PAPER, *_EXTERNAL, *_GENERIC)}
PAPER_DATASETS: tuple[str, ...] = tuple(spec.name for spec in _PAPER)
EXTERNAL_DATASETS: tuple[str, ...] = tuple(spec.name for spec in _EXTERNAL)


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
    return metric_for_labels(dataset_metric(name), multilabel, owner=f"dataset {name!r}")


def default_metric(index: DatasetIndex) -> str:
    """The metric to report for a loaded index, by dataset and label kind."""
    return metric_for(index.name, index.multilabel)


def check_gray_for(gray: str, dataset: str) -> None:
    """``--gray seed`` is the seed's red-channel trick for single-channel scans; on RGB data it would drop colour."""
    check_gray(gray)
    spec = DATASETS.get(dataset)
    if gray == "seed" and (spec is None or not spec.grayscale):
        scans = ", ".join(name for name, s in DATASETS.items() if s.grayscale)
        raise FmcacheError(f"--gray seed applies to grayscale datasets ({scans}), not {dataset}; drop the flag")
