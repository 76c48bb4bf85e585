"""The typed config of `tunesmith export`: LLaMA-Factory's merge YAML keys, validated before any weight loads.

Which model to export (model_name_or_path, adapter_name_or_path, template, finetuning_type, infer_dtype,
trust_remote_code, cache_dir) is the inference config's (config/inference.py), so a model is named the same way as
for `chat`; `ExportSection` adds the `export_*` keys. An inference key that means nothing to export (a generation
setting, a loading option) is refused with the reason, never ignored, as are unknown keys (with a suggestion).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunesmith.config.inference import (
    INFERENCE_ALIASES,
    INFERENCE_KEYS,
    InferenceConfig,
    _flat,
    build_inference_config,
)
from tunesmith.config.load import describe_validation_error, parse_overrides, read_yaml
from tunesmith.config.sections import Section, _split_list, planned
from tunesmith.errors import ConfigError

# GGUF types the gguf library can write by itself; K-quants need llama.cpp's llama-quantize.
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
GGUF_K_QUANTS: tuple[str, ...] = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")

SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """`5` or `0.2` (GB), `"200MB"`, `"1.5GB"`, `"512MiB"` → bytes. GB is 10^9 bytes, as in `max_shard_size`."""
    if isinstance(value, bool):
        raise ValueError("expected a size: a number of GB (2, 0.2) or text with a unit (200MB, 1.5GB)")
    if isinstance(value, int | float):
        number, unit = float(value), "g"
    else:
        match = SIZE.match(str(value))
        if match is None:
            raise ValueError("expected a size: a number of GB (2, 0.2) or text with a unit (200MB, 1.5GB)")
        number, unit = float(match.group(1)), (match.group(2) or "g").lower()
    power = "kmgt".index(unit[0]) + 1
    scale = 1024**power if "i" in unit else 1000**power
    size = int(number * scale)
    if size <= 0:
        raise ValueError("must be larger than 0")
    return size


class ExportSection(Section):
    """Where and how the exported model is written."""

    export_dir: str = Field(..., description="Where the exported model goes (written complete, then renamed).")
    export_size: int = Field(
        5 * 10**9,
        description="Largest safetensors shard: GB as a number (5, 0.2) or with a unit (200MB); default 5 (GB).",
    )
    export_device: Literal["cpu", "auto"] = Field(
        "cpu", description="Where merge arithmetic runs: cpu, or auto (the GPU when there is one)."
    )
    export_legacy_format: bool = Field(
        False,
        description="Pickle .bin weights: true is refused (tunesmith writes only safetensors; pickle can run code), "
        "so false, the only value, needs no code.",
    )
    export_hub_model_id: str | None = Field(None, description="Also upload the exported directory to this hub repo.")
    export_gguf: list[str] = Field(
        default_factory=list,
        description=f"Also write <export_dir>/<name>-<type>.gguf for each type: {', '.join(GGUF_TYPES)} "
        "(K-quants such as q4_k_m need llama-quantize on PATH); comma-separated.",
    )
    export_num_ctx: int | None = Field(
        None, gt=0, description="Ollama Modelfile num_ctx; default: the model's max_position_embeddings."
    )
    export_quantization_bit: int | None = planned(None, "GPTQ export is not built; export GGUF q4_0/q8_0 instead")
    export_quantization_dataset: str | None = planned(None, "GPTQ export is not built")
    export_quantization_nsamples: int = planned(128, "GPTQ export is not built")
    export_quantization_maxlen: int = planned(1024, "GPTQ export is not built")

    _split_gguf = field_validator("export_gguf", mode="before")(_split_list)

    @field_validator("export_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("export_legacy_format")
    @classmethod
    def _no_pickle(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "tunesmith writes safetensors only (pickle .bin files can run code when loaded); remove the key"
            )
        return value

    @field_validator("export_gguf")
    @classmethod
    def _known_gguf_types(cls, value: list[str]) -> list[str]:
        lowered = [item.lower() for item in value]
        unknown = [item for item in lowered if item not in GGUF_TYPES and item not in GGUF_K_QUANTS]
        if unknown:
            raise ValueError(
                f"unknown GGUF type {', '.join(unknown)}; use {', '.join(GGUF_TYPES)} "
                f"(or a K-quant: {', '.join(GGUF_K_QUANTS)})"
            )
        return list(dict.fromkeys(lowered))


class ExportConfig(BaseModel):
    """Everything `tunesmith export` needs: which model (the inference keys) and where it goes."""

    model_config = ConfigDict(extra="forbid")

    inference: InferenceConfig
    export: ExportSection


# The inference keys export reads; infer_dtype is the dtype written (auto: the model's, float32 becomes bfloat16).
USED_INFERENCE_KEYS = (
    "model_name_or_path",
    "adapter_name_or_path",
    "template",
    "finetuning_type",
    "infer_dtype",
    "trust_remote_code",
    "cache_dir",
)
EXPORT_KEYS: tuple[str, ...] = (*USED_INFERENCE_KEYS, *ExportSection.model_fields)
# Inference keys that export refuses, and why.
NOT_FOR_EXPORT = {
    "model": "export reads the weights without loading the model to run it",
    "prompt": "export saves the chat template the run trained with (set `template` to save another)",
    "generation": "export generates nothing",
    "engine": "export runs no inference engine",
}


def build_export_config(values: Mapping[str, Any]) -> ExportConfig:
    """Flat `key: value` pairs → ExportConfig; each error names the key, the bad value and what would be valid."""
    export_values: dict[str, Any] = {}
    inference_values: dict[str, Any] = {}
    for key, value in values.items():
        if key in ExportSection.model_fields:
            export_values[key] = value
            continue
        name = INFERENCE_ALIASES.get(key, key)
        if name not in INFERENCE_KEYS:
            close = difflib.get_close_matches(key, EXPORT_KEYS, n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown export key `{key}`{hint}; export keys are: {', '.join(EXPORT_KEYS)}")
        if name == "quantization_bit" and value is not None:
            raise ConfigError(
                f"`quantization_bit: {value}`: cannot merge adapters into a quantized model; remove "
                "quantization_bit: a QLoRA adapter merges onto the unquantized base (the note printed says so)"
            )
        if name not in USED_INFERENCE_KEYS:
            raise ConfigError(f"`{key}` is not used by export: {NOT_FOR_EXPORT[INFERENCE_KEYS[name]]}; remove it")
        inference_values[key] = value
    inference = build_inference_config(inference_values)
    if not inference.model_given and not inference.model.adapter_name_or_path:
        raise ConfigError("set model_name_or_path (a model or a full/freeze run dir) or adapter_name_or_path")
    try:
        export = ExportSection(**export_values)
    except ValidationError as error:
        keys = dict.fromkeys(ExportSection.model_fields, "export")
        raise ConfigError(describe_validation_error(error, keys)) from None
    return ExportConfig(inference=inference, export=export)


def load_export_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExportConfig:
    """A YAML file (LLaMA-Factory's merge YAML as it is) and `key=value` overrides → a validated ExportConfig."""
    values = _flat(read_yaml(path)) if path is not None else {}
    values.update(_flat(parse_overrides(overrides)))
    return build_export_config(values)
