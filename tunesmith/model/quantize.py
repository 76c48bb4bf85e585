"""Quantized base weights for LoRA training: bitsandbytes 4-bit (QLoRA) and 8-bit, or a model already in GPTQ/AWQ.

Configured exactly as the QLoRA and Alpaca-LoRA recipes do by hand: `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...)` or `load_in_8bit=True`, then
`peft.prepare_model_for_kbit_training`. The saved adapter holds only LoRA weights, so it loads onto the unquantized
base model as well.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from tunesmith.errors import ModelError

# quant_method in a model's config.json → the packages transformers needs to load it
PREQUANTIZED_PACKAGES = {"gptq": ["optimum", "gptqmodel"], "awq": ["gptqmodel", "accelerate"]}
BNB_BLOCKSIZE = 64  # bitsandbytes' 4-bit block size; its CPU kernels need each input dimension to be at least this


def bitsandbytes_config(
    bits: int, quant_type: str, double_quant: bool, compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None
):
    """`quant_storage`: the dtype packed 4-bit weights are stored in (default uint8). FSDP shards them only when it
    is the floating dtype of the other parameters (FSDP + QLoRA)."""
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("quantization_bit needs bitsandbytes: pip install bitsandbytes")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
    )


def prequantized_method(model_dir: str) -> str | None:
    """The quant_method recorded in a model directory's config.json (gptq, awq, ...), or None."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None
    quantization = json.loads(config_file.read_text()).get("quantization_config")
    return str(quantization.get("quant_method", "unknown")) if isinstance(quantization, dict) else None


def check_prequantized(method: str, model_dir: str) -> None:
    """A model saved quantized loads only with its library; say which to install before transformers fails."""
    packages = PREQUANTIZED_PACKAGES.get(method)
    if packages is None:
        raise ModelError(
            f"{model_dir} is quantized with {method}, which tunesmith does not train; "
            f"use the unquantized model (with quantization_bit: 4 for QLoRA) or a gptq/awq one"
        )
    missing = [package for package in packages if importlib.util.find_spec(package) is None]
    if missing:
        raise ModelError(f"{model_dir} is quantized with {method}; loading it needs: pip install {' '.join(missing)}")


def quantized_device_map() -> dict[str, int | str]:
    """Quantized weights are placed while loading: this process's GPU (torchrun's LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def check_cpu_4bit_shapes(model) -> None:
    """bitsandbytes' CPU 4-bit kernels fail mid-forward on inputs narrower than a block; fail early instead."""
    if torch.cuda.is_available():
        return
    from bitsandbytes.nn import Linear4bit

    narrow = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, Linear4bit) and module.in_features < BNB_BLOCKSIZE
        }
    )
    if narrow:
        raise ModelError(
            f"4-bit on the CPU needs layers at least {BNB_BLOCKSIZE} wide; {', '.join(narrow)} are narrower. "
            "Use quantization_bit: 8 or no quantization for this model"
        )


def prepare_for_kbit_training(model):
    """peft's preparation: freeze the base, keep norms and embeddings in float32, let inputs carry gradients.

    Gradient checkpointing is left to the training settings rather than switched on here.
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def quantization_for(
    model_dir: str,
    bits: int | None,
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
    quant_storage: torch.dtype | None = None,
):
    """The BitsAndBytesConfig to load `model_dir` with, or None (no quantization, or already quantized on disk)."""
    existing = prequantized_method(model_dir)
    if existing is not None:
        if bits is not None:
            raise ModelError(
                f"{model_dir} is already quantized with {existing}; remove quantization_bit to train LoRA on it"
            )
        check_prequantized(existing, model_dir)
        return None
    if bits is None:
        return None
    return bitsandbytes_config(bits, quant_type, double_quant, compute_dtype, quant_storage)
