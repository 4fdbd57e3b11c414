"""Result files of stage-two commands, and the layout that lets ``fmcache report`` and ``fmcache grid`` gather them.

Contract (``fmcache report``/``fmcache grid`` read exactly this):

* Every evaluation writes into its own folder
  ``<root>/<dataset>/<model>/<key12>/<protocol>-<settings_hash12>/`` (:func:`result_folder`), where ``<model>`` is the
  model name with ``:`` and ``/`` replaced by ``_``, ``<key12>`` the first 12 characters of the cache key (for
  fine-tuning, which reads no cache: the fine-tune run key), ``<protocol>`` one of :data:`fmcache.protocols.NAMES` and
  ``<settings_hash12>`` the first 12 hex digits of :func:`settings_hash`: sha256 of the canonical JSON (sorted keys,
  no spaces) of every setting that changes the numbers (never plots, progress or device). Two-cache CKA uses cache
  A's path and records cache B's key in its settings (``cache_b_key``).
* Inside the folder: ``result.json`` (written LAST, atomically: a folder with it is complete, one without it is
  not and is rerun by the grid), ``result.csv`` (the protocol's rows), ``predictions.npz`` (probe, finetune, knn)
  and PNG plots.
* ``result.json`` has at least these top-level keys: ``protocol``, ``settings``, ``settings_hash`` (full 64 hex),
  ``dataset``, ``model``, ``cache_key`` (full, or null for finetune), ``weights`` (the manifest's weights dict, with
  ``differs_from_paper`` when present), ``metric``, ``status`` (``"complete"``), ``fmcache_version``,
  ``written_at``, ``timings`` (``train_seconds``, ``inference_seconds_per_sample``, and
  ``extract_seconds_per_image`` when the cache recorded it) and ``summary``:

  - probe_* / finetune_*: ``{"best_lr", "val_mean", "val_std", "test_mean", "test_std", "n_seeds",
    "seeds_requested"}``, plus ``"per_layer": {layer: {...same keys...}}`` when several layers were probed
    (then the top-level values are those of the last layer);
  - knn: ``{"rows": [{"layer", "split", "k", "temperature", "value"}], "best": {"k", "layer", "test"}}``;
  - cka: ``{"layers_a", "layers_b", "matrix"}`` (matrix as a list of lists).

  The protocol's full payload is kept under ``details``.
* ``predictions.npz``: ``val_ids``, ``val_labels``, ``val_scores``, ``test_ids``, ``test_labels``, ``test_scores``
  and ``seeds``. ``*_scores`` are float32 shaped (n_seeds, n, C): for probes and fine-tuning the best LR's heads,
  one row per seed (in ``seeds`` order); for k-NN one row (seed -1), the best k on the last layer. Labels are
  int (n,) for single-label data and (n, C) 0/1 with NaN = unknown for multi-label data. CKA has no predictions.
  Since 0.4 also, per split, ``{split}_groups`` (each sample's independent unit, ``patient:00012``, or
  ``image:<id>`` where none is known) and ``{split}_meta__<column>`` (per-sample metadata: text, or float with NaN),
  from the cache's annotations; ``result.json`` then names the unit (``group_unit``) and, for a dataset with a label
  policy, ``label_policy`` (``{"uncertain": "ones", "applied": "stage two"}``, or ``"fixed at extraction"`` for an
  older cache).

* ``heads`` (head grids of stage two; k-NN): what ``fmcache transfer`` needs to apply the result elsewhere: ``file``
  (``heads.safetensors`` in the folder, written before ``result.json``; null for k-NN, whose bank is the cache's
  train split), ``bytes``, ``sha256``, ``what`` (in words) and ``apply`` (layers, pool, seeds, best LR, k ...).
* A protocol's row may name further top-level keys its results carry (:attr:`fmcache.protocols.Protocol.records`,
  e.g. ``source`` and ``target`` of a transfer); the contract check holds every result to them.

* Label-efficiency runs (``--train-fraction``/``--train-per-class``) are ordinary results whose ``settings`` hold
  ``train_subset`` (``fraction`` or ``per_class``, ``repeat``, ``sampling``, ``val_follows``), with a top-level
  ``subset`` record, ``subsets.npz`` (the rows) in the folder and its sha256 as ``subsets_sha256``; a result without
  ``train_subset`` used the whole train split. The report keeps them out of the paper's tables (:func:`train_subset`).

:func:`check_result_document` holds a ``result.json`` to this contract: :func:`write_result` before it writes one,
:func:`find_results` (and so the report) and :func:`is_complete` (and so the grid) when they read one. A document that
breaks it is never half-used: the writer refuses it, readers skip it and name the file and the field.

Every file goes to a temporary name in the target folder and is moved into place with ``os.replace``,
so a crash never leaves a half-written result that looks valid.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import fmcache
from fmcache.errors import FmcacheError
from fmcache.files import atomic_write_bytes, ensure_writable_dir
from fmcache.protocols import get_protocol

RESULT_JSON = "result.json"
RESULT_CSV = "result.csv"
PREDICTIONS = "predictions.npz"


def safe_name(name: str) -> str:
    """A model (or dataset) name usable as one path component: ``hf:org/model`` -> ``hf_org_model``."""
    return str(name).replace(":", "_").replace("/", "_")


def settings_hash(settings: Mapping) -> str:
    """sha256 (64 hex) of the canonical JSON of ``settings``: sorted keys, no whitespace, numpy values as JSON.

    Canonical so that the same settings give the same folder in every process, whatever the dict order.
    """
    canonical = json.dumps(to_jsonable(settings), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def result_folder(root: Path, dataset: str, model: str, key: str, protocol: str, settings: Mapping) -> Path:
    """``<root>/<dataset>/<model>/<key12>/<protocol>-<settings_hash12>``: one folder per evaluation and settings.

    ``key`` is the cache key (or the fine-tune run key); only its first 12 characters name the folder. Nothing
    is created here, so the grid can ask where a job would write without writing.
    """
    get_protocol(protocol)  # an unknown name is one line listing the valid ones
    return (
        Path(root)
        / safe_name(dataset)
        / safe_name(model)
        / str(key)[:12]
        / f"{protocol}-{settings_hash(settings)[:12]}"
    )


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a ``result.json`` (written last) that keeps the contract, and its subsets file,
    when it has one, is the one the run wrote; else the grid runs the job again."""
    return incomplete(folder) is None


