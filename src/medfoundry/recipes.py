"""Finding the bundled recipes (``recipes/*.yaml`` in the source tree)."""

from __future__ import annotations

from pathlib import Path


def recipes_dir() -> Path:
    """The folder of bundled recipes (repository checkout or editable install)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "recipes"
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise FileNotFoundError("bundled recipes/ folder not found next to the medfoundry sources")


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
