"""docs/recipes.md: every bundled recipe has a table, and each table's "our value" is what the recipe resolves to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from medfoundry.config import load_config
from medfoundry.recipes import list_recipes, recipes_dir

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
HEADING = re.compile(r"^## `recipes/([\w.-]+)\.yaml`\s*$")


def _tables() -> dict[str, list[tuple[str, str]]]:
    """``{recipe stem: [(dotted key, our value as YAML text), ...]}`` from the doc's tables."""
    tables: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        m = HEADING.match(line)
        if m:
            current = m.group(1)
            tables[current] = []
            continue
        if current and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key, ours = cells[0], cells[1]
            if ours.startswith("`") and ours.endswith("`"):
                tables[current].append((key.strip("`"), ours.strip("`")))
    return tables


def _resolve(cfg: object, key: str) -> object:
    value = cfg
    for part in key.split("."):
        assert hasattr(value, part), f"docs/recipes.md names '{key}', which is not a config key"
        value = getattr(value, part)
    return value


def _equal(actual: object, claimed: object) -> bool:
    if isinstance(actual, (list, tuple)):
        return isinstance(claimed, list) and len(actual) == len(claimed) and all(
            _equal(a, c) for a, c in zip(actual, claimed))
    if isinstance(actual, float) and isinstance(claimed, str):  # YAML 1.1 reads 4e-4 as a string
        try:
            claimed = float(claimed)
        except ValueError:
            return False
    if isinstance(actual, float) or isinstance(claimed, float):
        return isinstance(claimed, (int, float)) and not isinstance(claimed, bool) and \
            claimed == pytest.approx(actual, rel=1e-9, abs=1e-12)
    if actual is None:
        return claimed is None
    return actual == claimed or str(actual) == str(claimed)


def test_every_bundled_recipe_has_a_table() -> None:
    assert set(_tables()) == {name for name, _ in list_recipes()}


@pytest.mark.parametrize("stem", sorted(_tables()))
def test_table_matches_the_recipe(stem: str) -> None:
    rows = _tables()[stem]
    assert len(rows) >= 3, f"the table of {stem} lists fewer than 3 settings"
    cfg = load_config(recipes_dir() / f"{stem}.yaml")
    wrong = []
    for key, text in rows:
        actual = _resolve(cfg, key)
        claimed = yaml.safe_load(text)
        if not _equal(actual, claimed):
            wrong.append(f"{key}: docs say {text}, recipe resolves to {actual!r}")
    assert not wrong, f"docs/recipes.md disagrees with recipes/{stem}.yaml:\n" + "\n".join(wrong)
