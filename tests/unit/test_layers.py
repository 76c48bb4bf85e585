"""Layers only point down: cli → train/chat/estimate/export/serve/evaluate → distributed → data/model → config →
errors and the other base modules. Every import of every module (at the top or inside a function) is read with
`ast`; a lower layer that imports a higher one, or a module import cycle, fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tunesmith"

# The first name under tunesmith/ → its layer; a module imports only from its own layer or lower ones.
LAYERS = {
    "__init__": 0,
    "errors": 0,
    "patches": 0,
    "paths": 0,
    "console": 0,
    "config": 1,
    "data": 2,
    "model": 2,
    "distributed": 3,  # train's launch machinery: used by train/, knows nothing of it
    "train": 4,
    "chat": 4,
    "estimate": 4,
    "export": 4,
    "serve": 4,
    "evaluate": 4,
    "eval": 4,
    "predict": 4,
    "cli": 5,
    "__main__": 5,
    "version_command": 5,
    "env_command": 5,
    "ls_command": 5,
    "download_command": 5,
    "cp_command": 5,
    "ui": 5,
    "webui": 5,
}
COMMAND = 4  # a package's `command.py` (`tunesmith data`, ...) is a command: it may use every layer below
ENTRY = 5  # a `__main__.py` runs the CLI


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "__main__":
        return ENTRY
    if parts[-1] == "command":
        return COMMAND
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"tunesmith/{top} has no layer: add it to LAYERS in {__file__} (and to DESIGN.md)"
    return LAYERS[top]


def imports(module: str) -> set[str]:
    """The tunesmith modules `module` imports anywhere in its code: `from a.b import c` is a.b.c when c is a module."""
    found = set()
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES and name != module}
    return found


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    upward = sorted(
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module in MODULES
        for target in imports(module)
        if layer(target) > layer(module)
    )
    assert upward == []


def test_no_module_import_cycle():
    graph = {module: imports(module) for module in MODULES}
    cycles = []
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" → ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_check_sees_a_lower_layer_importing_a_higher_one():
    """The parser resolves what the tests above rely on (a `from package import module`, an import in a function)."""
    assert "tunesmith.train.sft" in imports("tunesmith.train.command")  # inside run()
    assert "tunesmith.config.fsdp_keys" in imports("tunesmith.config.sections")  # from tunesmith.config import x
    assert layer("tunesmith.data.command") == COMMAND > layer("tunesmith.data.dataset")
    assert layer("tunesmith.train.__main__") == ENTRY
