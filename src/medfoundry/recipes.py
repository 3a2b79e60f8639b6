"""Finding the bundled recipes: ``medfoundry/bundled_recipes/*.yaml``, package data of the installed library (the
repository's top-level ``recipes/`` is a link to that folder, so ``recipes/NAME.yaml`` works from a checkout)."""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "bundled_recipes"


def recipes_dir() -> Path:
    """The folder of bundled recipes (shipped inside the package, so a plain ``pip install .`` has them)."""
    if not BUNDLED.is_dir() or not any(BUNDLED.glob("*.yaml")):
        raise FileNotFoundError(f"the bundled recipes are missing from {BUNDLED}: reinstall medfoundry "
                                "(they are package data of the wheel)")
    return BUNDLED


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe path as given, or a bundled recipe by name (``tiny_dino_cpu`` or ``tiny_dino_cpu.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    bundled = recipes_dir() / f"{stem}.yaml"
    if bundled.is_file():
        return bundled
    return path


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of each bundled recipe; the description is its first comment line."""
    out = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        first = ""
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                first = line.lstrip("# ").strip()
                break
        out.append((path.stem, first))
    return out
