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


def load_chat_tokenizer(model_dir: str, template: str | None, trust_remote_code: bool = False, processor=None):
    """The tokenizer set up to render and stop with the run's chat template (its own, or a named one).

    With a vision-language model's `processor`, its own chat template, which renders image parts."""
    from tunesmith.data.templates import install_chat_format, resolve_chat_format

    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    if processor is not None:
        if template is not None:
            print(f"note: template: {template} is not used; a vision-language model renders with its own template")
            template = None
        tokenizer.chat_template = processor.chat_template or tokenizer.chat_template
    chat_format = resolve_chat_format(template, tokenizer)
    install_chat_format(tokenizer, chat_format)
    return tokenizer, chat_format


def vision_language_type(model_dir: str, trust_remote_code: bool = False) -> str | None:
    """The model type (qwen2_vl, llava, gemma3, ...) of a model that reads images and text; None for a text model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        model_type = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code).model_type
    except OSError as error:
        raise ModelError(f"cannot read the model config in {model_dir}: {error}") from None
    return model_type if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES else None


def load_processor(model_dir: str, trust_remote_code: bool = False):
    """A vision-language model's `AutoProcessor` (image processor, image token, chat template); None for text models."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    model_type = vision_language_type(model_dir, trust_remote_code)
    if model_type is None:
        return None
    if model_type in ("qwen2_vl", "qwen2_5_vl") and not is_torchvision_available():
        raise ModelError(f"{model_type}'s processor (in transformers) needs torchvision: pip install torchvision")
    try:
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelError(f"cannot load the processor of {model_dir}: {error}") from None
    if getattr(processor, "image_processor", None) is None or getattr(processor, "image_token", None) is None:
        raise ModelError(
            f"{model_dir} is a vision-language model ({model_type}), but it has no image processor with an image "
            "token (preprocessor_config.json / processor_config.json); copy the processor files from the model's hub "
            "repository into it"
        )
    return processor


def load_model(
    model_dir: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    quantization=None,
    attn_implementation: str | None = None,
):
    """The model in `dtype`; with `quantization` (a BitsAndBytesConfig) its linear layers are quantized as they load.

    `attn_implementation` is transformers' name of the attention kernel (sdpa, eager, flash_attention_2); None lets
    transformers choose. A vision-language model loads whole (vision tower, projector, language model)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from tunesmith.model.quantize import prequantized_method, quantized_device_map

    load_options = {}
    if attn_implementation is not None:
        load_options["attn_implementation"] = attn_implementation
    if quantization is not None:
        load_options["quantization_config"] = quantization
    if quantization is not None or prequantized_method(model_dir) is not None:
        load_options["device_map"] = quantized_device_map()  # quantized weights are placed while loading
    try:
        vision_language = vision_language_type(model_dir, trust_remote_code) is not None
        auto_class = AutoModelForImageTextToText if vision_language else AutoModelForCausalLM
        model = auto_class.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **load_options)
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
