"""Time ``fmcache report`` (:func:`fmcache.report.render.build_report`) on a synthetic results tree of the paper
grid's size.

The tree (written through :func:`fmcache.results.write_result`, as the runners write): 748 results over the paper's
four datasets and eleven models, by protocol as ``configs/paper.yaml`` plans them: k-NN (the seed's k = 200 for Fig. 2
and DINO's sweep), the linear probe (the paper feature for Table 1, per-layer studies), the DeiT probe (paper tokens,
decapitation), fine-tuning with linear and DeiT heads (Table 2 unfrozen, Table 3 at 1024 px, Fig. 4's frozen-block
sweep, decapitation) and CKA. Test splits: APTOS2019-like 550 images (5 grades, qwk, no patient ids: image level),
CBIS-DDSM-like 1,024 (binary AUC, 2 images per patient), ISIC2019-like 2,533 (8 classes, macro recall, ~1.3 images
per lesion) and CheXpert-like 22,000 (14 labels, mean AUC, ~25 % unknown, ~3 images per patient); val splits the
same size except CheXpert's 5,000. Five seeds per head grid (k-NN one), fp32 probabilities; per-sample sex, age
(and view for CheXpert) as the runners save them.

Timed: the report with its defaults (1,000 resamples, every format, no subgroups), printed per result and in
total; ``--by sex,age_bin`` adds the subgroup tables. ``--models K`` writes and reports only the results of the
first K of the 11 models (a proportional slice: every dataset, protocol and paper column, K models each) and
extrapolates to the whole tree by the results with predictions (568 of 748; CKA results cost the report
nothing): the work is per result and per pair in a column, so it grows with them. Writing the tree is timed apart
and not counted.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmcache import metrics  # noqa: E402
from fmcache.protocols import get_protocol  # noqa: E402
from fmcache.report.render import build_report  # noqa: E402
from fmcache.results import result_folder, seed_summary, write_result  # noqa: E402

MODELS = (
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vitl14",
    "dinov2_vitg14",
    "sam_vit_b",
    "focal",
    "clip_vitb16",
    "blip_base",
    "dino_vitb16",
    "deit_base",
    "resnet152",
)
HIGH_RES = ("blip_base", "clip_vitb16", "dinov2_vitb14", "focal", "sam_vit_b")  # Table 3's models
# dataset: (test n, val n, classes or labels, metric, images per unit, unit)
DATASETS = {
    "aptos2019": (550, 550, 5, "qwk", 1.0, None),
    "cbis_ddsm": (1024, 1024, 2, "auc", 2.0, "patient"),
    "isic2019": (2533, 2533, 8, "macro_recall", 1.3, "lesion"),
    "chexpert": (22000, 5000, 14, "mean_auc", 3.0, "patient"),
}
SEEDS = 5


def jobs() -> list[tuple[str, str, dict, dict]]:
    """(protocol, model, settings, extra) per result of one dataset: 187 of them, 748 over the four datasets."""
    out = []
    for m in MODELS:
        out.append(("knn", m, {"ks": [200], "temperature": 0.1, "layers": [12]}, {"paper_feature": True}))
        out.append(("knn", m, {"ks": [10, 20, 100, 200], "temperature": 0.07}, {"paper_feature": False}))
        out.append(("probe_linear", m, {"pool": ["paper"], "layers": ["last"]}, {"paper_feature": True}))
        out.append(("probe_linear", m, {"pool": ["cls"], "layers": "all"}, {"paper_feature": False}))
        out.append(("probe_deit", m, {"layers": ["paper"]}, {"paper_feature": True}))
        for head in ("finetune_linear", "finetune_deit"):
            out.append((head, m, {"freeze": "none", "drop_after": None}, {}))
    for m in HIGH_RES:
        out.append(("probe_deit", m, {"layers": "all"}, {}))  # the frozen decapitation curve
        for head in ("finetune_linear", "finetune_deit"):
            out.append((head, m, {"freeze": "none", "drop_after": None, "img": 1024}, {"img_size": 1024}))
        out += [("finetune_deit", m, {"freeze": "none", "drop_after": k}, {}) for k in (4, 8)]
    out += [
        ("finetune_linear", m, {"freeze": str(k), "drop_after": None}, {}) for m in MODELS[:8] for k in (2, 4, 6, 8, 10)
    ]
    pairs = [(a, b) for i, a in enumerate(MODELS) for b in MODELS[i + 1 :]]  # 55 pairs; 45 written per dataset
    out += [("cka", a, {"layers": "last", "model_b": b, "cache_b_key": (b * 64)[:64]}, {}) for a, b in pairs[:45]]
    return out


def split(dataset: str, name: str, rng: np.random.Generator, quality: float, seeds: int) -> dict:
    """One split's arrays as a runner saves them: ids, labels, (seeds, n, C) probabilities, groups, metadata."""
    n_test, n_val, width, metric, per_unit, unit = DATASETS[dataset]
    n = n_test if name == "test" else n_val
    labels_rng = np.random.default_rng((len(dataset), n))  # the same labels for every model
    if metric == "mean_auc":
        y = (labels_rng.random((n, width)) < 0.2).astype(np.float64)
        y[labels_rng.random((n, width)) < 0.25] = np.nan
        logit = quality * (2 * np.nan_to_num(y) - 1)[None] + rng.normal(size=(seeds, n, width))
        scores = 1 / (1 + np.exp(-logit))
    else:
        y = labels_rng.integers(0, width, n)
        logit = quality * 2 * np.eye(width)[y][None] + rng.normal(size=(seeds, n, width))
        scores = np.exp(logit) / np.exp(logit).sum(-1, keepdims=True)
    units = labels_rng.integers(0, max(1, int(n / per_unit)), n)
    groups = np.array([f"{unit}:{u:06d}" for u in units]) if unit else np.array([f"image:{i}" for i in range(n)])
    person = labels_rng.random(max(1, int(n / per_unit)) + 1)
    out = {
        f"{name}_ids": np.arange(n) + (0 if name == "test" else 10**6),
        f"{name}_labels": y,
        f"{name}_scores": scores,
        f"{name}_groups": groups,
        f"{name}_meta__sex": np.where(person[units] < 0.5, "F", "M"),
        f"{name}_meta__age": np.round(20 + 70 * person[units[::-1]]),
    }
    if dataset == "chexpert":
        out[f"{name}_meta__view"] = np.where(labels_rng.random(n) < 0.8, "frontal", "lateral")
    return out


