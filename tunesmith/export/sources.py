"""Which model, adapters and tokenizer an export reads, found as `chat` finds them (model/resolve.py,
model/adapters.py): the adapters with any they were trained on top of, the base model the first one was trained on
unless model_name_or_path says otherwise, and the tokenizer of the last adapter directory that holds one (training
saves it there with the chat template it trained with), else the model's.

Whether each adapter fits the base is model/adapters.py's check, the one chat and training use, run on the base
model built on the meta device: its layers' shapes without any weight in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config.inference import InferenceConfig
from tunesmith.errors import ModelError
from tunesmith.model.adapters import (
    ADAPTER_WEIGHTS,
    check_adapter_dir,
    check_adapter_fits,
    recorded_base_model,
    saved_training_value,
    with_adapters_beneath,
)
from tunesmith.model.resolve import resolve_model, with_hub_weights


@dataclass(frozen=True)
class ExportSources:
    model_name: str  # as the user (or the adapter) named it
    model_dir: Path
    adapter_dirs: tuple[Path, ...]
    tokenizer_dir: Path
    qlora_adapters: tuple[Path, ...]  # adapters trained on a quantized base


def resolve_sources(inference: InferenceConfig) -> ExportSources:
    model = inference.model
    adapter_dirs = tuple(check_adapter_dir(name) for name in with_adapters_beneath(model.adapter_name_or_path or []))
    for path in adapter_dirs:
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ModelError(f"{path} has no {ADAPTER_WEIGHTS} (tunesmith merges safetensors adapters only)")
    model_name = model.model_name_or_path
    if not inference.model_given:
        model_name = recorded_base_model(adapter_dirs[0])
        if model_name is None:
            raise ModelError(
                f"cannot tell which model the adapter in {adapter_dirs[0]} was trained on; set model_name_or_path"
            )
    model_dir = Path(with_hub_weights(resolve_model(model_name, model.cache_dir)))
    with_tokenizer = [path for path in adapter_dirs if has_tokenizer(path)]
    tokenizer_dir = with_tokenizer[-1] if with_tokenizer else model_dir
    if not has_tokenizer(tokenizer_dir):
        raise ModelError(
            f"no tokenizer found: {model_dir} has no tokenizer_config.json"
            + (" and neither has any adapter directory" if adapter_dirs else "")
            + "; copy the tokenizer files of the base model there"
        )
    qlora = tuple(path for path in adapter_dirs if saved_training_value(path, "quantization_bit") is not None)
    return ExportSources(model_name, model_dir, adapter_dirs, tokenizer_dir, qlora)


def check_adapters_fit(sources: ExportSources, trust_remote_code: bool) -> None:
    """Refuse an adapter trained on another model (the message names both), before any weight is read."""
    if not sources.adapter_dirs:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(sources.model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    for adapter_dir in sources.adapter_dirs:
        check_adapter_fits(skeleton, adapter_dir, sources.model_name)


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file()
