"""Print fmcache's package map: each package or top-level module with its lines of code (docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fmcache"


def lines(path: Path) -> int:
    return sum(1 for _ in path.open(encoding="utf-8"))


def main() -> None:
    rows = []
    for entry in sorted(ROOT.iterdir()):
        if entry.is_dir() and (entry / "__init__.py").exists():
            files = sorted(entry.rglob("*.py"))
            detail = ", ".join(f"{f.relative_to(entry)} {lines(f)}" for f in files if f.name != "__init__.py")
            rows.append((f"fmcache/{entry.name}/", sum(lines(f) for f in files), detail))
        elif entry.suffix == ".py" and entry.name not in ("__init__.py", "__main__.py"):
            rows.append((f"fmcache/{entry.name}", lines(entry), ""))
    width = max(len(name) for name, _, _ in rows)
    for name, count, detail in sorted(rows, key=lambda r: -r[1]):
        print(f"{name:<{width}}  {count:>5}  {detail}")
    print(f"{'total':<{width}}  {sum(r[1] for r in rows):>5}")


if __name__ == "__main__":
    main()
