"""The shipped recipes: the few complete files in recipes/ (repository root) that a user runs, found by name.

`vlmlab chain photos-hour` reads recipes/chain-photos-hour.yaml, `vlmlab ablate roles`
recipes/suite-roles.yaml, and `base: photo-captions` in a chain or suite recipes/photo-captions.yaml. The folder is
read where the source tree has it (vlmlab is installed editable), so the recipe a user edits is the one that runs.
Records of past experiments are not here: docs/experiments/ holds them, each a file to copy and run.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError

RECIPE_DIR = Path(__file__).resolve().parents[3] / "recipes"
PREFIXES = {"config": "", "chain": "chain-", "suite": "suite-"}  # a recipe's kind is the start of its file name


def recipe_names(kind: str) -> list[str]:
    """The names the shipped recipes of one kind are asked for by, e.g. ['photos-hour', 'synthetic']."""
    prefix, others = PREFIXES[kind], tuple(p for p in PREFIXES.values() if p)
    stems = [p.stem for p in sorted(RECIPE_DIR.glob(f"{prefix}*.yaml"))]
    return [s.removeprefix(prefix) for s in stems if prefix or not s.startswith(others)]


def find_recipe(spec: str, kind: str, beside: Path = Path(".")) -> Path:
    """A file (relative to `beside`), else the shipped recipe of that kind named `spec` (`photos_hour` or
    `photos-hour`, with or without its kind's prefix and .yaml)."""
    path = beside / spec
    if path.is_file():
        return path
    prefix = PREFIXES[kind]
    name = spec.removesuffix(".yaml").replace("_", "-").removeprefix(prefix)
    shipped = RECIPE_DIR / f"{prefix}{name}.yaml"
    if "/" not in spec and shipped.is_file():
        return shipped
    raise ConfigError(
        f"no {kind} {spec!r}: give a {kind} YAML file or one of the recipes in {RECIPE_DIR}: {recipe_names(kind)}"
    )
