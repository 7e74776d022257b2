"""The package layout is the architecture: no module imports a layer above its own (crawler/__init__.py)."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import crawler

ROOT = Path(crawler.__file__).parent


def layers() -> list[str]:
    """The layer names, top first, read from the table in the package docstring."""
    doc = crawler.__doc__ or ""
    table = doc.split("Layers.", 1)[1]
    return re.findall(r"^    (\w+) {2,}", table, flags=re.MULTILINE)


def layer_of(module: str, root: Path = ROOT) -> str:
    """`crawler.api.client` -> `api`; a top-level module is `core`; a name of the package root is `__init__`."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return parts[1] if len(parts) > 1 else "__init__"
    if (root / parts[1] / "__init__.py").exists():
        return parts[1]
    return "core" if (root / f"{parts[1]}.py").exists() else "__init__"


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every crawler module `path` imports (absolute or relative), with its line."""
    module = "crawler." + ".".join(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("crawler")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            if base == "crawler":  # from crawler import testing (a module) or __version__ (the root's name)
                found += [(node.lineno, f"crawler.{a.name}") for a in node.names]
            elif base.startswith("crawler"):
                found.append((node.lineno, base))
    return found


def violations(root: Path = ROOT) -> list[str]:
    """Every import that crosses the layering rule, as `file:line imports module (layer -> layer)`."""
    order = layers()
    rank = {name: i for i, name in enumerate(order)}
    bad = []
    for path in sorted(root.rglob("*.py")):
        mod = "crawler." + ".".join(path.relative_to(root).with_suffix("").parts)
        mine = layer_of(mod, root)
        for line, target in imports(path, root):
            theirs = layer_of(target, root)
            if mine == theirs or mine in ("__init__", "__main__"):
                continue
            if theirs in ("__init__", "sim"):  # the public API's names and the simulator: for the command line only
                ok = mine == "cli"
            elif mine == "sim":
                ok = theirs == "core"
            else:
                ok = theirs in rank and mine in rank and rank[theirs] > rank[mine]
            if not ok:
                bad.append(f"{path.relative_to(root.parent)}:{line} imports {target} ({mine} -> {theirs})")
    return bad


def test_the_layer_table_names_every_package() -> None:
    """Every subpackage of crawler is a row of the layering table (or the simulator)."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"sim"}
    assert packages <= set(layers()), f"packages missing from the table: {packages - set(layers())}"
    assert layers()[-1] == "core"


def test_no_module_imports_a_layer_above_its_own() -> None:
    """No crawler module imports from a layer above it, and only the command line imports the simulator."""
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker flags an import from a lower layer to a higher one in a copy of the package."""
    copy = tmp_path / "crawler"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "api" / "probe.py").write_text("from crawler.runs import local\nfrom ..sim import data\n", encoding="utf-8")
    found = violations(copy)
    assert "crawler/api/probe.py:1 imports crawler.runs (api -> runs)" in found
    assert "crawler/api/probe.py:2 imports crawler.sim (api -> sim)" in found
    assert len(found) == 2


def test_settings_stop_at_the_command_line_and_the_runs() -> None:
    """`Settings` is imported only by config, cli/ and runs/ (below them, typed options), and by the public API:
    the package root and `Client(settings)`."""
    allowed = {"config.py", "__init__.py", "api/client.py"}
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        where = str(path.relative_to(ROOT))
        if where.startswith(("cli/", "runs/")) or where in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and any(a.name == "Settings" for a in node.names):
                found.append(f"{where}:{node.lineno}")
    assert found == []


LIMITS = {"module": 500, "class": 300, "function": 60}  # lines (STYLE.md)


def oversized(root: Path = ROOT) -> list[str]:
    """Every module, class and function of the package over its line limit, as `kind path:name lines`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        where = str(path.relative_to(root))
        if len(source.splitlines()) > LIMITS["module"]:
            found.append(f"module {where} {len(source.splitlines())}")
        for node in ast.walk(ast.parse(source)):
            kind = ("class" if isinstance(node, ast.ClassDef) else "function"
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            if kind is not None and (size := (node.end_lineno or node.lineno) - node.lineno + 1) > LIMITS[kind]:
                found.append(f"{kind} {where}:{node.name} {size}")
    return found


def test_modules_classes_and_functions_stay_under_their_sizes(tmp_path: Path) -> None:
    """No module over 500 lines, no class over 300, no function over 60 (measured with ast); the check itself sees a
    function of 61 lines in a copy of the package."""
    assert oversized() == []
    copy = tmp_path / "crawler"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "probe.py").write_text("def long() -> None:\n" + "    pass\n" * 60, encoding="utf-8")
    assert oversized(copy) == ["function probe.py:long 61"]
