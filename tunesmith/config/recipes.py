"""Shipped recipes: one tested YAML per tutorial workflow in tunesmith/recipes/, found by name, torchtune-style.

`tunesmith ls` lists them, `tunesmith cp NAME dest.yaml` copies one to edit, and `tunesmith train NAME key=value`
runs one when no file NAME exists. A recipe's data is shipped beside it (tunesmith/recipes/data/), so a recipe runs
on a fresh install: its relative `dataset_dir` means that folder, and a copy says so with an absolute path.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tunesmith.errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
DATASET_DIR_LINE = re.compile(r"^dataset_dir:\s*(?P<value>[^#\s]+)(?P<comment>.*)$", re.MULTILINE)


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    given, name = name, name.removesuffix(".yaml")
    if name not in recipe_names():
        torchtune = (
            "; torchtune's own configs are not shipped: copy the file from torchtune's recipes/configs/ and pass "
            "its path"
            if "/" in name
            else ""
        )
        raise ConfigError(
            f"config file {given} does not exist, nor a recipe of that name ({', '.join(recipe_names())}){torchtune}"
        )
    return RECIPE_DIR / f"{name}.yaml"


def recipe_summary(name: str) -> str:
    """The recipe's first comment line: what tutorial workflow it is."""
    first = recipe_path(name).read_text(encoding="utf-8").splitlines()[0]
    return first.removeprefix("#").strip()


def recipe_overrides(name: str) -> list[str]:
    """The settings that make a recipe run from anywhere: its relative dataset_dir, made absolute."""
    dataset_dir = yaml.safe_load(recipe_path(name).read_text(encoding="utf-8")).get("dataset_dir")
    if dataset_dir is None or Path(dataset_dir).is_absolute():
        return []
    return [f"dataset_dir={RECIPE_DIR / dataset_dir}"]


def copy_recipe(name: str, destination: Path) -> Path:
    """Write the recipe to `destination` with its dataset_dir absolute, so the copy runs from any folder."""
    if destination.is_dir():
        destination = destination / f"{name.removesuffix('.yaml')}.yaml"
    if destination.exists():
        raise ConfigError(f"{destination} already exists; give another name or remove it first")
    text = recipe_path(name).read_text(encoding="utf-8")

    def absolute(match: re.Match) -> str:
        value = match["value"]
        if Path(value).is_absolute():
            return match[0]
        return f"dataset_dir: {RECIPE_DIR / value}  # tunesmith's demo data; point it at your own"

    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(DATASET_DIR_LINE.sub(absolute, text), encoding="utf-8")
    return destination
