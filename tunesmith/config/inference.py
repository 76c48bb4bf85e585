"""The inference config: what a command that loads a model to generate takes (`chat` now; export, serve, predict and
eval share it as they come).

LLaMA-Factory's inference YAML works as it is (`model_name_or_path`, `adapter_name_or_path`, `template`,
`finetuning_type`, `infer_backend`, `infer_dtype`, `default_system`, the generation keys), with `key=value`
overrides on top. The model keys are the training config's `ModelSection`, so a model is named and loaded the same
way everywhere. A training key is refused with the reason, never ignored.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunesmith.config.load import (
    ALIASES,
    KEY_TO_SECTION,
    describe_validation_error,
    parse_overrides,
    read_yaml,
)
from tunesmith.config.sections import DataSection, GenerationSection, MethodSection, ModelSection, Section
from tunesmith.errors import ConfigError, NotSupportedYet


class PromptSection(Section):
    template: str | None = DataSection.model_fields["template"]
    default_system: str | None = Field(
        None, description="A system message that starts every conversation (LLaMA-Factory's default_system)."
    )
    enable_thinking: bool | None = Field(
        None,
        description="Passed to chat templates that read it (Qwen3): false asks for no thinking block; default: the "
        "template's own default.",
    )


class EngineSection(Section):
    infer_backend: Literal["huggingface", "vllm", "sglang", "ktransformers"] = Field(
        "huggingface",
        description="huggingface (transformers) everywhere; vllm for `tunesmith serve` on a GPU with vLLM installed. "
        "Each command checks that it has the backend (load_inference_config's `backends`).",
    )
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights' dtype for inference; auto: bfloat16 on a GPU that has it, else float32."
    )
    finetuning_type: Literal["lora", "full", "freeze"] = MethodSection.model_fields["finetuning_type"]


class InferenceConfig(BaseModel):
    """Everything a model-loading command needs, validated before anything loads."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSection = Field(default_factory=ModelSection)
    prompt: PromptSection = Field(default_factory=PromptSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    engine: EngineSection = Field(default_factory=EngineSection)

    @model_validator(mode="after")
    def _keys_that_only_training_uses(self) -> InferenceConfig:
        for key, reason in (
            ("use_unsloth", "Unsloth's loader is a training path"),
            ("enable_liger_kernel", "Liger's kernels speed up training"),
        ):
            if getattr(self.model, key):
                raise ValueError(f"`{key}: true`: {reason}; inference does not use it, remove the key")
        adapters = self.model.adapter_name_or_path or []
        if self.model.quantization_bit is not None and len(adapters) > 1:
            raise ValueError(
                f"`quantization_bit: {self.model.quantization_bit}` takes one adapter: merging the others into "
                "quantized weights would round their change to the quantization grid; remove quantization_bit or "
                "give one adapter"
            )
        if adapters and self.engine.finetuning_type != "lora":
            raise ValueError(
                f"`adapter_name_or_path` is a LoRA adapter, but finetuning_type is {self.engine.finetuning_type}; "
                "a full or freeze run saved a whole model: give it as model_name_or_path"
            )
        return self

    @property
    def model_given(self) -> bool:
        """Whether model_name_or_path was set (else an adapter's own base model is used)."""
        return "model_name_or_path" in self.model.model_fields_set


INFERENCE_SECTIONS: dict[str, type[Section]] = {
    name: field.annotation for name, field in InferenceConfig.model_fields.items()
}
INFERENCE_KEYS: dict[str, str] = {
    key: name for name, section in INFERENCE_SECTIONS.items() for key in section.model_fields
}

# Keys with another name here: the training config's aliases that name an inference key, and LLaMA-Factory's.
INFERENCE_ALIASES: dict[str, str] = {
    **{alias: key for alias, key in ALIASES.items() if key in INFERENCE_KEYS},
    "system": "default_system",
}
# Keys a LLaMA-Factory user may carry over that have no meaning here, with the reason and what to use instead.
NOT_FOR_INFERENCE: dict[str, str] = {
    "max_length": "it counts the prompt too; give max_new_tokens, the reply's length",
    "create_new_adapter": "it is a training key; inference applies every adapter in adapter_name_or_path",
}


def build_inference_config(values: Mapping[str, Any], backends: tuple[str, ...] = ("huggingface",)) -> InferenceConfig:
    """Flat `key: value` pairs → InferenceConfig; each error names the key, the bad value and what would be valid.
    `backends`: the values of infer_backend the calling command implements."""
    by_section: dict[str, dict[str, Any]] = {name: {} for name in INFERENCE_SECTIONS}
    for raw_key, value in values.items():
        key = INFERENCE_ALIASES.get(raw_key, raw_key)
        if key in NOT_FOR_INFERENCE:
            raise ConfigError(f"`{key}` is not used for inference: {NOT_FOR_INFERENCE[key]}")
        if key not in INFERENCE_KEYS:
            if key in KEY_TO_SECTION:
                raise ConfigError(
                    f"`{key}` is a training key, which inference does not use; remove it (an inference config takes "
                    "model_name_or_path, adapter_name_or_path, template and the generation keys)"
                )
            close = difflib.get_close_matches(
                key, [*INFERENCE_KEYS, *INFERENCE_ALIASES, *NOT_FOR_INFERENCE], n=3, cutoff=0.6
            )
            hint = f"; did you mean {', '.join(close)}?" if close else f"; the keys are: {', '.join(INFERENCE_KEYS)}"
            raise ConfigError(f"unknown inference key `{key}`{hint}")
        by_section[INFERENCE_KEYS[key]][key] = value
    try:
        config = InferenceConfig(**by_section)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, INFERENCE_KEYS)) from None
    backend = config.engine.infer_backend
    if backend not in backends:
        where = "only `tunesmith serve` has it" if backend == "vllm" else "tunesmith generates with transformers"
        raise NotSupportedYet(
            f"`infer_backend: {backend!r}` is not supported yet by this command ({where}); "
            f"use {' or '.join(repr(name) for name in backends)}"
        )
    return config


def load_inference_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    backends: tuple[str, ...] = ("huggingface",),
) -> InferenceConfig:
    """A YAML file (optional), then `key=value` overrides, then command-line flags (already keyed by config key).
    `backends`: the values of infer_backend the calling command implements."""
    values = _flat(read_yaml(path)) if path is not None else {}
    values.update(_flat(parse_overrides(overrides)))
    values.update(flags or {})
    return build_inference_config(values, backends)


def _flat(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Keys nested under a section name (`generation: {temperature: 0}`) → flat keys."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in INFERENCE_SECTIONS and isinstance(value, Mapping):
            flat.update({str(inner): inner_value for inner, inner_value in value.items()})
        else:
            flat[str(key)] = value
    return flat
