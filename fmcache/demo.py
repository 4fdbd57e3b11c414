"""An offline end-to-end demo on real scanned images: scikit-learn's bundled handwritten digits.

Writes the digits as an upsampled ImageFolder, extracts a small registry model (random weights, said loudly,
since no hub is reachable offline), then runs the paper's k-NN and linear probe on the paper feature, k-NN on every
stage, the linear-probe grid on the best stage and layer × layer CKA from the cache, and writes the report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fmcache.data.digits import write_digits
from fmcache.errors import FmcacheError
from fmcache.extract.spec import ExtractSpec
from fmcache.frozen.specs import CkaSpec, KnnSpec, ProbeSpec
from fmcache.report.render import build_report


def run_demo(
    out: Path = Path("demo_out"),
    model: str = "resnet50",
    img_size: int = 32,
    per_class: int | None = 100,
    epochs: int = 30,
    log: Callable[[str], None] = print,
) -> dict:
    """Digits → extract → knn → probe → cka; returns the results and writes them under ``out``."""
    from fmcache.extract.run import run_extract  # deferred: h5py
    from fmcache.frozen.run import run_cka, run_knn, run_probe  # deferred: h5py

    out = Path(out)
    data_root = out / "digits"
    if not data_root.is_dir():
        log(f"writing scikit-learn digits to {data_root}")
        write_digits(data_root, per_class=per_class)
    log(f"WARNING: the demo uses --random-init: {model} has RANDOM weights (no hub access offline).")
    log("note: the digits' patient, sex and age (metadata.csv) are SYNTHETIC, for the report's evidence tables.")
    spec = ExtractSpec(
        dataset="imagefolder",
        data_root=data_root,
        model=model,
        random_init=True,
        img_size=img_size,
        tokens="none",
        batch_size=64,
        workers=0,
        shard_size=512,
        cache_root=out / "cache",
    )
    folder = run_extract(spec, log=log)
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
    report = build_report(results, out / "report", formats=("md", "csv", "html"), log=log)
    log(f"report: {report['files'][0]}")
    return {
        "cache": folder,
        "knn": knn,
        "probe": probe,
        "cka": cka,
        "seed_knn": seed_knn,
        "paper_probe": paper_probe,
        "report": report,
    }
