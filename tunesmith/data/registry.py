"""Datasets by name: LLaMA-Factory's `dataset_info.json` registry, or a file path given directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tunesmith.errors import DataError

REGISTRY_FILE = "dataset_info.json"
SUPPORTED_SUFFIXES = (".json", ".jsonl")


class DatasetSpec(BaseModel):
    """One entry of dataset_info.json (LLaMA-Factory's fields)."""

    model_config = ConfigDict(extra="allow")

    name: str
    file_name: str | None = None
    hf_hub_url: str | None = None
    formatting: Literal["alpaca", "sharegpt"] | None = None  # None: detected from the first row
    ranking: bool = False
    columns: dict[str, str] = {}
    tags: dict[str, str] = {}
    split: str = "train"
    num_samples: int | None = None
    path: Path | None = None  # resolved local file


def load_registry(dataset_dir: Path) -> dict[str, dict[str, Any]]:
    registry_path = dataset_dir / REGISTRY_FILE
    if not registry_path.is_file():
        return {}
    try:
        registry = json.loads(registry_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{registry_path} line {error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(registry, dict):
        raise DataError(f"{registry_path}: expected an object mapping dataset names to their descriptions")
    return registry


def resolve_datasets(names: list[str], dataset_dir: str) -> list[DatasetSpec]:
    """Each name → a spec with a local file: a registry entry in dataset_dir, or a path to a data file."""
    directory = Path(dataset_dir)
    registry = load_registry(directory)
    specs = []
    for name in names:
        if name in registry:
            specs.append(_from_registry(name, registry[name], directory))
            continue
        path = Path(name).expanduser()
        if not path.exists() and (directory / name).exists():
            path = directory / name
        if path.is_file():
            specs.append(DatasetSpec(name=path.stem, file_name=str(path), path=path))
            continue
        known = ", ".join(sorted(registry)) if registry else f"none ({directory / REGISTRY_FILE} not found)"
        raise DataError(f"dataset {name!r} is neither in {directory / REGISTRY_FILE} nor a file; registered: {known}")
    return specs


def _from_registry(name: str, entry: dict[str, Any], directory: Path) -> DatasetSpec:
    try:
        spec = DatasetSpec(name=name, **{"formatting": "alpaca", **entry})  # LLaMA-Factory's default
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise DataError(f"{directory / REGISTRY_FILE} entry {name!r}: {problems}") from None
    if spec.ranking:
        raise DataError(
            f"dataset {name!r} is a preference dataset (ranking: true); preference training is not built yet"
        )
    if spec.file_name is None:
        where = spec.hf_hub_url or "a hub"
        raise DataError(f"dataset {name!r} lives on {where}; download it into {directory} and set its file_name")
    path = directory / spec.file_name
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(f"dataset {name!r}: folder {path} holds no .json or .jsonl file")
        path = files[0] if len(files) == 1 else path
    if not path.exists():
        raise DataError(f"dataset {name!r}: file {path} does not exist")
    return spec.model_copy(update={"path": path})
