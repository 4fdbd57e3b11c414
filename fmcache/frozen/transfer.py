"""``fmcache transfer``: the heads a frozen result selected, applied with no refit to another cache (external validation).

What is applied is what the source result kept (its ``heads`` record, :mod:`fmcache.frozen.headfiles`): the linear
heads of every seed at the best LR (z-scored with the source's train statistics when it standardised), the token
heads (DeiT, attentive) likewise, or k-NN's bank (the source cache's train split at the result's layer and pool, the
k chosen on val and T). The headline layer is the result's last one (its summary's). Every split the target cache
holds is scored (an external set's cache is test only); scores per seed, as the source's predictions.

Refused, each in one line before anything is computed:

- a target cache of another model, weights, input transform (size, normalisation, resize, crop, interpolation), or
  without the result's layer or pool (or token layer);
- a label map that does not fit both caches' classes (:mod:`fmcache.frozen.label_map`), or none where the registry
  ships none;
- target samples found among the source's train/val samples (:mod:`fmcache.frozen.overlap`), unless
  ``--drop-overlap`` drops them.

The result is its own folder in the results tree, ``<out>/<target dataset>/<model>/<target key12>/transfer-<hash>``,
named by the source result (its cache key, protocol and settings hash), the map and the overlap options; its
``result.json`` names source and target, the map's kept and dropped classes and samples, and the overlap found.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmcache import metrics
from fmcache.cache.reader import CacheReader
from fmcache.choices import DEIT_DEPTH, PAPER_TOKENS
from fmcache.dist import pick_device
from fmcache.errors import FmcacheError
from fmcache.frozen.common import protocol_dir, resolve_metric, result_source
from fmcache.frozen.features import FeatureSource, standardize
from fmcache.frozen.headfiles import BANK, LINEAR, TOKEN, layer_prefix, load_tensors
from fmcache.frozen.heads import build_head
from fmcache.frozen.knn import knn_predict
from fmcache.frozen.label_map import CheckedMap, DatasetFacts, check_map, choose_map
from fmcache.frozen.linear import eval_probs
from fmcache.frozen.overlap import exact_overlap, id_overlap, near_duplicates
from fmcache.frozen.specs import TransferSpec
from fmcache.frozen.token_layers import TokenNorm, layer_spec
from fmcache.frozen.tokens import TokenSplit, head_probs, should_preload
from fmcache.headgrid import mean_std
from fmcache.labels import UNCERTAINTY
from fmcache.results import (
    RESULT_JSON,
    SUBSETS,
    ResultSource,
    check_heads,
    incomplete,
    seed_summary,
    train_subset,
    write_result,
)

PROTOCOL = "transfer"
IMAGE_ID = "image_id"


# -- the source result ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A source result: its folder, its ``result.json`` and what its ``heads`` record says applying it needs."""

    folder: Path
    document: dict
    apply: dict
    heads_file: Path | None

    @property
    def layer(self) -> int | str:
        """The headline layer (the result's last, its summary's): a block number, or ``paper`` tokens."""
        layer = self.apply["layers"][-1]
        return layer if layer == PAPER_TOKENS else int(layer)

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.apply["seeds"]]

    def test_metric(self) -> tuple[float | None, float | None]:
        """The source's own test metric (mean, std over seeds) at the headline layer."""
        summary = self.document["summary"]
        if self.apply["kind"] == BANK:  # k-NN: the best k's test value, one run
            return summary["best"].get("test"), 0.0
        return summary.get("test_mean"), summary.get("test_std")

    def rows(self, split: str) -> np.ndarray | None:
        """A label-efficiency source's rows of ``split`` (train, or val when it followed); None: the whole split."""
        if train_subset(self.document) is None:
            return None
        with np.load(self.folder / SUBSETS) as npz:  # checked against its sha256 when the result was read
            name = f"{split}_rows"
            return np.asarray(npz[name]) if name in npz.files else None


