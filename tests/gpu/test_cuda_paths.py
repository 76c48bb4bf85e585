"""The paths that only run on an NVIDIA GPU: bf16 mixed precision, FlashAttention-2, bitsandbytes 4-bit, Liger and
Unsloth, each a short training run of the tiny model. Marked `gpu`; skipped where CUDA is absent (and each optional
package's test where that package is not installed), so the CPU suite stays as it is."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import logged_losses
from tests.unit.test_quantization import run_keeping_model
from tests.unit.test_train import train_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
STEADY = ("max_steps=6", "save_steps=100", "lr_scheduler_type=constant")


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} is not installed")


def assert_trained(output, capsys) -> str:
    """The run used the GPU and its loss fell; returns what it printed."""
    out = capsys.readouterr().out
    assert "device cuda" in out, out[-2000:]
    losses = logged_losses(output)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    return out


def test_bf16_mixed_precision_lora_step(tmp_path, tiny_model_dir, identity_data, monkeypatch, capsys):
    """On a GPU with bf16 the base weights are bf16 and compute runs in bf16, while the trained LoRA weights stay
    fp32, so small updates are not rounded away."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    args = train_args(tmp_path, tiny_model_dir, identity_data, *STEADY, "bf16=true")
    model = run_keeping_model(monkeypatch, args)
    assert_trained(tmp_path / "out", capsys)
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.device.type == "cuda" and base.dtype == torch.bfloat16
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trained)


@needs("flash_attn")
def test_flash_attention_2_is_chosen_and_trains(tmp_path, tiny_model_dir, identity_data, monkeypatch, capsys):
    from tunesmith.model.kernels import choose_attention

    assert choose_attention("auto", torch.bfloat16) == "flash_attention_2"
    assert choose_attention("auto", torch.float32) == "sdpa"  # FlashAttention-2 has no fp32 kernels
    args = train_args(tmp_path, tiny_model_dir, identity_data, *STEADY, "bf16=true", "flash_attn=fa2")
    model = run_keeping_model(monkeypatch, args)
    out = assert_trained(tmp_path / "out", capsys)
    assert "attention: flash_attention_2" in out
    assert model.get_base_model().config._attn_implementation == "flash_attention_2"


@needs("bitsandbytes")
def test_qlora_4bit_on_cuda(tmp_path, wide_tiny_model_dir, identity_data, monkeypatch, capsys):
    import bitsandbytes as bnb

    args = train_args(tmp_path, wide_tiny_model_dir, identity_data, *STEADY, "quantization_bit=4")
    model = run_keeping_model(monkeypatch, args)
    assert_trained(tmp_path / "out", capsys)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.device.type == "cuda" and q_proj.weight.quant_state.quant_type == "nf4"


@needs("liger_kernel")
def test_liger_kernels_train(tmp_path, tiny_model_dir, identity_data, monkeypatch, capsys):
    args = train_args(tmp_path, tiny_model_dir, identity_data, *STEADY, "enable_liger_kernel=true")
    model = run_keeping_model(monkeypatch, args)
    assert_trained(tmp_path / "out", capsys)
    classes = {type(module).__name__ for module in model.modules()}
    assert any(name.startswith("Liger") for name in classes), sorted(classes)


@needs("unsloth")
def test_unsloth_lora_trains(tmp_path, tiny_model_dir, identity_data, monkeypatch, capsys):
    args = train_args(tmp_path, tiny_model_dir, identity_data, *STEADY, "use_unsloth=true")
    run_keeping_model(monkeypatch, args)
    assert_trained(tmp_path / "out", capsys)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