def incomplete(folder: Path) -> str | None:
    """Why ``folder`` is not a complete result (one line naming the file at fault), or None when it is one."""
    path = Path(folder) / RESULT_JSON
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{path} is missing or unreadable"
    try:
        check_result_document(document, path)
        check_subsets(document, Path(folder))
    except FmcacheError as exc:
        return str(exc)
    return None


class ContractError(FmcacheError):
    """A ``result.json`` that breaks the results contract; ``why`` names the field (the message names the file too)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} breaks the results contract: {why}")
        self.why = why


# the summary each protocol's trait promises (fmcache.protocols.SUMMARIES)
SUMMARY_KEYS = {
    "grid": ("best_lr", "val_mean", "val_std", "test_mean", "test_std"),
    "rows": ("rows", "best"),
    "matrix": ("layers_a", "layers_b", "matrix"),
}
TEXT_KEYS = ("dataset", "model", "metric", "settings_hash")  # non-empty text
OBJECT_KEYS = ("settings", "timings", "summary")  # JSON objects


def check_result_document(document: object, path: Path) -> None:
    """``document`` against the contract in this module's docstring; a break is one :class:`ContractError` line
    naming ``path`` and the missing or bad field."""
    if not isinstance(document, dict):
        raise ContractError(path, f"it holds {type(document).__name__}, not an object")
    if document.get("status") != "complete":
        raise ContractError(path, f"status is {document.get('status')!r}, not 'complete'")
    try:
        protocol = get_protocol(str(document.get("protocol")))
    except FmcacheError as exc:
        raise ContractError(path, f"'protocol': {exc}") from None
    for key in TEXT_KEYS:
        if not isinstance(document.get(key), str) or not document[key]:
            raise ContractError(path, _missing_or_bad(document, key, "text"))
    for key in OBJECT_KEYS:
        if not isinstance(document.get(key), dict):
            raise ContractError(path, _missing_or_bad(document, key, "an object"))
    lacking = [k for k in SUMMARY_KEYS.get(protocol.summary, ()) if k not in document["summary"]]
    if lacking:
        raise ContractError(path, f"its summary lacks '{lacking[0]}' (a {protocol.summary} summary of {protocol.name})")
    if document.get("cache_key") is not None and not isinstance(document["cache_key"], str):
        raise ContractError(path, _missing_or_bad(document, "cache_key", "text or null"))
    heads = document.get("heads")
    if heads is not None and not (isinstance(heads, dict) and isinstance(heads.get("what"), str)):
        raise ContractError(path, "'heads' is not an object saying 'what' it holds")
    for key in protocol.records:
        if not isinstance(document.get(key), dict):
            raise ContractError(
                path, f"{_missing_or_bad(document, key, 'an object')} (every {protocol.name} result has one)"
            )


def _missing_or_bad(document: dict, key: str, kind: str) -> str:
    if key not in document:
        return f"no '{key}'"
    return f"'{key}' is {document[key]!r:.40}, not {kind}"


def check_subsets(document: dict, folder: Path) -> None:
    """A label-efficiency run's ``subsets.npz``: the bytes its ``result.json`` records (``subsets_sha256``; a result
    written before that record: a file that opens, with its train rows). One line naming the file when it is not."""
    if train_subset(document) is None:
        return
    path = Path(folder) / SUBSETS
    if not path.is_file():
        raise FmcacheError(f"{path} is missing; the run's subset rows are gone: rerun that evaluation")
    data = path.read_bytes()
    recorded = document.get("subsets_sha256")
    if recorded and hashlib.sha256(data).hexdigest() != recorded:
        raise FmcacheError(
            f"{path} does not match the sha256 its result.json records (changed or damaged after the run); rerun "
            "that evaluation"
        )
    if not recorded and not _opens_with_rows(data):
        raise FmcacheError(f"{path} does not open as the run's subset rows (damaged); rerun that evaluation")


def _opens_with_rows(data: bytes) -> bool:
    try:
        with np.load(io.BytesIO(data)) as npz:
            return "train_rows" in npz.files and npz["train_rows"].ndim == 1
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # a truncated or foreign file
        return False


def find_results(root: Path, problems: list[tuple[Path, str]] | None = None) -> list[dict]:
    """Every complete ``result.json`` under ``root``, each loaded with ``"folder"`` (its folder, str) added.

    Sorted by folder so reports are stable. A folder without ``result.json`` is a run that crashed or is still going
    (the grid reruns it). A ``result.json`` that does not parse, or is not a complete result, is skipped too, and
    named in ``problems`` (path, why) when a list is given: ``result.json`` is written atomically, so a torn or
    edited one is damage a report must not hide.
    """
    found = []
    for path in sorted(Path(root).rglob(RESULT_JSON)):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            if problems is not None:
                problems.append((path, f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})"))
            continue
        why = _unusable(document, path)
        if why is None:
            found.append({**document, "folder": str(path.parent)})
        elif problems is not None:
            problems.append((path, why))
    return found


def _unusable(document: object, path: Path) -> str | None:
    """Why a parsed ``result.json`` is not a result to read (its own words, without the path), or None."""
    if not isinstance(document, dict) or document.get("status") != "complete":
        return "not a complete result (no status complete)"
    try:
        check_result_document(document, path)
        check_subsets(document, path.parent)
    except ContractError as exc:
        return f"breaks the results contract: {exc.why}"
    except FmcacheError as exc:  # its subsets file, named in the message
        return str(exc)
    return None


def check_predictions(document: Mapping) -> bytes | None:
    """The bytes of a result's ``predictions.npz``, checked against the sha256 its ``result.json`` records (read
    once: the caller parses these bytes, not the file again).

    None when the result has no predictions file; a file that is not the one the run wrote (edited, swapped,
    damaged) is one error line naming it, so it never turns into different confidence intervals.
    """
    path = Path(document["folder"]) / PREDICTIONS
    if not path.is_file():
        return None
    data = path.read_bytes()
    recorded = document.get("predictions_sha256")
    if recorded and hashlib.sha256(data).hexdigest() != recorded:
        raise FmcacheError(
            f"{path} does not match the sha256 its result.json records: it was changed after the run; rerun that "
            "evaluation (or remove its folder)"
        )
    return data


HEADS = "heads.safetensors"


def heads_record(nbytes: int | None, sha256: str | None, what: str, apply: Mapping) -> dict:
    """A result's ``heads`` entry: the file (``heads.safetensors``, or none for a k-NN bank), its size and sha256,
    what it holds in words, and what applying it needs (``apply``)."""
    return {
        "file": HEADS if sha256 is not None else None,
        "bytes": int(nbytes or 0),
        "sha256": sha256,
        "what": what,
        "apply": to_jsonable(dict(apply)),
    }


def check_heads(document: Mapping) -> Path | None:
    """The path of a result's heads file, checked against the sha256 its ``result.json`` records; None when the result
    keeps no file (k-NN). A result without a ``heads`` record, or a file that is gone or changed, is one line."""
    folder = Path(document["folder"])
    heads = document.get("heads")
    if not isinstance(heads, Mapping):
        raise FmcacheError(
            f"result {folder} records no heads (written before fmcache saved them, or its protocol keeps none); "
            "rerun that evaluation to save them"
        )
    if heads.get("file") is None:
        return None
    path = folder / str(heads["file"])
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    except OSError:
        raise FmcacheError(f"{path} is missing or unreadable; rerun that evaluation to save its heads again") from None
    if digest.hexdigest() != heads.get("sha256"):
        raise FmcacheError(
            f"{path} does not match the sha256 its result.json records (changed after the run); rerun it"
        )
    return path


def to_jsonable(obj):
    """``obj`` with numpy values, tuples, paths and dataclasses turned into JSON types.

    Dict keys become strings; NaN and infinities become None (strict JSON has no NaN).
    """
    if isinstance(obj, Mapping):
        return {_key(k): to_jsonable(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj))
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _key(k) -> str:
    if isinstance(k, np.generic):
        k = k.item()
    return k if isinstance(k, str) else json.dumps(k) if isinstance(k, bool) else str(k)


def csv_bytes(rows: Sequence[Mapping]) -> bytes:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(_key(k) for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", lineterminator="\n")
    if columns:
        writer.writeheader()
    for row in rows:
        writer.writerow({_key(k): _csv_cell(v) for k, v in row.items()})
    return buffer.getvalue().encode()


def _csv_cell(value):
    value = to_jsonable(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else value


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of an ``.npz`` (compressed) holding ``arrays``, for :func:`fmcache.files.atomic_write_bytes`.

    Deterministic: the same arrays give the same bytes on every run (numpy's own writer stamps each member with the
    current time), so a rerun of the same evaluation writes the same file and the same recorded sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            member = io.BytesIO()
            np.save(member, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def start_result(folder: Path) -> Path:
    """Create ``folder`` and drop any earlier ``result.json`` in it before a run writes plots or checkpoints there.

    A rerun with the same settings reuses the folder; without this a crash midway would leave the old
    ``result.json`` vouching for a mix of old and new files.
    """
    folder = ensure_writable_dir(Path(folder))
    (folder / RESULT_JSON).unlink(missing_ok=True)
    return folder


def write_result(
    folder: Path,
    *,
    protocol: str,
    settings: Mapping,
    dataset: str,
    model: str,
    cache_key: str | None,
    weights: Mapping | None,
    metric: str | None,
    timings: Mapping,
    summary: Mapping,
    details: Mapping,
    rows: Sequence[Mapping],
    predictions: Mapping[str, np.ndarray] | None = None,
    extra: Mapping | None = None,
) -> Path:
    """Write one evaluation's folder: ``result.csv``, ``predictions.npz`` (if given), then ``result.json`` last.

    ``result.json`` carries the contract's keys (see the module docstring), ``details`` (the protocol's full
    payload) and ``extra`` merged at the top level. Scores are stored as float32 to keep the npz small. Returns the
    JSON's path.
    """
    get_protocol(protocol)  # an unknown name is one line listing the valid ones
    folder = start_result(folder)
    atomic_write_bytes(folder / RESULT_CSV, csv_bytes(rows))
    predictions_sha256 = None
    if predictions is not None:
        arrays = {
            k: np.asarray(v, dtype=np.float32) if k.endswith("_scores") else np.asarray(v)
            for k, v in predictions.items()
        }
        data = npz_bytes(arrays)
        atomic_write_bytes(folder / PREDICTIONS, data)
        predictions_sha256 = hashlib.sha256(data).hexdigest()  # the report refuses a file that differs
    document = {
        **to_jsonable(extra or {}),
        **({"predictions_sha256": predictions_sha256} if predictions_sha256 else {}),
        "protocol": protocol,
        "status": "complete",
        "dataset": dataset,
        "model": model,
        "cache_key": cache_key,
        "weights": to_jsonable(dict(weights or {})),
        "metric": metric,
        "settings": to_jsonable(settings),
        "settings_hash": settings_hash(settings),
        "timings": to_jsonable(timings),
        "summary": to_jsonable(summary),
        "details": to_jsonable(details),
        "fmcache_version": fmcache.__version__,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = folder / RESULT_JSON
    check_result_document(document, path)  # the writer holds itself to the contract its readers check
    atomic_write_bytes(path, (json.dumps(document, indent=2, allow_nan=False) + "\n").encode())
    return path


@dataclass(frozen=True)
class ResultSource:
    """What a result was computed from: the contract's identity keys and the evaluated splits' ids and labels.

    Stage two builds one from its cache (:func:`fmcache.frozen.common.result_source`), fine-tuning from its images;
    the result-writing code below never needs to know which.
    """

    dataset: str
    model: str
    cache_key: str | None
    weights: Mapping = field(default_factory=dict)
    extract_seconds_per_image: float | None = None
    ids: Mapping[str, np.ndarray] = field(default_factory=dict)
    labels: Mapping[str, np.ndarray] = field(default_factory=dict)
    split: Mapping | None = None  # the dataset's split identity (mode, seed, files): a table never mixes two
    img_size: int | None = None  # the input size the foundation saw (Table 3 is the 1024 px one)
    # per sample, for the report's evidence: each sample's independent unit (patient, lesion; "image:<id>" where none
    # is known) and its metadata columns (sex, age, view ...), by split; absent for caches made before 0.4
    groups: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    group_unit: str | None = None
    label_policy: Mapping | None = None  # e.g. {"uncertain": "ones", "applied": "stage two"}

    def identity(self) -> dict:
        """The identity keys of ``result.json``: dataset, model, cache_key, weights."""
        return {
            "dataset": self.dataset,
            "model": self.model,
            "cache_key": self.cache_key,
            "weights": dict(self.weights),
        }

    def facts(self) -> dict:
        """Top-level ``result.json`` keys the report groups by: the split identity, the input size, the bootstrap
        unit and the label policy."""
        facts = {"split": to_jsonable(self.split), "img_size": self.img_size, "group_unit": self.group_unit}
        return facts | ({"label_policy": dict(self.label_policy)} if self.label_policy else {})

    def timings(self, train_seconds: float | None, inference_s_per_sample: float | None) -> dict:
        """The contract's timings: train s, inference s/sample, and extraction s/image when the cache recorded it."""
        timings = {"train_seconds": train_seconds, "inference_seconds_per_sample": inference_s_per_sample}
        if self.extract_seconds_per_image is not None:
            timings["extract_seconds_per_image"] = self.extract_seconds_per_image
        return timings

    def predictions(self, scores: Mapping[str, np.ndarray], seeds: Sequence[int]) -> dict:
        """predictions.npz arrays: ``<split>_ids``, ``<split>_labels``, ``<split>_scores`` (S, n, C) and ``seeds``."""
        arrays: dict[str, np.ndarray] = {"seeds": np.asarray(list(seeds), dtype=np.int64)}
        for split, split_scores in scores.items():
            arrays[f"{split}_ids"] = np.asarray(self.ids[split])
            arrays[f"{split}_labels"] = np.asarray(self.labels[split])
            arrays[f"{split}_scores"] = np.asarray(split_scores, dtype=np.float32)
            if split in self.groups:
                arrays[f"{split}_groups"] = np.asarray(self.groups[split], dtype=str)
            for name, column in (self.meta.get(split) or {}).items():
                arrays[f"{split}_meta__{name}"] = np.asarray(column)
        return arrays


