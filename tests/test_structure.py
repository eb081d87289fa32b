"""The repository's shape (docs/architecture.md): dependencies point one way
(hip_pipeline -> sweeps -> pipeline -> models), no import circle, models imports only torch
and the standard library, and no source file grows past 400 lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipeline", "sweeps", "hip_pipeline")
LAYER = {name: i for i, name in enumerate(PACKAGES)}  # may import only lower layers
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def own(name: str) -> str | None:
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    return {m: {t for n in _imports(p) if (t := own(n)) and t != m} for m, p in mods.items()}


def test_dependencies_point_one_way():
    upward = sorted((a, b) for a, deps in _graph().items() for b in deps
                    if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]])
    assert upward == [], f"imports against the layering: {upward}"


def test_models_imports_only_torch_and_the_standard_library():
    allowed = {"torch", "models", "__future__", *sys.stdlib_module_names}
    for path in (ROOT / "models").rglob("*.py"):
        foreign = {n for n in _imports(path) if n.split(".")[0] not in allowed}
        assert not foreign, f"{path.relative_to(ROOT)} imports {sorted(foreign)}"


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph[m]):
            if dep.startswith(m + "."):  # a package's __init__ re-exporting its modules
                continue
            if state.get(dep) == 1:
                raise AssertionError(f"import circle: {' -> '.join(path[path.index(dep):])} "
                                     f"-> {dep}")
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_source_files_stay_small():
    files = [p for d in (*PACKAGES, "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 40
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"files over {MAX_LINES} lines: {long}"
