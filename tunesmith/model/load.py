"""Load a tokenizer and a causal language model (in the dtype model/precision.py chose)."""

from __future__ import annotations

import torch

from tunesmith.errors import ModelError


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
    return model


def release_checkpoint_file(model) -> None:
    """Copy the unquantized parameters (embeddings, norms) out of the memory-mapped checkpoint.

    safetensors maps the checkpoint file; quantizing reads every page of it, and while one parameter still points
    into the file, the whole mapping stays resident: SmolLM2 4-bit held 918 MiB, 621 MiB after this copy.
    """
    for parameter in model.parameters():
        if parameter.device.type == "cpu" and parameter.dtype.is_floating_point:  # quantized ones are copies already
            parameter.data = parameter.data.clone()