def write_head_grid(
    folder: Path,
    source: ResultSource,
    *,
    protocol: str,
    settings: Mapping,
    metric: str,
    per_layer: Mapping,
    rows: Sequence[Mapping],
    predictions: Mapping | None,
    details: Mapping,
    extra: Mapping | None = None,
    timings_extra: Mapping | None = None,
) -> Path:
    """A head grid's folder (probe_* and finetune_*): ``result.json``/CSV and the last layer's best-LR predictions.

    Train seconds are summed and inference s/sample averaged over the layers; the summary is
    :func:`probe_summary` of ``per_layer`` (``ProbeResult.to_dict()`` entries) for ``settings["seeds"]``.
    ``predictions`` holds ``seeds``, ``val_scores`` and ``test_scores`` (None: no predictions file).
    """
    train_seconds = sum(e["timings"]["train_seconds"] for e in per_layer.values())
    inference = float(np.mean([e["timings"]["inference_seconds_per_sample"] for e in per_layer.values()]))
    timings = {**source.timings(train_seconds, inference), **(timings_extra or {})}
    arrays = None
    if predictions is not None:
        scores = {"val": predictions["val_scores"], "test": predictions["test_scores"]}
        arrays = source.predictions(scores, predictions["seeds"])
    return write_result(
        folder,
        protocol=protocol,
        settings=settings,
        metric=metric,
        timings=timings,
        summary=probe_summary(per_layer, len(settings["seeds"])),
        details=details,
        rows=rows,
        predictions=arrays,
        extra={**source.facts(), **(extra or {})},
        **source.identity(),
    )


