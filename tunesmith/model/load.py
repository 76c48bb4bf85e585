"""Load a tokenizer and a causal language model, choosing the precision for the machine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.errors import ModelError


@dataclass(frozen=True)
class Precision:
    """How weights are stored and how the Trainer computes: float32 on a CPU, bfloat16 where a GPU has it."""

    dtype: torch.dtype
    bf16: bool
    fp16: bool
    note: str | None = None


def choose_precision(bf16: bool, fp16: bool) -> Precision:
    if not torch.cuda.is_available():
        asked = "bf16" if bf16 else "fp16" if fp16 else None
        note = (
            f"{asked}: true needs a GPU; this machine has none, so training runs in float32 on the CPU"
            if asked
            else None
        )
        return Precision(torch.float32, bf16=False, fp16=False, note=note)
    if fp16:
        return Precision(torch.float32, bf16=False, fp16=True)
    if torch.cuda.is_bf16_supported():
        return Precision(torch.bfloat16, bf16=True, fp16=False)
    return Precision(
        torch.float32, bf16=False, fp16=True, note="this GPU has no bfloat16, so fp16 mixed precision is used"
    )


def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelError(f"cannot load a tokenizer from {model_dir}: {error}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing token is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_chat_tokenizer(model_dir: str, template: str | None, trust_remote_code: bool = False):
    """The tokenizer set up to render and stop with the run's chat template (its own, or a named one)."""
    from tunesmith.data.templates import install_chat_format, resolve_chat_format

    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    chat_format = resolve_chat_format(template, tokenizer)
    install_chat_format(tokenizer, chat_format)
    return tokenizer, chat_format


def load_model(
    model_dir: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    quantization=None,
    attn_implementation: str | None = None,
):
    """The model in `dtype`; with `quantization` (a BitsAndBytesConfig) its linear layers are quantized as they load.

    `attn_implementation` is transformers' name of the attention kernel (sdpa, eager, flash_attention_2); None lets
    transformers choose."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model.quantize import prequantized_method, quantized_device_map
    from tunesmith.model.resolve import hub_repo_id, with_hub_weights

    model_dir = with_hub_weights(model_dir)  # a hub model's weights come after the data step
    load_options = {}
    if attn_implementation is not None:
        load_options["attn_implementation"] = attn_implementation
    if quantization is not None:
        load_options["quantization_config"] = quantization
    if quantization is not None or prequantized_method(model_dir) is not None:
        load_options["device_map"] = quantized_device_map()  # quantized weights are placed while loading
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **load_options
        )
    except OSError as error:
        raise ModelError(f"cannot load a model from {model_dir}: {error}") from None
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ModelError(
                f"{model_dir} ships its own Python code; if you trust it, set trust_remote_code: true"
            ) from None
        raise
    if quantization is not None:
        release_checkpoint_file(model)
    if hub_repo_id(model_dir) is not None:  # what is saved from it (adapter_config.json) names the hub id, not a cache
        model.name_or_path = model.config.name_or_path = hub_repo_id(model_dir)
    return model


def release_checkpoint_file(model) -> None:
    """Copy the unquantized parameters (embeddings, norms) out of the memory-mapped checkpoint.

    safetensors maps the checkpoint file; quantizing reads every page of it, and while one parameter still points
    into the file, the whole mapping stays resident: SmolLM2 4-bit held 918 MiB, 621 MiB after this copy.
    """
    for parameter in model.parameters():
        if parameter.device.type == "cpu" and parameter.dtype.is_floating_point:  # quantized ones are copies already
            parameter.data = parameter.data.clone()
