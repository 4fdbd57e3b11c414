"""Human summaries of caches for ``fmcache info`` and ``fmcache ls``."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from fmcache.cache.manifest import MANIFEST, read_manifest
from fmcache.cache.messages import repair_hint
from fmcache.cache.verify import is_pixel_manifest, load_manifest, quick_problems
from fmcache.cache.views import views_datasets, views_k, views_nbytes
from fmcache.errors import FmcacheError


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("shard-*.h5"))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _weights_text(weights: dict) -> str:
    if weights.get("source") == "file":
        return f"file {escape(str(weights.get('path')))} (sha256 {str(weights.get('sha256'))[:12]}…)"
    if weights.get("source") == "random":
        return "RANDOM INIT (not pretrained)"
    return f"hub {weights.get('id')}"


def _status_text(manifest: dict, problems: list[tuple[str, str]]) -> str:
    """complete / partial, or damaged naming each shard that is missing or has the wrong size (``quick_problems``)."""
    counts = f"{len(manifest['shards'])}/{manifest['num_shards']} shards"
    if not problems:
        return f"{manifest['status']} ({counts})"
    named = "; ".join(f"{file} {why}" for file, why in problems)
    return f"[bold red]damaged[/] ({counts}; {escape(named)})"


def _views_text(folder: Path, manifest: dict) -> str:
    """K augmented views per train image: which datasets, and the bytes they take (the center crops are the rest)."""
    k = views_k(manifest)
    if not k:
        return "none (center crops only; `fmcache extract ... --views K` adds K augmented views per train image)"
    names = ", ".join(n.removeprefix("views/") for n in views_datasets(manifest["model"], k))
    nbytes = views_nbytes(folder, manifest)
    size = "? (a shard cannot be read)" if nbytes is None else human_bytes(nbytes)
    train = manifest["dataset"]["split_counts"].get("train", 0)
    return f"{k} per train image ({train} images; val/test: center crop only): {names}; {size}"


def format_info(folder: str | Path) -> str:
    folder = Path(folder)
    manifest = load_manifest(folder)
    problems = quick_problems(folder, manifest)  # one stat per shard
    if is_pixel_manifest(manifest):
        return _pixel_info(folder, manifest, problems)
    model, data, inputs = manifest["model"], manifest["dataset"], manifest["inputs"]
    images = sum(s["n"] for s in manifest["shards"])
    size = _size(folder)
    timings = manifest.get("timings", {})
    lines = [
        f"[bold]cache[/] {escape(str(folder))}",
        f"  status     {_status_text(manifest, problems)}, key {manifest['key'][:12]}",
        *([f"  repair     {escape(repair_hint(folder))}"] if problems else []),
        f"  model      {model['name']} ({model['backend']}: {model['arch']}), pooled '{model['pooled_kind']}'",
        f"  weights    {_weights_text(manifest.get('weights', {}))}",
        f"  layers     {model['num_layers']} (widths {sorted(set(model['layer_dims']))}), "
        f"prefix tokens {model['num_prefix_tokens']}, pools {', '.join(model['pools'])}",
        f"  tokens     layers {model['token_layers'] or 'none'} {model.get('token_shapes') or ''}",
        f"  input      {model['img_size']}px, transform {inputs['transform'].get('steps')}, "
        f"mean {inputs['transform'].get('mean')}, std {inputs['transform'].get('std')} ({inputs['transform'].get('norm_source')})",
        f"  dataset    {data['name']} at {escape(str(data['root']))}, splits {data['split_counts']}, "
        f"{'multi-label' if data['multilabel'] else 'single-label'} {len(data['class_names'])} classes, metric {data['metric']}",
        f"  storage    {manifest['dtype']}, {images} images, {human_bytes(size)} ({human_bytes(size / max(images, 1))}/image)",
        f"  time       {timings.get('extract_seconds')} s, {timings.get('s_per_img')} s/image",
        f"  views      {_views_text(folder, manifest)}",
    ]
    skipped = manifest.get("skipped", [])
    if skipped:
        lines.append(f"  [yellow]skipped    {len(skipped)} bad image(s):[/]")
        lines += [f"    {escape(str(s['path']))}: {escape(str(s['reason']))}" for s in skipped]
    return "\n".join(lines)


def _pixel_info(folder: Path, manifest: dict, problems: list[tuple[str, str]]) -> str:
    """``fmcache info`` of a pixel cache (``fmcache pixels``): the crops it holds and what they feed."""
    p, data, prefix = manifest["pixels"], manifest["dataset"], manifest["inputs"]["prefix"]
    images = sum(s["n"] for s in manifest["shards"])
    size = _size(folder)
    timings = manifest.get("timings", {})
    lines = [
        f"[bold]pixel cache[/] {escape(str(folder))}",
        f"  status     {_status_text(manifest, problems)}, key {manifest['key'][:12]}",
        *(
            [f"  repair     {escape(repair_hint(folder).replace('fmcache extract', 'fmcache pixels'))}"]
            if problems
            else []
        ),
        f"  crops      {p['height']}x{p['width']}, {p['channels']} channel(s), uint8 {p['layout']}: resize "
        f"{prefix['resize']}, center crop {prefix['crop']}, {prefix['interpolation']} (antialias {prefix['antialias']})",
        f"  dataset    {data['name']} at {escape(str(data['root']))}, {data['n']} images"
        + (f" (the first {data['limit']} of each split)" if data.get("limit") else ""),
        f"  storage    {images} images, {human_bytes(size)} ({human_bytes(size / max(images, 1))}/image)",
        f"  time       {timings.get('extract_seconds')} s, {timings.get('s_per_img')} s/image",
        "  feeds      fmcache finetune (--pixels auto|on) and extract --views at this crop size",
    ]
    return "\n".join(lines)


def list_caches(cache_root: str | Path) -> list[dict]:
    root = Path(cache_root)
    if not root.is_dir():
        raise FmcacheError(f"cache root {root} does not exist; pass --cache-root or run `fmcache extract` first")
    rows = []
    for manifest_path in sorted(root.glob(f"*/*/*/{MANIFEST}")):
        folder = manifest_path.parent
        try:
            manifest = read_manifest(folder) or {}
        except FmcacheError:  # one unreadable manifest must not hide every other cache
            manifest = {"status": "damaged"}
        pixels = manifest.get("pixels") if is_pixel_manifest(manifest) else None
        model = f"pixels {pixels['height']}px x{pixels['channels']}" if pixels else None
        rows.append(
            {
                "path": str(folder),
                "dataset": manifest.get("dataset", {}).get("name", "?"),
                "model": model or manifest.get("model", {}).get("name", "?"),
                "weights": "-" if pixels else manifest.get("weights", {}).get("source", "?"),
                "images": sum(s["n"] for s in manifest.get("shards", [])),
                "status": "damaged" if quick_problems(folder, manifest) else manifest.get("status", "?"),
                "size": human_bytes(_size(folder)),
            }
        )
    return rows