def kept(models: int) -> list[tuple[str, str, dict, dict]]:
    """The jobs of one dataset whose models are among the first ``models`` (both models, for a CKA pair)."""
    keep = set(MODELS[:models])
    return [j for j in jobs() if j[1] in keep and j[2].get("model_b", j[1]) in keep]


def write_tree(root: Path, models: int) -> int:
    """The synthetic tree under ``root`` (the first ``models`` models); returns how many results it holds."""
    count = 0
    for dataset, (_n, _v, _w, metric, _p, unit) in DATASETS.items():
        for protocol, model, settings, extra in kept(models):
            rng = np.random.default_rng((count, 7))
            quality = 0.5 + 0.1 * MODELS.index(model)  # models differ, so rankings have something to find
            write_one(root, dataset, metric, unit, protocol, model, settings, extra, rng, quality)
            count += 1
    return count


def write_one(root, dataset, metric, unit, protocol, model, settings, extra, rng, quality) -> None:
    key = (model * 64)[:64]
    common = {
        "settings": settings,
        "dataset": dataset,
        "model": model,
        "weights": {"source": "hub"},
        "metric": metric,
        "timings": {"train_seconds": 10.0, "inference_seconds_per_sample": 1e-3},
        "details": {},
        "rows": [{"x": 1}],
        "extra": {**extra, "group_unit": unit},
    }
    folder = result_folder(root, dataset, model, key, protocol, settings)
    if protocol == "cka":
        summary = {"layers_a": [12], "layers_b": [12], "matrix": [[float(rng.random())]]}
        write_result(folder, protocol=protocol, cache_key=key, summary=summary, **common)
        return
    seeds = 1 if protocol == "knn" else SEEDS
    pred = {"seeds": np.arange(seeds) if seeds > 1 else np.array([-1])}
    for name in ("test", "val"):
        pred |= split(dataset, name, rng, quality, seeds)
    multilabel = metric == "mean_auc"

    def score(name: str) -> list[float]:
        return [
            metrics.evaluate(metric, pred[f"{name}_labels"], s, multilabel)["value"] for s in pred[f"{name}_scores"]
        ]

    test, val = score("test"), score("val")
    if protocol == "knn":
        k = settings["ks"][-1]
        rows = [
            {"layer": 12, "split": s, "k": k, "temperature": settings["temperature"], "value": v}
            for s, v in (("val", val[0]), ("test", test[0]))
        ]
        summary = {"rows": rows, "best": {"k": k, "layer": 12, "test": test[0], "val": val[0]}}
    else:
        summary = seed_summary(1e-4, val, test, seeds)
    cache_key = None if get_protocol(protocol).trains_foundation else key
    write_result(folder, protocol=protocol, cache_key=cache_key, summary=summary, predictions=pred, **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=len(MODELS), help="the first K of the 11 models (a slice)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--by", default=None, help="subgroup columns, e.g. sex,age_bin")
    parser.add_argument("--root", type=Path, default=None, help="keep the tree here (default: a temporary folder)")
    args = parser.parse_args()
    base = args.root or Path(tempfile.mkdtemp(prefix="bench_report_"))
    root, out = base / "results", base / "report"
    with_predictions = 4 * sum(1 for j in kept(args.models) if j[0] != "cka")
    try:
        t0 = time.perf_counter()
        n = write_tree(root, args.models) if not root.is_dir() else sum(1 for _ in root.rglob("result.json"))
        print(
            f"tree: {n} results ({with_predictions} with predictions) of {args.models} models, written in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        wall, cpu = time.perf_counter(), time.process_time()
        report = build_report(root, out, ("md", "csv", "tex", "html"), args.resamples, by=args.by, log=lambda _m: None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        cells = len(report["evidence"].results)
        print(
            f"report: {wall:.1f} s wall ({cpu:.1f} s CPU) for {n} results ({cells} fill paper cells): "
            f"{wall / n:.3f} s per result, {len(report['files'])} files"
        )
        if args.models < len(MODELS):
            total = wall / with_predictions * 568
            print(
                f"extrapolated to the paper grid's 748 results (568 with predictions): {total / 60:.1f} min, "
                f"{total / 748:.2f} s per result"
            )
    finally:
        if args.root is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
