"""Packaging: the declared dependencies are exactly what the code imports, and a plain (non-editable) ``pip install``
gives a working ``medfoundry`` command with the bundled recipes."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "src" / "medfoundry", ROOT / "src" / "medfoundry_cli"]
#: declared although no module imports them by name: another package loads them
LOADED_INDIRECTLY = {"tensorboard": "torch.utils.tensorboard", "imagecodecs": "tifffile's slide decoders"}
# Code the benchmarks compare against, located at run time in a cache folder (never installed, never a dependency)
# (facebookresearch/dinov2 under .cache/peers/, put on sys.path by bench/peer_code.py): only the benchmarks use it
PEER_CODE = {"dinov2": "src/medfoundry_cli/bench/"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_modules() -> dict[str, list[str]]:
    """Third-party top-level modules imported anywhere in the two packages -> the files that import them."""
    found: dict[str, list[str]] = {}
    for root in SOURCES:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and not top.startswith("medfoundry") and top != "__future__":
                        found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_declared_dependencies_are_exactly_what_the_code_imports() -> None:
    project = _project()
    required = {_dist_name(r) for r in project["dependencies"]}
    extras = {_dist_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    by_module = md.packages_distributions()
    imported = {}
    for module, files in _imported_top_modules().items():
        dist = (by_module.get(module) or [module])[0].lower().replace("_", "-")
        imported[dist] = files
    undeclared = {d: f[:2] for d, f in imported.items() if d not in required | extras | set(PEER_CODE)}
    for peer, where in PEER_CODE.items():  # peer code only in the benchmarks, never in the library or commands
        assert all(f.startswith(where) for f in imported.get(peer, [])), (peer, imported.get(peer))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = required - set(imported) - set(LOADED_INDIRECTLY)
    assert not unused, f"declared dependencies that nothing imports (drop them): {sorted(unused)}"
    assert "omegaconf" not in required and "scipy" in required


@pytest.mark.slow
def test_non_editable_install_gives_a_working_cli(tmp_path: Path) -> None:
    """``pip install`` of the built wheel (not editable) into a fresh venv: ``--version``, ``recipes`` and
    ``config tiny_dino_cpu`` exit 0 outside the checkout, with the recipes read from the installed package.

    The venv has no pip and no packages of its own; the wheel is installed into it with ``--no-deps``, and the
    dependencies are made visible through a ``.pth`` line naming this interpreter's site-packages (whose own
    ``.pth`` files, such as the editable install's path to ``src/``, are not processed from there).
    """
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(wheels.glob("medfoundry-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_medfoundry_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"
    work.mkdir()

    def cli(*args: str) -> str:
        done = subprocess.run([str(venv / "bin" / "medfoundry"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"medfoundry {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}"
        return done.stdout

    where = subprocess.run([str(python), "-c", "import medfoundry, medfoundry_cli; print(medfoundry.__file__); "
                            "print(medfoundry_cli.__file__)"], cwd=work, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(Path(w).is_relative_to(site) for w in where), f"not the installed copy: {where}"
    assert cli("--version").strip() == f"medfoundry {md.version('medfoundry')}"
    listing = cli("recipes")
    assert "tiny_dino_cpu" in listing and "hybrid_dinov3_chexzero" in listing
    resolved = cli("config", "tiny_dino_cpu")
    assert "method: dino" in resolved and "vit_tiny_patch8" in resolved
