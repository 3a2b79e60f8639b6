"""Architecture rules read from the source: package layering without cycles, the library/application split,
who may import the root config, and where method names may be compared.

Imports are collected with :mod:`ast` from every module of ``src/medfoundry`` (module level and inside
functions), plus ``importlib.import_module("medfoundry....")`` string literals, so a hidden upward import
counts too. The method-name rule and the root-config rule are strict: only the builders (:data:`BUILDERS`)
import a run config class (see docs/architecture.md, "Layers").
"""

from __future__ import annotations

import ast
import fnmatch
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "medfoundry"
#: The application (CLI, demo, sweep and benchmark drivers): it may import any of the library, never the reverse.
APP = SRC.parent / "medfoundry_cli"

#: Packages (or top-level modules) by layer, lowest first; a module may import its own layer and lower ones.
LAYERS: list[set[str]] = [
    {"errors", "safe_load", "schedules", "precision", "__init__"},
    {"config"},
    {"checkpoints", "losses"},
    {"models", "data"},
    {"distributed"},
    {"eval"},
    {"methods"},
    {"train"},
    {"recipes"},
]

#: The builders: modules that may take a whole run config (``RunConfig`` or a method's ``*RunConfig``). The training
#: loop and its hook/resume wiring, the method registry, and inside each method package its config, pipeline and
#: loader (a method's pipeline is the one place that reads that method's tree and hands each part its section);
#: rebuilding a run from a checkpoint and checking a run's input paths go through the registry entry too.
BUILDERS: set[str] = {
    "train/loop.py",
    "train/hooks.py",
    "train/resume.py",
    "methods/registry.py",
    "methods/checkpoint_backbone.py",
    "methods/input_paths.py",
    "methods/*/config.py",
    "methods/*/pipeline.py",
    "methods/*/loader.py",
}


def _modules(root: Path = SRC) -> dict[str, ast.Module]:
    return {str(p.relative_to(root)): ast.parse(p.read_text()) for p in sorted(root.rglob("*.py"))}


def _package(rel: str) -> str:
    return Path(rel).parts[0].removesuffix(".py")


def _imported(tree: ast.Module, prefix: str = "medfoundry.") -> set[str]:
    """Dotted modules under ``prefix`` that a module imports, including function-level and importlib strings."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return {n for n in names if n == prefix.rstrip(".") or n.startswith(prefix)}


def package_edges() -> dict[tuple[str, str], list[str]]:
    """``(source package, imported package) -> [modules]`` between different packages."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for rel, tree in _modules().items():
        src = _package(rel)
        for name in _imported(tree):
            dst = name.split(".")[1]
            if dst != src:
                edges[(src, dst)].append(rel)
    return edges


def _layer(pkg: str) -> int:
    for i, layer in enumerate(LAYERS):
        if pkg in layer:
            return i
    raise AssertionError(f"package {pkg!r} is in no layer of tests/architecture/test_architecture.py::LAYERS")


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer() -> None:
    for pkg in {_package(rel) for rel in _modules()}:
        _layer(pkg)


def test_no_import_cycle_between_packages() -> None:
    edges = set(package_edges())
    assert _cycles(edges) == [], "packages import each other in a cycle: " + str(
        {e: package_edges()[e][:3] for e in edges if any(set(e) <= set(c) for c in _cycles(edges))})


def test_imports_only_go_down_the_layers() -> None:
    edges = package_edges()
    upward = {e: edges[e][:3] for e in edges if _layer(e[1]) > _layer(e[0])}
    assert not upward, f"upward imports (package -> package: modules): {upward}"


def _imports_root_config(tree: ast.Module) -> bool:
    """Imports ``RunConfig`` (the common sections) or a method's run config class (``DinoRunConfig`` ...)."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medfoundry.")
                and any(a.name.endswith("RunConfig") for a in node.names)):
            return True
    return False


def _is_builder(rel: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in BUILDERS)


def test_root_config_is_read_only_by_the_builders() -> None:
    """Only the builders import a run config class; every other library module gets its sections."""
    readers = {rel for rel, tree in _modules().items()
               if _package(rel) != "config" and _imports_root_config(tree) and not _is_builder(rel)}
    assert not readers, ("these modules take a whole run config (give them their sections, or build them in the "
                         f"method's pipeline): {sorted(readers)}")
    assert any(_imports_root_config(tree) for rel, tree in _modules().items() if _is_builder(rel)), "never fires"


def _compares_method_name(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                if isinstance(side, ast.Attribute) and side.attr == "method":
                    return True
    return False


def test_no_method_name_is_compared_outside_the_method_packages() -> None:
    """``cfg.method == "clip"`` belongs in no module outside ``methods/`` (the library and the application alike):
    what differs by method is a field of its registry entry (``methods/registry.py``)."""
    branching = {rel for rel, tree in _modules().items() if _package(rel) != "methods" and _compares_method_name(tree)}
    branching |= {f"medfoundry_cli/{rel}" for rel, tree in _modules(APP).items() if _compares_method_name(tree)}
    assert not branching, f"core code branching on a method name (use the method registry): {sorted(branching)}"


def test_the_library_never_imports_the_application() -> None:
    """open_clip's split: ``medfoundry`` is importable and usable without ``medfoundry_cli``."""
    upward = {rel: sorted(_imported(tree, "medfoundry_cli.")) for rel, tree in _modules().items()
              if _imported(tree, "medfoundry_cli.")}
    assert not upward, f"library modules import the application: {upward}"


def _parses_argv_or_runs_pip(tree: ast.Module) -> list[str]:
    """``sys.argv``, an ``ArgumentParser``/``parse_args`` call, or a ``"pip"`` string literal (a pip command)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("argv", "ArgumentParser", "parse_args"):
            found.append(node.attr)
        elif isinstance(node, ast.Constant) and node.value == "pip":
            found.append("'pip'")
    return found


def test_nothing_in_the_library_parses_argv_or_runs_pip() -> None:
    offending = {rel: hits for rel, tree in _modules().items() if (hits := _parses_argv_or_runs_pip(tree))}
    assert not offending, f"argv parsing / pip belongs in medfoundry_cli: {offending}"
    assert any(_parses_argv_or_runs_pip(tree) for tree in _modules(APP).values()), "the rule would never fire"