def load_source(folder: Path) -> Source:
    """The result at ``folder``, held to the results contract, with its heads file checked against its sha256."""
    folder = Path(folder)
    why = incomplete(folder)
    if why is not None:
        raise FmcacheError(f"RESULT {folder} is not a complete result: {why}")
    document = {**json.loads((folder / RESULT_JSON).read_text()), "folder": str(folder)}
    heads_file = check_heads(document)
    apply = dict(document["heads"].get("apply") or {})
    if apply.get("kind") not in (BANK, LINEAR, TOKEN):
        raise FmcacheError(f"result {folder} kept no heads to apply ({document['heads']['what']})")
    return Source(folder, document, apply, heads_file)


# -- the caches ------------------------------------------------------------------------------------------------------

# transform entries and how a user makes them equal
_TRANSFORM_WORDS = {
    "mean": ("normalisation mean", "the same --norm"),
    "std": ("normalisation std", "the same --norm"),
    "resize": ("resize", "the same --img-size and --resize"),
    "crop": ("center crop", "the same --img-size"),
    "interpolation": ("interpolation", "the same --interpolation"),
    "gray": ("grayscale handling", "the same --gray"),
}


def check_same_inputs(source: CacheReader, target: CacheReader, log: Callable[[str], None]) -> None:
    """Refuse, in one line naming the difference, a target cache whose features are not the source's kind."""
    a, b = source.manifest.get("inputs", {}), target.manifest.get("inputs", {})
    model_a, model_b = a.get("model", {}), b.get("model", {})
    checks = [
        ("model", source.model, target.model, "the source's model"),
        ("weights", model_a.get("weights"), model_b.get("weights"), "the same weights (--weights / --random-init)"),
        ("architecture options", model_a.get("arch_overrides"), model_b.get("arch_overrides"), "the same model"),
        ("model build", model_a.get("build"), model_b.get("build"), "the same fmcache version"),
        ("input size", a.get("img_size"), b.get("img_size"), "the same --img-size"),
    ]
    transform_a, transform_b = clean_transform(a), clean_transform(b)
    for key in sorted(set(transform_a) | set(transform_b)):
        what, fix = _TRANSFORM_WORDS.get(key, (f"transform {key}", "the same transform options"))
        checks.append((what, transform_a.get(key), transform_b.get(key), fix))
    for what, there, here, fix in checks:
        if there != here:
            raise FmcacheError(
                f"target cache {target.path} differs from the source's cache in its {what}: {_short(here)} here, "
                f"{_short(there)} in {source.path}; heads apply only to the features they were trained on: extract "
                f"the target with {fix}"
            )
    for what, key in (("stored dtype", "dtype"), ("forward precision", "precision")):
        if a.get(key) != b.get(key):
            log(
                f"note: the target cache's {what} ({b.get(key) or 'auto'}) differs from the source's "
                f"({a.get(key) or 'auto'}); features differ at that precision"
            )


def clean_transform(inputs: dict) -> dict:
    """A cache's eval transform less what may differ between a source and its target: where the statistics came
    from (the numbers are compared) and a corruption (a corrupted test cache is what clean heads are scored on)."""
    transform = {k: v for k, v in (inputs.get("transform") or {}).items() if k not in ("norm_source", "corrupt")}
    transform["steps"] = [step for step in transform.get("steps", []) if step != "corrupt"]
    return transform


