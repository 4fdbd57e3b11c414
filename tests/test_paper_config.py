"""configs/paper.yaml reproduces every table and figure of the paper, and the report maps each result back.

The dry run needs no data (the roots are the config's placeholders) and plans from the official image counts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fmcache.cli import app
from fmcache.grid.config import label, load_grid
from fmcache.grid.dry_run import paper_outputs
from fmcache.grid.jobs import expand
from fmcache.report.paper import OUTPUTS
from fmcache.report.tables import doc_outputs

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _config(tmp_path: Path, name: str) -> Path:
    (tmp_path / "configs").mkdir(exist_ok=True)
    return Path(shutil.copy(REPO / "configs" / name, tmp_path / "configs" / name))


def _result_doc(job) -> dict:
    """The result.json fields the job's runner would write that decide its place in the report."""
    options = dict(job.options)
    settings: dict = {k: v for k, v in options.items() if k in ("freeze", "drop_after")}
    doc = {"protocol": job.kind, "model": job.model["name"], "img_size": job.model.get("img_size") or 224,
           "cache_key": "a" * 64, "settings": settings}  # fmt: skip
    if job.kind in ("probe_linear", "knn"):
        doc["paper_feature"] = options.get("pool") == "paper"
    if job.kind == "knn":
        settings.update(ks=options.get("ks"), temperature=options.get("temperature"))
    if job.kind == "probe_deit":
        layer = str(options.get("layer", "last"))
        doc["paper_feature"] = layer == "paper"
        settings["layers"] = ["paper"] if layer == "paper" else list(range(1, 13)) if layer == "all" else [12]
    if job.kind == "cka":
        if job.model_b is not None:
            settings.update(model_b=job.model_b["name"], cache_b_key="b" * 64)
        elif options.get("after_finetune"):
            settings.update(model_b=job.model["name"], cache_b_key="c" * 64)
    return doc


@pytest.mark.parametrize("name", ["paper.yaml", "followup.yaml", "external.yaml"])
def test_dry_run_needs_no_data_and_groups_by_the_paper(tmp_path, name):
    config = _config(tmp_path, name)
    result = runner.invoke(app, ["grid", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    for dataset, count in (("aptos2019", "3,662"), ("cbis_ddsm", "10,239"), ("isic2019", "25,331"),
                           ("chexpert", "224,316")):  # fmt: skip
        lines = [line for line in result.output.splitlines() if line.startswith(f"dataset {dataset}:")]
        assert len(lines) == 1 and f"official release's {count} images" in lines[0], lines
    assert "by the paper's tables and figures:" in result.output
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_paper_yaml_has_a_job_for_every_table_and_figure_and_the_report_maps_each_back(tmp_path):
    grid = load_grid(_config(tmp_path, "paper.yaml"))
    jobs = expand(grid)
    covered: dict[str, int] = {}
    for job in jobs:
        outputs = paper_outputs(job)
        for output in outputs:
            covered[output] = covered.get(output, 0) + 1
        if not job.is_stage_one:  # extract and pixel jobs write caches, not results
            assert doc_outputs(_result_doc(job)) == outputs, job.id
    missing = [key for key in OUTPUTS if not covered.get(key)]
    assert not missing, f"configs/paper.yaml runs nothing for {missing}"
    # every model the paper shows in each table and figure has its job there
    at224 = {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "sam_vit_b", "focal", "clip_vitb16",
             "blip_base", "dino_vitb16", "deit_base", "resnet152"}  # fmt: skip
    five = {"dinov2_vitb14", "sam_vit_b", "focal", "clip_vitb16", "blip_base"}
    expected = {
        "table1_frozen": at224, "table2_unfrozen": at224, "fig2_knn": at224,
        "table3_1024px": {"sam_vit_b@1024", "focal@1024", "clip_vitb16@1024", "dinov2_vitb14@1022", "blip_base@1024"},
        "fig4_freeze": five | {"deit_base", "dino_vitb16"}, "fig5_decapitation": five,
        "fig6_model_size": {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"},
        "fig7_cka_finetune": five | {"deit_base"},
    }  # fmt: skip
    for output, models in expected.items():
        shown = {label(j.model) for j in jobs if output in paper_outputs(j)}
        assert shown == models, (output, sorted(shown ^ models))
    table3 = [j for j in jobs if "table3_1024px" in paper_outputs(j)]
    assert {j.kind for j in table3} == {"finetune_linear"} and all(j.options["freeze"] == "none" for j in table3)
    assert not [j for j in jobs if "@10" in label(j.model) and j.id not in {t.id for t in table3}]  # nothing else
    assert grid.extract["views"] > 0 and grid.extract["tokens"] == "paper" and grid.extract["precision"] == "fp16"
    assert "resnet50" not in {m["name"] for m in grid.models}


def test_followup_lists_vmamba_as_unavailable_and_feeds_each_model_as_the_followup(tmp_path):
    text = (REPO / "configs" / "followup.yaml").read_text()
    assert "VMamba is listed by the follow-up but is not available" in text
    grid = load_grid(_config(tmp_path, "followup.yaml"))
    assert {"sam2_b", "mae_vitb16", "aimv2_l14", "coca_vitb32"} <= {m["name"] for m in grid.models}
    deit = [j for j in expand(grid) if j.kind == "probe_deit"]
    assert deit and all(str(j.options["layer"]) == "paper" for j in deit)


def test_external_yaml_has_every_shipped_pair_and_a_corrupted_test_split_per_paper_dataset(tmp_path):
    """configs/external.yaml: each pair with a shipped label map, scored by the paper's foundations, and each paper
    dataset's corruption curves; external sets get no job that trains on them."""
    from fmcache.data.label_maps import shipped_pairs

    jobs = expand(load_grid(_config(tmp_path, "external.yaml")))
    transfers = [j for j in jobs if j.kind == "transfer"]
    pairs = {(j.options["source"], j.dataset["name"]) for j in transfers if not j.extract.get("corrupt")}
    assert pairs == set(shipped_pairs())
    corrupted = {j.dataset["name"] for j in transfers if j.extract.get("corrupt")}
    assert corrupted == {"aptos2019", "isic2019", "chexpert", "cbis_ddsm"}
    external = {"messidor2", "idrid", "eyepacs", "pad_ufes20", "ham10000", "mimic_cxr", "chestxray14", "cmmd",
                "vindr_mammo"}  # fmt: skip
    assert not [j for j in jobs if j.dataset["name"] in external and j.kind not in ("extract", "transfer")]
    models = {label(j.model) for j in transfers}
    assert len(models) == 11 and "resnet152" in models
