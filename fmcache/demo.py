"""An offline end-to-end demo on real scanned images: scikit-learn's bundled handwritten digits.

Writes the digits as an upsampled ImageFolder (with SYNTHETIC patient, sex and age per scan, said loudly),
extracts a small registry model (random weights, said loudly, since no hub is reachable offline), then runs the
paper's k-NN and linear probe on the paper feature, k-NN on every stage, the linear-probe grid on the best stage and
layer × layer CKA from the cache. A second random-init model and a binary version of the task (digit 0-4 vs 5-9,
scored by AUC) give the report what its evidence compares: patient-level CIs, DeLong's test, reliability diagrams,
subgroup tables by sex and age, and rankings across the two tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fmcache.data.digits import write_binary_digits, write_digits
from fmcache.errors import FmcacheError
from fmcache.extract.spec import ExtractSpec
from fmcache.frozen.specs import CkaSpec, KnnSpec, ProbeSpec
from fmcache.report.render import build_report

SECOND_MODEL = "timm:resnet18"  # a second foundation, so the report can compare and rank two
BINARY_METRIC = "auc"  # the binary task is scored by AUC, which DeLong's test compares


def run_demo(
    out: Path = Path("demo_out"),
    model: str = "resnet50",
    img_size: int = 32,
    per_class: int | None = 100,
    epochs: int = 30,
    log: Callable[[str], None] = print,
    second_model: str = SECOND_MODEL,
) -> dict:
    """Digits → extract → knn → probe → cka, then the same scans as a binary task with a second model, and the
    report with its evidence; returns the results and writes them under ``out``."""
    from fmcache.extract.run import run_extract  # deferred: h5py
    from fmcache.frozen.run import run_cka, run_knn, run_probe  # deferred: h5py

    out = Path(out)
    data_root, binary_root = out / "digits", out / "digits_binary"
    if not (data_root / "metadata.csv").is_file():  # a demo folder from before 0.4 gets its metadata too
        log(f"writing scikit-learn digits to {data_root}")
        write_digits(data_root, per_class=per_class)
    write_binary_digits(data_root, binary_root)
    log(f"WARNING: the demo uses --random-init: {model} and {second_model} have RANDOM weights (no hub offline).")
    log("note: the digits' patient, sex and age (metadata.csv) are SYNTHETIC, for the report's evidence tables.")

    def extract(dataset: str, root: Path, name: str) -> Path:
        spec = ExtractSpec(
            dataset=dataset,
            data_root=root,
            model=name,
            random_init=True,
            img_size=img_size,
            tokens="none",
            batch_size=64,
            workers=0,
            shard_size=512,
            cache_root=out / "cache",
        )
        return run_extract(spec, log=log)

    folder = extract("imagefolder", data_root, model)
    results = out / "results"
    # the paper's protocols on the paper feature (the last layer's pooled feature): Fig. 2's k-NN with the seed's
    # k = 200 and T = 0.1, and Table 1's linear probe
    seed_knn = run_knn(KnnSpec(folder, results, ks=(200,), temperature=0.1, layer="last"), log=log)
    paper_probe = run_probe(ProbeSpec(folder, results, lrs=(1e-3, 1e-2), seeds=2, epochs=epochs, pool="paper"), log=log)
    # beyond the paper: k-NN on every stage (DINO's k), and the linear probe on the stage k-NN likes most on val
    # (random-init CNN features are best at the middle stages)
    knn = run_knn(KnnSpec(folder, results, ks=(10, 20), layer="all"), log=log)
    best = max(knn["layers"], key=lambda n: knn["layers"][n]["splits"]["val"][10]["value"])
    # z-scored (fmcache's option; the seed's linear head reads the raw feature): scikit-learn's reference beside it
    # fits on z-scored features too, so the two heads see the same inputs
    probe_spec = ProbeSpec(
        folder, results, lrs=(1e-3, 1e-2), seeds=2, epochs=epochs, layer=best, sklearn=True, standardize=True
    )
    probe = run_probe(probe_spec, log=log)
    # every stage against every stage on the test split (exact, debiased): how far apart the stages' views are
    cka = run_cka(CkaSpec(folder, out=results, layers="all"), log=log)
    if not knn or not probe:
        raise FmcacheError("the demo produced no results")
    # the evidence needs more than one cell: a second model on both tasks (paired tests, ranks across datasets),
    # and a binary task scored by AUC (DeLong)
    compared = {}
    for name in (model, second_model):
        for dataset, root, metric in (("imagefolder", data_root, None), ("csv", binary_root, BINARY_METRIC)):
            cache = folder if (name, dataset) == (model, "imagefolder") else extract(dataset, root, name)
            if (name, dataset) != (model, "imagefolder"):
                run_knn(KnnSpec(cache, results, ks=(200,), temperature=0.1, layer="last", metric=metric), log=log)
            compared[(name, dataset)] = run_probe(
                ProbeSpec(cache, results, lrs=(1e-3, 1e-2), seeds=2, epochs=epochs, pool="paper", metric=metric),
                log=log,
            )
    report = build_report(results, out / "report", formats=("md", "csv", "html"), by=("sex", "age_bin"), log=log)
    log(f"report: {report['files'][0]}")
    return {
        "cache": folder,
        "knn": knn,
        "probe": probe,
        "cka": cka,
        "seed_knn": seed_knn,
        "paper_probe": paper_probe,
        "compared": compared,
        "report": report,
    }