def corruption_of(reader: CacheReader) -> dict | None:
    """The corruption a cache's images went through (``extract --corrupt``), or None for clean images."""
    return (reader.manifest.get("inputs", {}).get("transform") or {}).get("corrupt")


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_layer(source: Source, source_reader: CacheReader, target: CacheReader) -> None:
    """The result's layer (and pool, or token layer) exists in the target as it did in the source."""
    layer, apply = source.layer, source.apply
    if apply["kind"] == TOKEN:
        head = str(apply["head"])
        target.tokens("test" if "test" in target.splits() else target.splits()[0], layer)  # cached? one line if not
        spec = layer_spec(target, layer, apply["token_norm"], head)
        want = (int(apply["in_dim"][str(layer)]), int(apply["tokens"][str(layer)]))
        if (spec.dim, spec.num_tokens) != want:
            raise FmcacheError(
                f"the target cache's layer {layer} tokens are {spec.num_tokens} × {spec.dim}, the heads' "
                f"{want[1]} × {want[0]}; extract the target as the source"
            )
        return
    target.resolve_layer(layer)
    for kind in apply["pool"]:
        if kind not in target.pools:
            raise FmcacheError(f"target cache {target.path} has no '{kind}' pooled features (the result's pool)")
    if target.layer_dims != source_reader.layer_dims:
        raise FmcacheError(f"target cache {target.path} has other layer widths than the source's; extract it again")


def _target_reader(spec: TransferSpec, source: Source) -> CacheReader:
    """The target cache under its label policy: ``--uncertain``, else the source result's where both have one."""
    target = CacheReader(spec.cache)
    policy = spec.uncertain
    if policy is None and target.annotation_facts.get("label_policy") == UNCERTAINTY:
        policy = (source.document.get("settings") or {}).get("uncertain")
    return target if policy is None else CacheReader(spec.cache, uncertain=policy)


def _source_reader(spec: TransferSpec, source: Source) -> CacheReader:
    """The cache the result was computed from (its recorded path, or ``--source-cache``), checked by its key."""
    path = spec.source_cache or Path(str((source.document.get("details") or {}).get("cache", "")))
    if not str(path) or not Path(path).is_dir():
        raise FmcacheError(
            f"the source result's cache {path or '(not recorded)'} is not here; pass --source-cache with that cache"
        )
    reader = CacheReader(path, uncertain=(source.document.get("settings") or {}).get("uncertain"))
    if reader.key != source.document.get("cache_key"):
        raise FmcacheError(
            f"--source-cache {path} is not the cache result {source.folder} was computed from (key "
            f"{reader.key[:12]}, the result's {str(source.document.get('cache_key'))[:12]}); pass that cache"
        )
    return reader


# -- overlap ---------------------------------------------------------------------------------------------------------


def _fingerprints(reader: CacheReader, parts: list[tuple[str, np.ndarray | None]]) -> dict[str, np.ndarray]:
    """The content fingerprints (``content_sha256``, ``content_dhash``) of ``parts`` (split, rows or None), in order;
    a cache extracted before they were stored is one line naming the fix."""
    found: dict[str, list[np.ndarray]] = {}
    for split, rows in parts:
        arrays = reader.fingerprints(split)
        if arrays is None:
            raise FmcacheError(
                f"cache {reader.path} holds no content fingerprints (content_sha256, content_dhash) for the leakage "
                "check; rerun its `fmcache extract` command (on a complete cache it only adds them)"
            )
        for name, values in arrays.items():
            found.setdefault(name, []).append(values if rows is None else values[rows])
    return {name: np.concatenate(values) for name, values in found.items()}


