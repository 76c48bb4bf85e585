"""Speed paths, decided before the model loads: the attention kernel, Liger's Triton kernels, Unsloth.

Each one is checked against the machine first, so that a config copied from a GPU tutorial fails in a second with
the reason and the fix, not after the weights have loaded.
"""

from __future__ import annotations

import importlib.util

import torch

from tunesmith.errors import ConfigError

# flash_attn values → transformers' attn_implementation ("disabled" is LLaMA-Factory's name for eager)
ATTENTION = {"fa2": "flash_attention_2", "sdpa": "sdpa", "eager": "eager", "disabled": "eager"}


def flash_attention_usable(dtype: torch.dtype) -> str | None:
    """None when FlashAttention-2 can run here, else why not."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install flash-attn --no-build-isolation)"
    if not torch.cuda.is_available():
        return "FlashAttention-2 runs only on NVIDIA GPUs and this machine has none"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"FlashAttention-2 needs bf16 or fp16 weights, and this run uses {dtype}"
    return None


def choose_attention(flash_attn: str, dtype: torch.dtype) -> str:
    """The `attn_implementation` for `flash_attn`: auto takes FlashAttention-2 where it runs, else PyTorch's sdpa."""
    if flash_attn == "auto":
        return "sdpa" if flash_attention_usable(dtype) else "flash_attention_2"
    if flash_attn == "fa2" and (reason := flash_attention_usable(dtype)):
        raise ConfigError(f"`flash_attn: fa2`: {reason}; use flash_attn: sdpa (or auto)")
    return ATTENTION[flash_attn]


def check_liger() -> None:
    """Liger's kernels are Triton GPU kernels: refuse them where they cannot run."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("`enable_liger_kernel: true` needs Liger: pip install liger-kernel (NVIDIA GPU only)")
    if not torch.cuda.is_available():
        raise ConfigError(
            "`enable_liger_kernel: true`: Liger's kernels are Triton GPU kernels and this machine has no CUDA GPU; "
            "remove the key (on CPU, chunked_loss already avoids the full logits, as Liger's fused cross-entropy does)"
        )


def check_unsloth() -> None:
    if not torch.cuda.is_available():
        raise ConfigError(
            "`use_unsloth: true`: Unsloth runs only on NVIDIA GPUs and this machine has none; remove the key"
        )
    if importlib.util.find_spec("unsloth") is None:
        raise ConfigError("`use_unsloth: true` needs Unsloth: pip install unsloth")


def load_with_unsloth(
    model_dir: str, dtype: torch.dtype, max_seq_length: int, quantization_bit: int | None, trust_remote_code: bool
):
    """The model through Unsloth's loader, which patches attention, RoPE, MLP and the loss with its own kernels.

    Its 4-bit loading is always nf4 with double quantization; the run config refuses other quantization keys.
    """
    check_unsloth()
    from unsloth import FastLanguageModel

    from tunesmith.model.resolve import with_hub_weights

    model, _ = FastLanguageModel.from_pretrained(
        model_name=with_hub_weights(model_dir),
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=quantization_bit == 4,
        load_in_8bit=quantization_bit == 8,
        trust_remote_code=trust_remote_code,
    )
    return model


# gradient_checkpointing (as decided for the run) → Unsloth's use_gradient_checkpointing; offload is Unsloth's own
UNSLOTH_CHECKPOINTING: dict[bool | str, bool | str] = {False: False, True: True, "offload": "unsloth"}


def apply_unsloth_lora(
    model,
    targets: list[str],
    rank: int,
    alpha: int,
    dropout: float,
    seed: int,
    *,
    use_rslora: bool,
    use_dora: bool,
    modules_to_save: list[str],
    checkpointing: bool | str,
):
    """Unsloth's own LoRA wrapping: a peft model with its fused LoRA kernels and its activation checkpointing.

    DoRA reaches peft's LoraConfig through Unsloth's keyword arguments (Unsloth then runs those layers unfused).
    """
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(
        model,
        r=rank,
        target_modules=targets,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        use_dora=use_dora,
        modules_to_save=modules_to_save or None,
        use_gradient_checkpointing=UNSLOTH_CHECKPOINTING[checkpointing],
        random_state=seed,
    )
