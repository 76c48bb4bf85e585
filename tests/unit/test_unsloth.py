"""`use_unsloth: true` honours every key or refuses it before loading.

Unsloth needs an NVIDIA GPU, so here a stand-in module takes its place: `FastLanguageModel` with Unsloth's
signatures (`from_pretrained(model_name, max_seq_length, dtype, load_in_4bit, load_in_8bit, trust_remote_code)`,
`get_peft_model(model, r, target_modules, lora_alpha, lora_dropout, use_gradient_checkpointing, random_state,
use_rslora, modules_to_save, **LoraConfig keys)`), built on transformers and peft, recording what it is given.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_train import train
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.model import kernels
from tunesmith.train import sft
from tunesmith.train.trainer import TunesmithTrainer


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pissa_init=true"], "`pissa_init` with `use_unsloth: true`: Unsloth's LoRA starts from its own"),
        (["quantization_bit=4", "quantization_type=fp4"], "`quantization_type` with `use_unsloth: true`: .* nf4"),
        (["quantization_bit=4", "double_quantization=false"], "`double_quantization` with `use_unsloth: true`"),
        (["flash_attn=sdpa"], "`flash_attn` with `use_unsloth: true`: Unsloth picks its own attention kernel"),
        (["enable_liger_kernel=true"], "`enable_liger_kernel` with `use_unsloth: true`: .* keep one"),
        (["adapter_name_or_path=runs/a"], "`adapter_name_or_path` with `use_unsloth: true`"),
        (["finetuning_type=full"], "`finetuning_type` with `use_unsloth: true`: .* not full"),
    ],
)
def test_keys_unsloth_cannot_honour_are_refused_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["dataset=identity", "use_unsloth=true", *overrides])


@pytest.fixture
def fake_unsloth(monkeypatch) -> dict[str, dict]:
    """Unsloth's API on transformers + peft; returns what each call received."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    received: dict[str, dict] = {}

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit, load_in_8bit, trust_remote_code):
            received["from_pretrained"] = {
                "model_name": model_name,
                "load_in_4bit": load_in_4bit,
                "load_in_8bit": load_in_8bit,
                "trust_remote_code": trust_remote_code,
            }
            return AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype), None

        @staticmethod
        def get_peft_model(model, use_gradient_checkpointing, random_state, **lora_keys):
            received["get_peft_model"] = {"use_gradient_checkpointing": use_gradient_checkpointing, **lora_keys}
            config = LoraConfig(task_type="CAUSAL_LM", **{"r": lora_keys.pop("r"), **lora_keys})
            return get_peft_model(model, config)

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FastLanguageModel))
    monkeypatch.setattr(kernels, "check_unsloth", lambda: None)  # it refuses a machine without CUDA
    monkeypatch.setattr(sft, "check_unsloth", lambda: None)
    return received


@pytest.fixture
def trainer_arguments(monkeypatch) -> list:
    created = []
    original_init = TunesmithTrainer.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(TunesmithTrainer, "__init__", recording_init)
    return created


def test_unsloth_receives_every_lora_key_and_checkpoints_alone(
    tmp_path, tiny_model_dir, identity_data, fake_unsloth, trainer_arguments, capsys
):
    output = train(
        tmp_path,
        tiny_model_dir,
        identity_data,
        "use_unsloth=true",
        "use_dora=true",
        "additional_target=lm_head",
        "use_rslora=true",
        "lora_dropout=0.1",
        "lora_target=q_proj,v_proj",
        "trust_remote_code=true",
        "gradient_checkpointing=true",
        "max_steps=2",
        "save_steps=2",
        "plot_loss=false",
    )
    assert fake_unsloth["from_pretrained"]["trust_remote_code"] is True
    lora = fake_unsloth["get_peft_model"]
    assert (lora["use_dora"], lora["use_rslora"], lora["lora_dropout"]) == (True, True, 0.1)
    assert (lora["modules_to_save"], sorted(lora["target_modules"])) == (["lm_head"], ["q_proj", "v_proj"])
    assert lora["use_gradient_checkpointing"] is True
    # Unsloth checkpoints the layers itself: Trainer must not wrap them a second time, nor offload around it.
    (trainer,) = trainer_arguments
    assert trainer.args.activation_checkpointing is False and trainer.offload_activations is False
    assert "attention: Unsloth's own" in capsys.readouterr().out
    adapter = load_file(output / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in name for name in adapter)  # DoRA trained
    assert any("lm_head" in name and "lora" not in name for name in adapter)  # lm_head saved whole
    assert all(torch.isfinite(tensor).all() for tensor in adapter.values())


@pytest.mark.parametrize(("setting", "expected"), [("false", False), ("offload", "unsloth")])
def test_gradient_checkpointing_reaches_unsloth(
    tmp_path, tiny_model_dir, identity_data, fake_unsloth, setting, expected
):
    train(
        tmp_path,
        tiny_model_dir,
        identity_data,
        "use_unsloth=true",
        f"gradient_checkpointing={setting}",
        "max_steps=1",
        "save_steps=1",
        "plot_loss=false",
    )
    assert fake_unsloth["get_peft_model"]["use_gradient_checkpointing"] == expected
