"""The batched probe grid equals independently trained nn.Linear heads; selection and sanity checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from torch import nn

from fmcache import metrics, training
from fmcache.dist import pick_device
from fmcache.errors import FmcacheError
from fmcache.frozen import linear as probe
from fmcache.frozen.sklearn_ref import fit_sklearn_reference

N, D, C = 150, 12, 4
LRS = [1e-2, 3e-3]
SEEDS = [0, 7]
EPOCHS = 4
BATCH = 32  # 150 = 4 × 32 + 22: the seed drops the last partial batch (drop_last=False keeps it)


def _steps(n: int, drop_last: bool) -> int:
    return n // BATCH if drop_last else math.ceil(n / BATCH)


def _reference_head(
    x, y, seed, lr, *, multilabel, warmup, schedule, grad_clip=1.0, val=None, weight_decay=1e-5, drop_last=True
):
    """One head trained the ordinary way (the seed's loader drops its last partial batch); returns (weight (C, D),
    bias (C,), per-epoch val metric)."""
    torch.manual_seed(seed)
    model = nn.Linear(x.shape[1], C)
    opt = torch.optim.AdamW(training.adamw_param_groups(model.named_parameters(), weight_decay), lr=lr)
    total = _steps(len(x), drop_last) * EPOCHS
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: training.lr_multiplier(step, total, warmup, schedule))
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x), generator=gen).split(BATCH):
            if drop_last and len(idx) < BATCH:
                continue
            logits = model(x[idx])
            if multilabel:
                known = ~torch.isnan(y[idx])
                target = torch.nan_to_num(y[idx])
                bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
                loss = (bce * known).sum() / known.sum().clamp(min=1)
            else:
                loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
        if val is not None:
            with torch.no_grad():
                probs = torch.softmax(model(torch.as_tensor(val[0])), -1).double().numpy()
            curve.append(metrics.evaluate("accuracy", val[1], probs, False)["value"])
    return model.weight.detach(), model.bias.detach(), curve


def _data(seed=0, n=N, multilabel=False):
    """A noisy linear task; the teacher weights are fixed, ``seed`` only draws the samples."""
    w = np.random.default_rng(1234).normal(size=(D, C))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    if multilabel:
        y = (x @ w + 0.5 * rng.normal(size=(n, C)) > 0).astype(np.float32)
        y[rng.random(y.shape) < 0.25] = np.nan
        return x, y
    return x, np.argmax(x @ w + rng.normal(size=(n, C)), axis=1)


@pytest.mark.parametrize(
    ("multilabel", "schedule", "warmup", "grad_clip", "drop_last"),
    [(False, "cosine", 5, 1.0, True), (False, "constant", 0, 0.05, True), (True, "cosine", 3, 1.0, True),
     (False, "cosine", 5, 1.0, False)],
)  # fmt: skip
def test_batched_heads_equal_independent_heads(multilabel, schedule, warmup, grad_clip, drop_last):
    x, y = _data(multilabel=multilabel)
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y) if multilabel else torch.as_tensor(y, dtype=torch.int64)
    grid = probe.LinearHeadGrid(xt, yt, LRS, SEEDS, C, multilabel, 1e-5, grad_clip, torch.device("cpu"))
    total = _steps(N, drop_last) * EPOCHS
    for _ in range(EPOCHS):
        grid.train_epoch(BATCH, lambda step: training.lr_multiplier(step, total, warmup, schedule), drop_last)
    assert grid.step == total
    for i, lr in enumerate(LRS):
        for j, seed in enumerate(SEEDS):
            w, b, _ = _reference_head(
                xt, yt, seed, lr, multilabel=multilabel, warmup=warmup, schedule=schedule, grad_clip=grad_clip,
                drop_last=drop_last,
            )  # fmt: skip
            head = i * len(SEEDS) + j
            torch.testing.assert_close(grid.weight[head].detach(), w, atol=1e-5, rtol=0)
            torch.testing.assert_close(grid.bias[head].detach(), b, atol=1e-5, rtol=0)


def test_weight_decay_on_weights_only():
    # a large decay makes the seed's grouping visible: decaying the bias too would move it by ~lr·wd per step
    x, y = _data()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.int64)
    grid = probe.LinearHeadGrid(xt, yt, LRS, SEEDS, C, False, 0.5, 1.0, torch.device("cpu"))
    total = _steps(N, True) * EPOCHS
    for _ in range(EPOCHS):
        grid.train_epoch(BATCH, lambda step: training.lr_multiplier(step, total, 0, "constant"))
    w, b, _ = _reference_head(
        xt, yt, SEEDS[0], LRS[0], multilabel=False, warmup=0, schedule="constant", weight_decay=0.5
    )
    torch.testing.assert_close(grid.weight[0].detach(), w, atol=1e-5, rtol=0)
    torch.testing.assert_close(grid.bias[0].detach(), b, atol=1e-5, rtol=0)
    groups = training.adamw_param_groups(nn.Linear(3, 2).named_parameters(), 0.5)
    assert [len(g["params"]) for g in groups] == [1, 1] and [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert not training.decays("norm.weight", (768,)) and training.decays("proj.weight", (768, 64))


def test_heads_with_same_seed_share_init():
    x, y = _data()
    grid = probe.LinearHeadGrid(
        torch.as_tensor(x), torch.as_tensor(y), LRS, SEEDS, C, False, 1e-5, 1.0, torch.device("cpu")
    )
    w0, b0 = probe.init_linear(SEEDS[1], D, C)
    for head in (1, 3):  # seed index 1 at both LRs
        torch.testing.assert_close(grid.weight[head].detach(), w0, atol=0, rtol=0)
        torch.testing.assert_close(grid.bias[head].detach(), b0, atol=0, rtol=0)
    assert not torch.equal(grid.weight[0], grid.weight[1])


def test_grid_curves_and_selection_match_reference_heads():
    x, y = _data(0)
    vx, vy = _data(1, n=80)
    tx, ty = _data(2, n=80)
    result = probe.train_linear_grid(
        x, y, vx, vy, tx, ty, lrs=LRS, seeds=SEEDS, num_classes=C, metric="accuracy",
        epochs=EPOCHS, batch_size=BATCH, warmup_iters=5, device="cpu",
    )  # fmt: skip
    for lr in LRS:
        for j, seed in enumerate(SEEDS):
            _, _, curve = _reference_head(
                torch.as_tensor(x), torch.as_tensor(y), seed, lr, multilabel=False, warmup=5,
                schedule="constant", val=(vx, vy),  # the grid's default, the seed's schedule
            )  # fmt: skip
            np.testing.assert_allclose(result.curves[lr][j], curve)
            assert result.per_lr[lr]["best_epochs"][j] == int(np.argmax(curve)) + 1
    means = [np.mean(result.per_lr[lr]["val_per_seed"]) for lr in LRS]
    assert result.best_lr == LRS[int(np.argmax(means))]
    best = result.per_lr[result.best_lr]
    assert result.test_mean == pytest.approx(np.mean(best["test_per_seed"]))
    assert result.test_std == pytest.approx(np.std(best["test_per_seed"], ddof=1))
    assert result.settings["total_steps"] == 4 * EPOCHS and result.settings["warmup_steps"] == 5  # 150 // 32
    assert result.train_seconds > 0 and result.inference_seconds_per_sample > 0
    assert len(result.rows()) == len(LRS) * len(SEEDS)


def test_select_best_on_constructed_curves():
    # 2 LRs × 2 seeds, 4 epochs; heads are LR-major.
    curves = np.array(
        [
            [0.5, 0.7, 0.7, 0.6],  # lr0 seed0: best 0.7, first at epoch index 1
            [0.6, 0.6, 0.5, 0.4],  # lr0 seed1: best 0.6 at 0 (tie with 1 goes to the first)
            [0.4, 0.5, 0.6, 0.8],  # lr1 seed0: best 0.8 at 3
            [0.3, 0.6, 0.55, 0.5],  # lr1 seed1: best 0.6 at 1
        ]
    )
    best_epoch, best_lr = training.select_best(curves, [1e-3, 1e-4], 2)
    np.testing.assert_array_equal(best_epoch, [1, 0, 3, 1])
    assert best_lr == 1  # mean 0.70 beats 0.65
    _, tie = training.select_best(np.array([[0.5], [0.7], [0.7], [0.5]]), [1e-3, 1e-4], 2)
    assert tie == 0  # equal means: the first LR


def test_test_metric_is_taken_at_the_best_val_epoch():
    x, y = _data(0)
    vx, vy = _data(1, n=80)
    result = probe.train_linear_grid(
        x, y, vx, vy, vx, vy, lrs=[1e-2], seeds=1, num_classes=C, metric="accuracy",
        epochs=EPOCHS, batch_size=BATCH, device="cpu",
    )  # fmt: skip
    # Test = val here, so the reported test value must be the best val value, not the last epoch's.
    r = result.per_lr[1e-2]
    assert r["test_per_seed"] == r["val_per_seed"] == [max(result.curves[1e-2][0])]
    assert r["test_std"] == 0.0


def test_multilabel_grid_runs_with_nan_labels():
    x, y = _data(0, multilabel=True)
    vx, vy = _data(1, n=80, multilabel=True)
    result = probe.train_linear_grid(
        x, y, vx, vy, vx, vy, lrs=[1e-2], seeds=[0, 1], num_classes=C, metric="mean_auc",
        multilabel=True, epochs=3, batch_size=BATCH, device="cpu",
    )  # fmt: skip
    assert 0.5 < result.test_mean <= 1.0
    assert result.per_lr[1e-2]["test_metrics"][0]["skipped"] == []
    assert np.isfinite(result.curves[1e-2]).all()


def test_probe_matches_sklearn_on_easy_problem():
    x, y = make_classification(
        n_samples=2000, n_features=20, n_informative=8, n_classes=4, class_sep=2.5, random_state=2
    )
    x = x.astype(np.float32)
    tr, va, te = slice(0, 1200), slice(1200, 1500), slice(1500, 2000)
    result = probe.train_linear_grid(
        x[tr], y[tr], x[va], y[va], x[te], y[te], lrs=[1e-2, 3e-2], seeds=2, num_classes=4,
        metric="accuracy", epochs=20, batch_size=64, warmup_epochs=1, device="cpu",
    )  # fmt: skip
    ref = fit_sklearn_reference(x[tr], y[tr], x[va], y[va], x[te], y[te], Cs=(0.1, 1.0, 10.0))
    assert ref["value"] > 0.9
    assert abs(result.test_mean - ref["value"]) <= 0.02


def test_lr_multiplier_warmup_then_cosine():
    values = [training.lr_multiplier(s, 10, 4, "cosine") for s in range(10)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(values[4:]))
    assert values[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert training.lr_multiplier(7, 10, 2, "constant") == 1.5  # the seed's plateau: (W + 1) / W


# (id, the labels' shift, train_linear_grid's keyword arguments, the error's words)
BAD_GRID_SETTINGS = [
    ("two-warmups", 0, {"warmup_epochs": 1, "warmup_iters": 5}, "not both"),
    ("warmup-longer-than-training", 0, {"warmup_iters": 1000}, "warmup"),
    ("labels-out-of-range", C, {}, "labels must lie"),
    ("repeated-lr", 0, {"lrs": [1e-3, 1e-3]}, "must not repeat"),
    ("unknown-schedule", 0, {"schedule": "step"}, "unknown LR schedule"),
]


@pytest.mark.parametrize(("shift", "extra", "words"), [c[1:] for c in BAD_GRID_SETTINGS],
                         ids=[c[0] for c in BAD_GRID_SETTINGS])  # fmt: skip
def test_bad_settings_are_errors(shift, extra, words):
    x, y = _data(0)
    kwargs = {"num_classes": C, "metric": "accuracy", "epochs": 1, "device": "cpu", "lrs": [1e-3], "seeds": 1, **extra}
    with pytest.raises(FmcacheError, match=words):
        probe.train_linear_grid(x, y + shift, x, y, x, y, **kwargs)


def test_sklearn_reference_is_single_label_only():
    x, y = _data(0)
    with pytest.raises(FmcacheError, match="single-label only"):
        fit_sklearn_reference(x, np.zeros((N, 2)), x, y, x, y)


def test_probe_result_is_written_and_plotted(tmp_path):
    import json

    from fmcache import plots, results

    x, y = _data(0)
    vx, vy = _data(1, n=80)
    result = probe.train_linear_grid(
        x, y, vx, vy, vx, vy, lrs=LRS, seeds=SEEDS, num_classes=C, metric="qwk",
        epochs=2, batch_size=BATCH, device="cpu",
    )  # fmt: skip
    doc = json.loads(json.dumps(results.to_jsonable({"probe": result})))
    csv_text = results.csv_bytes(result.rows()).decode()
    assert doc["probe"]["best_lr"] == result.best_lr
    assert set(doc["probe"]["per_lr"]) == {str(lr) for lr in LRS}
    assert len(csv_text.splitlines()) == 1 + len(LRS) * len(SEEDS)
    png = plots.plot_probe_curves(tmp_path / "curves.png", result.curves, metric="qwk")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_device_choice():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(FmcacheError, match="unknown device"):
        pick_device("tpu9")