def find_overlap(
    source: Source,
    source_reader: CacheReader,
    target: CacheReader,
    splits: list[str],
    facts: DatasetFacts,
    max_bits: int,
    log: Callable[[str], None],
) -> tuple[dict[str, np.ndarray], dict]:
    """Per target split, which samples the source trained or selected on (its train and val rows), and the facts:
    counts by how they were found (ids, then exact pixels, then near duplicates among the rest) and what was not
    compared."""
    used = [("train", source.rows("train")), ("val", source.rows("val"))]
    everything = [(split, None) for split in splits]
    theirs, ours = _fingerprints(source_reader, used), _fingerprints(target, everything)

    def ids(reader: CacheReader, parts: list[tuple[str, np.ndarray | None]]) -> np.ndarray:
        columns = [reader.metadata(split)[IMAGE_ID] for split, _ in parts]
        return np.concatenate([c if rows is None else c[rows] for c, (_, rows) in zip(columns, parts, strict=True)])

    sizes = [len(target.ids(split)) for split in splits]
    namespace = facts.namespace(source_reader.dataset)
    notes = []
    by_id = np.zeros(sum(sizes), bool)
    if namespace != facts.namespace(target.dataset):
        notes.append(
            f"ids not compared: {source_reader.dataset} and {target.dataset} name images in different namespaces"
        )
    elif not all(IMAGE_ID in r.metadata(s) for r, s in ((source_reader, "train"), (target, splits[0]))):
        notes.append(f"ids not compared: a cache has no {IMAGE_ID} metadata (extracted before 0.4, or none released)")
    else:
        by_id = id_overlap(ids(source_reader, used), ids(target, everything))
    exact = exact_overlap(theirs["content_sha256"], ours["content_sha256"])
    near = near_duplicates(theirs["content_dhash"], ours["content_dhash"], max_bits)
    exact &= ~by_id
    near &= ~(by_id | exact)
    found = by_id | exact | near
    for note in notes:
        log(f"note: {note}")
    bounds = np.cumsum([0, *sizes])
    masks = {split: found[lo:hi] for split, lo, hi in zip(splits, bounds[:-1], bounds[1:], strict=True)}
    counts = {"ids": int(by_id.sum()), "exact_pixels": int(exact.sum()), "near_duplicates": int(near.sum())}
    facts_out = {
        "compared": "the source's train and val samples with every target sample",
        "namespace": namespace if namespace == facts.namespace(target.dataset) else None,
        "near_duplicate_bits": max_bits,
        "found": {**counts, "total": int(found.sum())},
        "per_split": {split: int(mask.sum()) for split, mask in masks.items()},
        "notes": notes,
    }
    return masks, facts_out


def _overlap_words(counts: dict, max_bits: int) -> str:
    parts = [
        f"{counts['ids']} by image id",
        f"{counts['exact_pixels']} with identical pixels",
        f"{counts['near_duplicates']} near duplicates within {max_bits} bits",
    ]
    return ", ".join(parts)


# -- scoring ----------------------------------------------------------------------------------------------------------


def _linear_probs(source: Source, target: CacheReader, split: str, device: torch.device) -> np.ndarray:
    """(S, n, C) probabilities of every seed's linear head, computed as the grid scored its val and test splits."""
    layer, seeds = int(source.layer), source.seeds
    x = FeatureSource(target, [layer], list(source.apply["pool"])).get(split, layer)
    if source.apply.get("standardize"):
        shared = load_tensors(source.heads_file, layer_prefix(layer))
        x = standardize(x, shared["mean"].numpy(), shared["std"].numpy())
    states = [load_tensors(source.heads_file, layer_prefix(layer, seed)) for seed in seeds]
    weight = torch.stack([s["weight"] for s in states]).to(device)
    bias = torch.stack([s["bias"] for s in states]).to(device)
    features = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    return eval_probs(features, weight, bias, bool(target.multilabel))


def _token_probs(source: Source, target: CacheReader, split: str, n_classes: int, device: torch.device) -> np.ndarray:
    """(S, n, C) probabilities of every seed's token head, one head in memory at a time."""
    layer, apply = source.layer, source.apply
    head, key = str(apply["head"]), str(source.layer)
    spec = layer_spec(target, layer, apply["token_norm"], head)
    tokens = TokenSplit(target, split, layer, should_preload(target, layer, "auto"), workers=0)
    norm = TokenNorm(spec, device)
    grid = apply["grid"].get(key)
    out = []
    for seed in source.seeds:
        with torch.random.fork_rng(devices=[]):  # its init is overwritten; the global RNG stays as it was
            depth = apply.get("depth") or DEIT_DEPTH
            module = build_head(head, spec.dim, n_classes, depth, None if grid is None else tuple(grid))
        module.load_state_dict(load_tensors(source.heads_file, layer_prefix(layer, seed)))
        out.append(head_probs({0: module.to(device)}, tokens, norm, device, bool(target.multilabel))[0])
        del module
    return np.stack(out)


