"""The typed config of `tunesmith export`: LLaMA-Factory's merge YAML keys, validated before any weight loads.

`InferenceModelKeys` holds the keys that say which model to load (a base model, adapters on it, the chat template);
they are the same keys `chat` reads, kept in one small class so that a shared inference config can replace it.
`ExportConfig` adds the `export_*` keys. Unknown keys are refused with a suggestion.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tunesmith.config.load import parse_overrides, read_yaml
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


class InferenceModelKeys(Section):
    """Which model to load: the base, LoRA adapters on it, and the chat template (the keys `chat` reads too)."""

    model_name_or_path: str | None = Field(
        None,
        description="The base model (directory, .gguf file, hub id or alias), or the output_dir of a full or freeze "
        "run; default: the model the adapter was trained on.",
    )
    adapter_name_or_path: list[str] = Field(
        default_factory=list, description="LoRA adapter directories to merge, in order; comma-separated."
    )
    template: str | None = Field(
        None, description="A named chat template to save with the model; default: the one the run trained with."
    )
    finetuning_type: Literal["lora", "full", "freeze"] = Field(
        "lora", description="lora merges adapter_name_or_path; full/freeze export the run directory given as model."
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the tokenizer.")
    cache_dir: str | None = Field(None, description="Where converted models are cached (default ~/.cache/tunesmith).")
    quantization_bit: int | None = Field(
        None, description="Refused: adapters merge into the unquantized base (see the note printed for QLoRA)."
    )

    _split_adapters = field_validator("adapter_name_or_path", mode="before")(_split_list)

    @field_validator("quantization_bit")
    @classmethod
    def _no_quantized_merge(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError(
                "cannot merge adapters into a quantized model; remove quantization_bit: a QLoRA adapter merges onto "
                "the unquantized base"
            )
        return value

    @model_validator(mode="after")
    def _adapters_need_lora(self) -> InferenceModelKeys:
        if self.adapter_name_or_path and self.finetuning_type != "lora":
            raise ValueError(
                f"adapter_name_or_path is set but finetuning_type is {self.finetuning_type}; a {self.finetuning_type} "
                "run saves a whole model: pass its output_dir as model_name_or_path and no adapter"
            )
        if self.model_name_or_path is None and not self.adapter_name_or_path:
            raise ValueError("set model_name_or_path (a model or a full/freeze run dir) or adapter_name_or_path")
        return self


class ExportConfig(InferenceModelKeys):
    """Everything `tunesmith export` needs."""

    export_dir: str = Field(..., description="Where the exported model goes (written complete, then renamed).")
    export_size: int = Field(
        5 * 10**9,
        description="Largest safetensors shard: GB as a number (5, 0.2) or with a unit (200MB); default 5 (GB).",
    )
    export_device: Literal["cpu", "auto"] = Field(
        "cpu", description="Where merge arithmetic runs: cpu, or auto (the GPU when there is one)."
    )
    export_legacy_format: bool = Field(
        False, description="Pickle .bin weights: refused, tunesmith writes only safetensors (pickle can run code)."
    )
    export_hub_model_id: str | None = Field(None, description="Also upload the exported directory to this hub repo.")
    infer_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype written: auto keeps the model's, except float32 which becomes bfloat16."
    )
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


EXPORT_KEYS: tuple[str, ...] = tuple(ExportConfig.model_fields)


def load_export_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExportConfig:
    """A YAML file (LLaMA-Factory's merge YAML as it is) and `key=value` overrides → a validated ExportConfig."""
    values = dict(read_yaml(path)) if path is not None else {}
    values.update(parse_overrides(overrides))
    values = {str(key): value for key, value in values.items()}
    unknown = [key for key in values if key not in EXPORT_KEYS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, EXPORT_KEYS, n=2, cutoff=0.6)
            hints.append(f"`{key}`" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise ConfigError(f"unknown export key {', '.join(hints)}; export keys are: {', '.join(EXPORT_KEYS)}")
    try:
        return ExportConfig(**values)
    except ValidationError as error:
        raise ConfigError(
            "invalid export config: " + "; ".join(_describe(problem) for problem in error.errors())
        ) from None


def _describe(problem: Any) -> str:
    key = str(problem["loc"][0]) if problem["loc"] else ""
    message = problem["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
    if problem["type"] == "missing":
        return f"`{key}` is required" + (
            ": the directory to write the exported model to" if key == "export_dir" else ""
        )
    if key in EXPORT_KEYS:
        return f"`{key}`: got {problem['input']!r}; {message}"
    return message
