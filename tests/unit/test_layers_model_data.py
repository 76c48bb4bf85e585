"""Layers point down (cli → train/chat/... → data, model → config, errors): `model/` and `data/` are peers, and
neither imports the other; what both need (the cache folder) sits below them, in `tunesmith/paths.py`. The
`tunesmith data` command (data/command.py) is a command, above both, like train/."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tunesmith"
COMMAND_MODULES = {"command.py"}  # a command may use every layer below it


def imported_modules(source: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize(("layer", "peer"), [("model", "data"), ("data", "model")])
def test_model_and_data_do_not_import_each_other(layer, peer):
    offenders = {
        f"{layer}/{source.name} imports {module}"
        for source in (PACKAGE / layer).glob("*.py")
        if source.name not in COMMAND_MODULES
        for module in imported_modules(source)
        if module == f"tunesmith.{peer}" or module.startswith(f"tunesmith.{peer}.")
    }
    assert offenders == set()