class _Bank:
    """k-NN's bank, built once from the source cache: its train split's features at the result's layer and pool."""

    def __init__(self, source: Source, reader: CacheReader):
        layer, rows = int(source.layer), source.rows("train")
        self.x = FeatureSource(reader, [layer], list(source.apply["pool"])).get("train", layer)
        self.y = reader.labels("train")
        if rows is not None:
            self.x, self.y = self.x[rows], self.y[rows]

    def probs(
        self, source: Source, target: CacheReader, split: str, n_classes: int, use_gpu: bool | None
    ) -> np.ndarray:
        """(1, n, C) vote shares at the result's k, from a search at the largest k it searched (as its run did)."""
        layer = int(source.layer)
        query = FeatureSource(target, [layer], list(source.apply["pool"])).get(split, layer)
        ks = [int(k) for k in source.apply["ks"]]
        scores = knn_predict(
            self.x,
            self.y,
            query,
            ks,
            temperature=float(source.apply["temperature"]),
            num_classes=n_classes,
            multilabel=bool(target.multilabel),
            use_gpu=use_gpu,
        )
        return scores[int(source.apply["k"])][None]


# -- the runner -------------------------------------------------------------------------------------------------------


def run_transfer(
    spec: TransferSpec, progress: bool = False, log: Callable[[str], None] = print, datasets: DatasetFacts | None = None
) -> dict:
    """Apply the source result's heads to the target cache (see the module doc); ``datasets`` is what the dataset
    registry knows (shipped maps, id namespaces; :mod:`fmcache.runners` passes it)."""
    start = time.perf_counter()
    facts = datasets or DatasetFacts()
    source = load_source(spec.result)
    source_reader = _source_reader(spec, source)
    target = _target_reader(spec, source)
    check_same_inputs(source_reader, target, log)
    _check_layer(source, source_reader, target)
    if source_reader.multilabel != target.multilabel:
        kinds = {True: "multi-label", False: "single-label"}
        raise FmcacheError(
            f"the source's labels are {kinds[source_reader.multilabel]}, the target's {kinds[target.multilabel]}; "
            "a head scores one kind"
        )
    chosen = choose_map(spec.label_map, source_reader.dataset, target.dataset, source_reader.class_names, facts)
    mapped = check_map(
        chosen,
        source_reader.dataset,
        target.dataset,
        source_reader.class_names,
        target.class_names,
        target.multilabel,
        log,
    )
    metric = resolve_metric(target, spec.metric)
    splits = target.splits()
    if "test" not in splits:
        raise FmcacheError(f"target cache {target.path} has no test split; transfer reports the target's test metric")
    overlap, overlap_facts = find_overlap(source, source_reader, target, splits, facts, spec.near_duplicate_bits, log)
    keep, labels, class_drops = _evaluated(spec, mapped, target, splits, overlap, overlap_facts, log)
    scored = [s for s in splits if keep[s].any()]
    for split in sorted(set(splits) - set(scored)):  # e.g. the source's own train split: all of it overlaps
        log(f"target {split} split: every sample dropped, not scored")

    device = pick_device(spec.device)
    bank = _Bank(source, source_reader) if source.apply["kind"] == BANK else None
    scores, per_split, rows, forward_seconds, forward_samples = {}, {}, [], 0.0, 0
    for split in scored:
        t0 = time.perf_counter()
        probs = _probs(source, source_reader, target, split, spec, device, bank)
        forward_seconds += time.perf_counter() - t0
        forward_samples += probs.shape[0] * probs.shape[1]
        scores[split] = mapped.scores(probs[:, keep[split]])
        names = mapped.kept if target.multilabel else None
        per_seed = [metrics.evaluate(metric, labels[split], s, target.multilabel, names) for s in scores[split]]
        per_split[split] = {"n": int(keep[split].sum()), "metrics": per_seed}
        empty = mapped.no_mass(probs[:, keep[split]])
        if empty:
            per_split[split]["no_mapped_mass"] = empty
            log(
                f"warning: {split}: {empty} (seed, sample) score rows put no probability on the mapped source "
                "classes; they are scored uniform over the target classes"
            )
        rows += [
            {
                "split": split,
                "seed": seed,
                "n": per_split[split]["n"],
                "metric": metric,
                "value": m["value"],
                "accuracy": m["accuracy"],
            }
            for seed, m in zip(source.seeds, per_seed, strict=True)
        ]

    values = {s: [m["value"] for m in per_split[s]["metrics"]] for s in scored}
    best_lr = (source.apply.get("best_lr") or {}).get(str(source.layer))
    source_mean, source_std = source.test_metric()
    summary = {
        **seed_summary(best_lr, values.get("val", []), values["test"], len(source.seeds)),
        "source_test_mean": source_mean,
        "source_test_std": source_std,
        "source_metric": source.document.get("metric"),
    }
    settings = {
        "source": {
            "cache_key": source.document["cache_key"],
            "protocol": source.document["protocol"],
            "settings_hash": source.document["settings_hash"],
        },
        "label_map": mapped.label_map.document(),
        "drop_overlap": spec.drop_overlap,
        "near_duplicate_bits": spec.near_duplicate_bits,
        "metric": metric,
        **({"uncertain": target.label_policy["uncertain"]} if target.label_policy else {}),
    }
    out = spec.out if spec.out is not None else results_root(source.folder)
    folder = protocol_dir(target, out, PROTOCOL, settings)
    result = _restricted(result_source(target, tuple(scored)), keep, labels)
    timings = result.timings(None, forward_seconds / max(1, forward_samples))
    timings["total_seconds"] = time.perf_counter() - start
    extra = {
        **result.facts(),
        "source": _source_facts(source, source_reader),
        "target": {
            "dataset": target.dataset,
            "cache": str(target.path),
            "cache_key": target.key,
            "splits": {s: len(keep[s]) for s in splits},
            "evaluated": {s: int(keep[s].sum()) for s in scored},
            "classes": target.class_names,
            "corruption": corruption_of(target),
        },
        "label_map": {**mapped.facts(), "dropped_samples": class_drops},
        "overlap": overlap_facts,
    }
    write_result(
        folder,
        protocol=PROTOCOL,
        settings=settings,
        metric=metric,
        timings=timings,
        summary=summary,
        details={"splits": per_split, "device": str(device)},
        rows=rows,
        predictions=result.predictions(scores, source.seeds),
        extra=extra,
        **result.identity(),
    )
    return {
        "folder": folder,
        "metric": metric,
        "summary": summary,
        "target": extra["target"],
        "splits": {s: {"n": per_split[s]["n"], "values": values[s], **_mean_std(values[s])} for s in scored},
        "source": extra["source"],
        "label_map": extra["label_map"],
        "overlap": overlap_facts,
    }


