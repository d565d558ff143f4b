"""The package's modules form layers: no import circle, counting the imports inside functions
(which hide a circle from Python's import machinery, not from the design)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The package's source folders: kernels/ installs as lavin_fast.kernels (setup.py).
SOURCES = {"lavin_fast": ROOT / "lavin_fast", "lavin_fast.kernels": ROOT / "kernels"}

def module_files() -> dict[str, Path]:
    files = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            if package == "lavin_fast" and relative.parts[0] == "kernels":
                continue                      # the link to kernels/, read from there
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            files[".".join((package, *parts))] = path
    return files


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from lavin_fast import train` imports the module lavin_fast.train
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found |= submodules or ({node.module} & modules)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import path that comes back to where it started, as the modules along it."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_the_cycle_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    files = module_files()
    assert {"lavin_fast.models.lavin", "lavin_fast.checkpoints.adapters", "lavin_fast.train",
            "lavin_fast.kernels.mm_adapter"} <= set(files)
    graph = {name: imports_of(path, set(files)) - {name} for name, path in files.items()}
    assert circles(graph) == []
