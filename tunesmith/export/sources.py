"""Which model, adapters and tokenizer an export reads: the one place that turns the model keys into directories.

The adapter's base model comes from tunesmith's saved config in the adapter directory, else from peft's
adapter_config.json; the tokenizer from the last adapter directory that holds one (training saves the tokenizer with
the chat template it trained with there), else from the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunesmith.config import SAVED_CONFIG_FILE
from tunesmith.config.export import InferenceModelKeys
from tunesmith.errors import ModelError
from tunesmith.model.resolve import resolve_model


@dataclass(frozen=True)
class ExportSources:
    model_name: str  # as the user (or the adapter) named it
    model_dir: Path
    adapter_dirs: tuple[Path, ...]
    tokenizer_dir: Path
    adapter_bases: tuple[str | None, ...]  # the base each adapter says it was trained on
    qlora_adapters: tuple[Path, ...]  # adapters trained on a quantized base


def resolve_sources(keys: InferenceModelKeys) -> ExportSources:
    adapter_dirs = tuple(check_adapter_dir(name) for name in keys.adapter_name_or_path)
    bases = tuple(adapter_base_model(path) for path in adapter_dirs)
    model_name = keys.model_name_or_path or next((base for base in bases if base), None)
    if model_name is None:
        raise ModelError(
            f"cannot tell which model the adapter in {adapter_dirs[0]} was trained on; set model_name_or_path"
        )
    model_dir = local_model_dir(model_name, keys.cache_dir)
    with_tokenizer = [path for path in adapter_dirs if has_tokenizer(path)]
    tokenizer_dir = with_tokenizer[-1] if with_tokenizer else model_dir
    if not has_tokenizer(tokenizer_dir):
        raise ModelError(
            f"no tokenizer found: {model_dir} has no tokenizer_config.json"
            + (" and neither has any adapter directory" if adapter_dirs else "")
            + "; copy the tokenizer files of the base model there"
        )
    qlora = tuple(path for path in adapter_dirs if saved_training_key(path, "quantization_bit") is not None)
    return ExportSources(model_name, model_dir, adapter_dirs, tokenizer_dir, bases, qlora)


def local_model_dir(name: str, cache_dir: str | None) -> Path:
    resolved = resolve_model(name, cache_dir)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download  # a hub id: only its safetensors, configs and tokenizer

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
    return Path(snapshot_download(resolved, allow_patterns=patterns, cache_dir=cache_dir))


def check_adapter_dir(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelError(f"adapter directory {path} does not exist; pass the output_dir of a LoRA training run")
    if not (path / "adapter_config.json").is_file():
        if (path / "config.json").is_file():
            raise ModelError(
                f"{path} holds a full model, not an adapter; export it with model_name_or_path={path} "
                "finetuning_type=full and no adapter_name_or_path"
            )
        raise ModelError(f"{path} has no adapter_config.json; is it the output_dir of a LoRA training run?")
    if not (path / "adapter_model.safetensors").is_file():
        raise ModelError(f"{path} has no adapter_model.safetensors (tunesmith reads safetensors adapters only)")
    return path


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file()


def saved_training_key(directory: Path, key: str) -> object:
    """A key from the training config saved in `directory` (flat, or nested by section), or None."""
    config_file = directory / SAVED_CONFIG_FILE
    if not config_file.is_file():
        return None
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        return None
    if key in config:
        return config[key]
    sections = [value for value in config.values() if isinstance(value, dict)]
    return next((section[key] for section in sections if key in section), None)


def adapter_base_model(adapter_dir: Path) -> str | None:
    saved = saved_training_key(adapter_dir, "model_name_or_path")
    if saved:
        return str(saved)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return adapter_config.get("base_model_name_or_path") or None
