"""The layers, as the import graph says them.

Every module of the product packages is parsed (never imported) and every
import it makes is an edge: module-level ones, those inside functions and
those behind ``if TYPE_CHECKING:`` alike (a cycle hidden from the
interpreter is still a cycle for a reader). The rules::

    common   <- rpc       rpc knows no storage, virt or daemon wiring
    common   <- storage   storage knows no rpc, virt or daemon wiring
    common   <- virt      virt knows no rpc, storage or daemon wiring: it
                          reaches storage through virt/storage_iface.py,
                          a Protocol the daemon fills
    everything <- vdsm_lsm (the wiring, the client)

and no import cycles, inside a package or across them. Modules stay under
500 lines (split by responsibility).
"""

from __future__ import annotations

import ast
import functools
import os

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("common", "rpc", "storage", "virt", "vdsm_lsm")
MAX_LINES = 500

# Package -> the project's packages it must never import.
FORBIDDEN = {
    "common": {"rpc", "storage", "virt", "vdsm_lsm"},
    "rpc": {"storage", "virt", "vdsm_lsm"},
    "storage": {"rpc", "virt", "vdsm_lsm"},
    "virt": {"rpc", "storage", "vdsm_lsm"},
}


def _module_files(package: str) -> dict[str, str]:
    """Dotted module name -> path, for every .py file of the package."""
    found = {}
    root = os.path.join(TOP, package)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, filename), TOP)[: -len(".py")]
            parts = rel.split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = os.path.join(dirpath, filename)
    return found


@functools.lru_cache(maxsize=1)
def modules() -> dict[str, str]:
    found: dict[str, str] = {}
    for package in PACKAGES:
        found.update(_module_files(package))
    return found


def _resolve(name: str, known: dict[str, str]) -> str:
    """The longest known module that name is or lies in ("" if none)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: str, known: dict[str, str]) -> set[str]:
    """The project modules a module imports, wherever the import statement is."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from storage import lvm" imports the module storage.lvm,
            # "from storage.api import StorageAPI" the module storage.api.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, known)
            if target and target != module:
                found.add(target)
    return found


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, path, known) for m, path in known.items()}


def _package(module: str) -> str:
    return module.split(".", 1)[0]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_cycle_in(set(c), edges) for c in components]


def _cycle_in(component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first)."""
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(edges[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"no cycle in component {sorted(component)}")


def _text(cycles: list[list[str]]) -> str:
    return "; ".join(" -> ".join(c) for c in cycles)


# The rules


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_down(package):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        if _package(module) == package
        for target in targets
        if _package(target) in FORBIDDEN[package]
    )
    assert wrong == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    inside = {
        m: {t for t in targets if _package(t) == package}
        for m, targets in graph().items()
        if _package(m) == package
    }
    cycles = find_cycles(inside)
    assert not cycles, f"import cycles: {_text(cycles)}"


def test_no_import_cycle_across_packages():
    cycles = find_cycles(graph())
    assert not cycles, f"import cycles: {_text(cycles)}"


def _product_files() -> list[str]:
    paths = list(modules().values())
    for dirpath, dirnames, filenames in os.walk(os.path.join(TOP, "contrib")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(paths)


def test_no_module_over_500_lines():
    over = {}
    for path in _product_files():
        with open(path, encoding="utf-8") as f:
            lines = len(f.read().splitlines())
        if lines > MAX_LINES:
            over[os.path.relpath(path, TOP)] = lines
    assert over == {}


# The checker itself


def test_imports_found_wherever_they_are(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    path = tmp_path / "pkg" / "a.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from pkg import b\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.c import Thing\n"
        "def f():\n"
        "    import pkg.d\n"
        "    from . import e\n"
        "    from .f import g\n"
        "import os\n"
    )
    known = {f"pkg.{m}": "" for m in "abcdef"} | {"pkg": ""}
    assert imports_of("pkg.a", str(path), known) == {"pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.f"}


def test_cycles_are_reported_as_paths():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert find_cycles(edges) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
