"""Load a tokenizer and a causal language model (in the dtype model/precision.py chose)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunesmith.errors import ModelError


def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_remote_code(model_dir, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelError(f"cannot load a tokenizer from {model_dir}: {error}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing token is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


REWARD_HEAD = "score"  # the one-output head of transformers' *ForSequenceClassification decoder models


def is_reward_model(model_dir: str, adapter_dirs: list[Path]) -> bool:
    """Whether these weights score text instead of generating it: a saved reward model (a sequence-classification
    model with one output), or an adapter trained as one (peft task SEQ_CLS)."""
    if adapter_dirs:
        return _read_json(Path(adapter_dirs[-1]) / "adapter_config.json").get("task_type") == "SEQ_CLS"
    config = _read_json(Path(model_dir) / "config.json")
    architectures = config.get("architectures") or []
    return bool(architectures) and all(name.endswith("ForSequenceClassification") for name in architectures)


def check_reward_model_form(model_dir: str, vision_language: bool) -> None:
    """Refuse, before loading, a model that transformers has no one-output sequence-classification form of."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if vision_language:
        raise ModelError(f"{model_dir} is a vision-language model; stage rm builds a reward model on a text model")
    config = _read_json(Path(model_dir) / "config.json")
    model_type = config.get("model_type")
    own_class = "AutoModelForSequenceClassification" in (config.get("auto_map") or {})
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not own_class:
        raise ModelError(
            f"{model_dir} (model_type {model_type}) has no sequence-classification form in transformers, which "
            "stage rm builds the reward model from; use a model of another architecture"
        )


def load_model(
    model_dir: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    quantization=None,
    attn_implementation: str | None = None,
    reward_pad_token_id: int | None = None,
):
    """The model in `dtype`; with `quantization` (a BitsAndBytesConfig) its linear layers are quantized as they load.

    `attn_implementation` is transformers' name of the attention kernel (sdpa, eager, flash_attention_2); None lets
    transformers choose. A vision-language model loads whole (vision tower, projector, language model).
    `reward_pad_token_id` (not None): a reward model, `AutoModelForSequenceClassification` with one output: the
    causal LM's body and a linear `score` head (new, unless the checkpoint is a reward model already) read at the
    last token that is not this padding token."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

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
    check_remote_code(model_dir, trust_remote_code)
    try:
        vision_language = vision_language_type(model_dir, trust_remote_code) is not None
        auto_class = AutoModelForImageTextToText if vision_language else AutoModelForCausalLM
        if reward_pad_token_id is not None:
            check_reward_model_form(model_dir, vision_language)
            auto_class = AutoModelForSequenceClassification
            load_options |= {"num_labels": 1, "pad_token_id": reward_pad_token_id}
        model = auto_class.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **load_options)
    except OSError as error:
        raise ModelError(f"cannot load a model from {model_dir}: {error}") from None
    if reward_pad_token_id is not None and not isinstance(getattr(model, REWARD_HEAD, None), torch.nn.Linear):
        raise ModelError(f"{model_dir}: its sequence-classification model has no `{REWARD_HEAD}` head to train")
    if quantization is not None:
        release_checkpoint_file(model)
    if hub_repo_id(model_dir) is not None:  # what is saved from it (adapter_config.json) names the hub id, not a cache
        model.name_or_path = model.config.name_or_path = hub_repo_id(model_dir)
    return model


_announced_remote_code: set[str] = set()


def check_remote_code(model_dir: str, trust_remote_code: bool) -> None:
    """Before transformers loads anything: refuse a model that needs its own Python code unless the config trusts
    it, and say whose code runs when it does, once per model: a pasted YAML may carry `trust_remote_code: true`
    unnoticed. A local directory that ships no code runs none, so nothing is said."""
    code = shipped_code(model_dir)
    if trust_remote_code:
        if model_dir not in _announced_remote_code:
            _announced_remote_code.add(model_dir)
            if code is None:
                print(f"trust_remote_code: true: Python code from {model_dir} will run on this machine if it ships any")
            elif code:
                print(f"trust_remote_code: true: Python code from {model_dir} will run on this machine: {code}")
        return
    if code and needs_own_code(model_dir):
        raise ModelError(
            f"{model_dir} needs its own Python code to load ({code}); read it, and if you trust it, set "
            "trust_remote_code: true"
        )


def shipped_code(model_dir: str) -> str | None:
    """The Python files a local model directory's `auto_map` (config.json, tokenizer_config.json) loads classes
    from, as one text ("modeling_phi3.py, configuration_phi3.py"); "" when none; None for a hub id not downloaded."""
    directory = Path(model_dir)
    if not directory.is_dir():
        return None
    files: dict[str, None] = {}  # ordered and unique
    for name in ("config.json", "tokenizer_config.json"):
        for reference in (_read_json(directory / name).get("auto_map") or {}).values():
            for class_path in reference if isinstance(reference, list) else [reference]:
                if isinstance(class_path, str):  # "module.Class", or "org/repo--module.Class" from another repo
                    repo, _, module_class = class_path.rpartition("--")
                    module = module_class.rpartition(".")[0]
                    files[f"{repo}: {module}.py" if repo else f"{module}.py"] = None
    return ", ".join(files)


def needs_own_code(model_dir: str) -> bool:
    """Whether transformers lacks a built-in class for the model or its tokenizer, so that only the shipped code
    can load it (transformers prefers its own class when it has one and the code is not trusted)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = _read_json(Path(model_dir) / "config.json")
    tokenizer_config = _read_json(Path(model_dir) / "tokenizer_config.json")
    model_needs = "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING
    tokenizer_class = tokenizer_config.get("tokenizer_class")
    tokenizer_needs = (
        "AutoTokenizer" in (tokenizer_config.get("auto_map") or {})
        and isinstance(tokenizer_class, str)
        and tokenizer_class_from_name(tokenizer_class) is None
    )
    return model_needs or tokenizer_needs


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ModelError(f"{path} is not valid JSON: {error}") from None
    return content if isinstance(content, dict) else {}


def release_checkpoint_file(model) -> None:
    """Copy the unquantized parameters (embeddings, norms) out of the memory-mapped checkpoint.

    safetensors maps the checkpoint file; quantizing reads every page of it, and while one parameter still points
    into the file, the whole mapping stays resident: SmolLM2 4-bit held 918 MiB, 621 MiB after this copy.
    """
    for parameter in model.parameters():
        if parameter.device.type == "cpu" and parameter.dtype.is_floating_point:  # quantized ones are copies already
            parameter.data = parameter.data.clone()
