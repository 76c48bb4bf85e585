"""Datasets by name: LLaMA-Factory's `dataset_info.json` registry, a file or folder given by path, or the hub.

An entry takes LLaMA-Factory's fields: `file_name` (a file or a folder of files in dataset_dir) or `hf_hub_url`
(with `subset`, `folder`), `formatting` (alpaca, sharegpt, openai), `ranking`, `columns`, `tags`, `split` (Hugging
Face split syntax, e.g. `train[:2000]`), `num_samples`. An unknown field or column name is an error, so that a
typo is not silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunesmith.data.files import data_files
from tunesmith.data.formats import OPENAI_TAGS, Columns, RowFormat, ShareGPTTags
from tunesmith.data.selection import Split, parse_split
from tunesmith.errors import DataError

REGISTRY_FILE = "dataset_info.json"


class EntryColumns(BaseModel):
    """dataset_info.json `columns`: the file's column for each part of a row."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    query: str | None = None
    response: str | None = None
    history: str | None = None
    messages: str | None = None
    system: str | None = None
    tools: str | None = None
    images: str | None = None
    videos: str | None = None
    audios: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    kto_tag: str | None = None


class EntryTags(BaseModel):
    """dataset_info.json `tags`: the ShareGPT role and content keys and role values."""

    model_config = ConfigDict(extra="forbid")

    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str | None = None
    assistant_tag: str | None = None
    observation_tag: str | None = None
    function_tag: str | None = None
    system_tag: str | None = None


class RegistryEntry(BaseModel):
    """One entry of dataset_info.json (LLaMA-Factory's fields)."""

    model_config = ConfigDict(extra="forbid")

    file_name: str | None = None
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None
    cloud_file_name: str | None = None
    formatting: Literal["alpaca", "sharegpt", "openai"] | None = None  # None: alpaca, or detected for a path
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = Field(None, gt=0)
    columns: EntryColumns = Field(default_factory=EntryColumns)
    tags: EntryTags = Field(default_factory=EntryTags)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset named in the config, resolved: its entry, and its local files (none for a hub dataset)."""

    name: str
    entry: RegistryEntry
    split: Split
    files: tuple[Path, ...] = ()
    from_path: bool = False  # given as a file path: its format is detected from its first row
    media_dirs: tuple[Path, ...] = field(default=())

    @property
    def source(self) -> str:
        """The files, or the hub address: for messages."""
        if not self.files:
            return f"hf://{self.entry.hf_hub_url}"
        return str(self.files[0]) if len(self.files) == 1 else f"{self.files[0].parent} ({len(self.files)} files)"

    @property
    def natural_stage(self) -> str:
        """The training stage this dataset's rows are for: preference pairs, KTO labels, plain text or chat."""
        columns = self.entry.columns.model_dump(exclude_none=True)
        if self.entry.ranking:
            return "dpo"
        if "kto_tag" in columns:
            return "kto"
        if set(columns) == {"prompt"}:  # a text column only: pre-training text
            return "pt"
        return "sft"

    def row_format(self) -> RowFormat:
        """How to read the rows of a registry entry (a path's format is detected instead)."""
        entry = self.entry
        given = entry.columns.model_dump(exclude_none=True)
        formatting = entry.formatting or "alpaca"
        columns = replace(Columns(), **given, text=given.get("prompt", "text"))
        if formatting == "openai" and "messages" not in given:
            columns = replace(columns, messages="messages")
        base_tags = OPENAI_TAGS if formatting == "openai" else ShareGPTTags()
        tags = replace(base_tags, **entry.tags.model_dump(exclude_none=True))
        kind = "alpaca" if formatting == "alpaca" else "sharegpt"
        return RowFormat(kind, columns, tags, entry.ranking, self.media_dirs)


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
    """Each name → a spec: a registry entry in dataset_dir, or a path to a data file or folder."""
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
        if path.exists():
            entry = RegistryEntry(file_name=str(path))
            media_dirs = (directory, path.parent if path.is_file() else path)
            spec = DatasetSpec(path.stem, entry, Split("train"), tuple(data_files(path)), True, media_dirs)
            specs.append(spec)
            continue
        known = ", ".join(sorted(registry)) if registry else f"none ({directory / REGISTRY_FILE} not found)"
        raise DataError(f"dataset {name!r} is neither in {directory / REGISTRY_FILE} nor a file; registered: {known}")
    return specs


def _from_registry(name: str, raw: Any, directory: Path) -> DatasetSpec:
    where = f"{directory / REGISTRY_FILE} entry {name!r}"
    if not isinstance(raw, dict):
        raise DataError(f'{where}: expected an object such as {{"file_name": "data.json"}}')
    try:
        entry = RegistryEntry(**raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        known = ", ".join(RegistryEntry.model_fields)
        raise DataError(f"{where}: {problems} (the known fields are {known})") from None
    split = parse_split(entry.split, where)
    if entry.hf_hub_url:
        return DatasetSpec(name, entry, split, media_dirs=(directory,))
    if entry.file_name is None:
        hubs = [key for key in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if getattr(entry, key)]
        source = f" ({hubs[0]}: {getattr(entry, hubs[0])})" if hubs else ""
        raise DataError(
            f"{where}: no `file_name` or `hf_hub_url`{source}; tunesmith reads local files and the Hugging Face "
            f"hub; download the data into {directory} and set its file_name"
        )
    if split.name != "train":
        raise DataError(f"{where}: split {entry.split!r}; a local file has only the split `train` (e.g. train[:100])")
    path = directory / entry.file_name
    if not path.exists():
        raise DataError(f"dataset {name!r}: file {path} does not exist")
    return DatasetSpec(name, entry, split, tuple(data_files(path)), media_dirs=(directory,))