def _evaluated(
    spec: TransferSpec,
    mapped: CheckedMap,
    target: CacheReader,
    splits: list[str],
    overlap: dict[str, np.ndarray],
    overlap_facts: dict,
    log: Callable[[str], None],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
    """Per split: which target samples are scored (their class is mapped and they are no overlap), their labels in
    the kept classes, and how many the map dropped. Overlapping samples the map keeps are refused, or dropped with
    ``--drop-overlap`` (one the map drops anyway is no leak); what was done is said and recorded."""
    keep, labels, class_drops, leaking = {}, {}, {}, 0
    for split in splits:
        y, by_class = mapped.labels(target.labels(split))
        class_drops[split] = int((~by_class).sum())
        keep[split] = by_class & ~overlap[split]
        labels[split] = y[~overlap[split][by_class]]
        leaking += int((by_class & overlap[split]).sum())
    how = _overlap_words(overlap_facts["found"], spec.near_duplicate_bits)
    if leaking and not spec.drop_overlap:
        raise FmcacheError(
            f"{leaking} target samples are among the source's train/val samples ({how}): scoring them measures "
            "memory, not transfer; pass --drop-overlap to drop them"
        )
    overlap_facts["dropped"] = leaking
    log(
        f"dropped {leaking} target samples found among the source's train/val samples ({how})"
        if leaking
        else f"overlap with the source's train/val samples: none ({how})"
    )
    if not keep["test"].any():
        raise FmcacheError("no target test sample is left after the label map and the overlap; nothing to score")
    _log_map(mapped, class_drops, log)
    return keep, labels, class_drops


def _probs(
    source: Source,
    source_reader: CacheReader,
    target: CacheReader,
    split: str,
    spec: TransferSpec,
    device: torch.device,
    bank: _Bank | None,
) -> np.ndarray:
    """(S, n, C) source-class scores of every sample of ``split``: the bank's votes, or each seed's head."""
    n_classes = len(source_reader.class_names)
    if bank is not None:
        return bank.probs(source, target, split, n_classes, spec.use_gpu)
    if source.apply["kind"] == LINEAR:
        return _linear_probs(source, target, split, device)
    return _token_probs(source, target, split, n_classes, device)


def results_root(folder: Path) -> Path:
    """The results tree a result folder sits in (``<root>/<dataset>/<model>/<key12>/<protocol>-<hash>``)."""
    if len(folder.resolve().parents) < 5:
        raise FmcacheError(f"result {folder} is not inside a results tree; pass --out to say where to write")
    return folder.resolve().parents[3]


def _mean_std(values: list[float]) -> dict[str, float]:
    mean, std = mean_std(values)  # the grid's own (sample std, 0 for one seed), so the numbers compare
    return {"mean": mean, "std": std}


def _log_map(mapped: CheckedMap, class_drops: dict[str, int], log: Callable[[str], None]) -> None:
    """What the map keeps and drops, in words (the CLI prints these lines)."""
    log(f"label map ({mapped.label_map.origin}): {len(mapped.kept)} target classes kept: {', '.join(mapped.kept)}")
    if mapped.dropped:
        what = "label columns" if mapped.multilabel else "classes"
        samples = "" if mapped.multilabel else f", {sum(class_drops.values())} samples dropped"
        log(f"target {what} mapped to no source class: {', '.join(mapped.dropped)}{samples}")
    if mapped.unused:
        log(f"source classes mapped to nothing: {', '.join(mapped.unused)} ({len(mapped.unused)})")


def _restricted(source: ResultSource, keep: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> ResultSource:
    """The target's result source cut to the evaluated samples, with their labels in the kept classes."""
    return dataclasses.replace(
        source,
        ids={s: np.asarray(v)[keep[s]] for s, v in source.ids.items()},
        labels=dict(labels),
        groups={s: np.asarray(v)[keep[s]] for s, v in source.groups.items()},
        meta={s: {k: np.asarray(c)[keep[s]] for k, c in cols.items()} for s, cols in source.meta.items()},
    )


def _source_facts(source: Source, reader: CacheReader) -> dict:
    mean, std = source.test_metric()
    return {
        "folder": str(source.folder),
        "dataset": source.document["dataset"],
        "protocol": source.document["protocol"],
        "model": source.document["model"],
        "cache": str(reader.path),
        "cache_key": source.document["cache_key"],
        "settings_hash": source.document["settings_hash"],
        "metric": source.document.get("metric"),
        "test_mean": mean,
        "test_std": std,
        "layer": source.layer,
        "heads": source.document["heads"]["what"],
        "train_subset": train_subset(source.document),
    }