def seed_summary(best_lr, val: Sequence[float], test: Sequence[float], seeds_requested: int) -> dict:
    """The contract's per-protocol summary for trained heads: best LR and mean ± std over seeds on val and test.

    std is the sample std (ddof 1, as :mod:`fmcache.frozen.linear`), and 0 for one seed rather than NaN.
    """
    val_a, test_a = np.asarray(val, dtype=np.float64), np.asarray(test, dtype=np.float64)
    return {
        "best_lr": None if best_lr is None else float(best_lr),
        "val_mean": float(val_a.mean()) if val_a.size else None,
        "val_std": float(val_a.std(ddof=1)) if val_a.size > 1 else 0.0 if val_a.size else None,
        "test_mean": float(test_a.mean()) if test_a.size else None,
        "test_std": float(test_a.std(ddof=1)) if test_a.size > 1 else 0.0 if test_a.size else None,
        "n_seeds": int(test_a.size),
        "seeds_requested": int(seeds_requested),
    }


def probe_summary(per_layer: dict, seeds_requested: int) -> dict:
    """The contract's summary of trained heads: the last layer's best LR and mean ± std over the seeds that ran,
    plus ``per_layer`` (same keys) when several layers were trained.

    ``per_layer`` maps layer to a ``ProbeResult.to_dict()``-shaped entry (``best_lr``, ``per_lr``).
    """
    summaries = {}
    for layer, entry in per_layer.items():
        best = entry["per_lr"][entry["best_lr"]]
        summaries[layer] = seed_summary(entry["best_lr"], best["val_per_seed"], best["test_per_seed"], seeds_requested)
        # the probe's own numbers (same ddof), so the summary never disagrees with details
        summaries[layer].update({k: entry[k] for k in ("val_mean", "val_std", "test_mean", "test_std") if k in entry})
    summary = dict(summaries[list(per_layer)[-1]])
    if len(summaries) > 1:
        summary["per_layer"] = summaries
    return summary


SUBSETS = "subsets.npz"
LABEL_EFFICIENCY = "label_efficiency"


def train_subset(document: Mapping) -> dict | None:
    """A result's ``train_subset`` settings (a label-efficiency run), or None for a run on the whole train split."""
    subset = (document.get("settings") or {}).get("train_subset")
    return dict(subset) if isinstance(subset, Mapping) else None


def base_settings(document: Mapping) -> dict:
    """A result's settings without its subset: what every point of one label-efficiency curve shares."""
    return {k: v for k, v in (document.get("settings") or {}).items() if k != "train_subset"}
