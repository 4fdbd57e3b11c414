"""The package's shape, checked on its source: protocols told apart only by their traits, no private imports across
modules, imports inside functions only where they defer a heavy package (and say so), the formatter left on."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fmcache.protocols import names

PACKAGE = Path(__file__).resolve().parents[1] / "fmcache"
# what a deferred import may defer: the model backends and the other packages that make a start-up slow
HEAVY = {"torch", "torchvision", "timm", "open_clip", "transformers", "peft", "faiss", "submitit", "h5py",
         "matplotlib", "sklearn", "scipy", "pydicom", "safetensors", "openpyxl"}  # fmt: skip
# a protocol's own row and its binding; every other module reads the traits
PROTOCOL_HOMES = {"protocols.py", "runners.py"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _protocol_words() -> set[str]:
    words = set(names())
    return words | {n.split("_", 1)[0] for n in words}  # "finetune", "probe": a family by its prefix


def test_no_protocol_is_told_apart_by_its_name():
    words, found = _protocol_words(), []
    for name, tree in TREES.items():
        if MODULES[name].name in PROTOCOL_HOMES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                texts = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                found += [f"{name}:{node.lineno} == {t!r}" for t in texts if t in words]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith":
                texts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                found += [f"{name}:{node.lineno} startswith({t!r})" for t in texts if t in words]
    assert not found, "read the protocol's traits (fmcache.protocols) instead of its name: " + "; ".join(found)


def test_no_module_imports_another_modules_private_names():
    found = [f"{name}:{node.lineno} {node.module}.{alias.name}"
             for name, tree in TREES.items() for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fmcache")
             for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]  # fmt: skip
    assert not found, "; ".join(found)


def _top_level_imports(tree: ast.Module) -> list[str]:
    out: list[str] = []

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                out.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.extend([node.module, *(f"{node.module}.{a.name}" for a in node.names)])

    visit(tree.body)
    return out


def _heavy(module: str, memo: dict, stack: tuple = ()) -> set[str]:
    """The heavy packages importing ``module`` (and the packages above it) loads, from the source alone."""
    if module in memo or module in stack:
        return memo.get(module, set())
    found: set[str] = set()
    for target in _top_level_imports(TREES[module]):
        top = target.split(".")[0]
        if top in HEAVY:
            found.add(top)
        elif top == "fmcache":
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                if ".".join(parts[:i]) in MODULES and ".".join(parts[:i]) != module:
                    found |= _heavy(".".join(parts[:i]), memo, (*stack, module))
    memo[module] = found
    return found


def _loads(target: str, memo: dict) -> set[str]:
    """What ``import target`` loads: the target and every package above it that the package holds."""
    parts = target.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return set().union(*(_heavy(p, memo) for p in prefixes if p in MODULES))


def test_imports_inside_functions_only_defer_heavy_packages():
    """An import inside a function hides an arrow and costs a lookup per call: allowed only where it keeps a heavy
    package (torch, a model backend, h5py, ...) out of a start-up that does not need it, with a comment saying so."""
    memo: dict = {}
    found = []
    for name, tree in TREES.items():
        lines = MODULES[name].read_text().splitlines()
        own = _heavy(name, memo)
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in (n for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)):
                if not (node.module or "").startswith("fmcache"):
                    continue
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                heavy = set().union(*(_loads(t, memo) for t in targets))
                said = any("deferred" in line for line in lines[node.lineno - 2 : node.end_lineno])
                if not heavy - own or not said:
                    why = "defers nothing heavy" if not heavy - own else "needs a '# deferred: <package>' comment"
                    found.append(f"{name}:{node.lineno} {node.module} ({why})")
    assert not found, "; ".join(found)


def test_the_formatter_formats():
    """``# fmt: skip`` only where a hand-aligned table is the point."""
    skips = {str(p.relative_to(PACKAGE.parent)): p.read_text().count("# fmt: skip") for p in PACKAGE.rglob("*.py")}
    total = sum(skips.values())
    assert total <= 20, f"{total} '# fmt: skip' in fmcache/: " + ", ".join(f"{k} {v}" for k, v in skips.items() if v)


@pytest.mark.parametrize("module", ["fmcache.cli", "fmcache.runners", "fmcache.frozen.specs", "fmcache.finetune.spec",
                                    "fmcache.extract.spec", "fmcache.grid.config", "fmcache.report.tables"])  # fmt: skip
def test_light_modules_load_no_heavy_package(module):
    """The CLI's start-up, the spec classes and the report read no torch, no backend, no h5py."""
    assert not _loads(module, {}), re.sub(r"[{}']", "", str(_loads(module, {})))
