"""Issue-5 training options on the tiny model: each one changes what it should, or fails with a clear message."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import logged_losses
from tests.unit.test_train import train, train_args
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.model.kernels import choose_attention
from tunesmith.train import trainer as trainer_module
from tunesmith.train.trainer import TunesmithTrainer

SHORT = ("max_steps=3", "save_steps=3", "plot_loss=false", "gradient_checkpointing=false")


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves for backward that reach this (outermost) hook."""

    def __init__(self) -> None:
        self.bytes = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            self.bytes += tensor.numel() * tensor.element_size()
            return tensor

        super().__init__(pack, lambda tensor: tensor)


def test_gradient_checkpointing_saves_less_for_backward_and_offload_takes_the_rest(
    tmp_path, tiny_model_dir, identity_data, monkeypatch
):
    saved: dict[str, list[int]] = {}
    original_step = TunesmithTrainer.training_step

    def counting_step(self, model, inputs, num_items_in_batch=None):
        counter = SavedTensorBytes()
        with counter:
            result = original_step(self, model, inputs, num_items_in_batch)
        saved.setdefault(self.args.output_dir, []).append(counter.bytes)
        return result

    monkeypatch.setattr(TunesmithTrainer, "training_step", counting_step)
    common = ("max_steps=3", "save_steps=3", "plot_loss=false", "finetuning_type=full", "learning_rate=1e-3")
    runs = {
        setting: train(
            tmp_path, tiny_model_dir, identity_data, *common, f"gradient_checkpointing={setting}", output=out
        )
        for setting, out in (("false", "off"), ("true", "on"), ("offload", "offload"))
    }
    off, on, offload = (saved[str(runs[setting])] for setting in ("false", "true", "offload"))
    assert min(off) > 0 and max(on) < min(off) / 2, (off, on)  # the layers' insides are recomputed, not kept
    assert max(offload) == 0, offload  # everything saved went through save_on_cpu
    assert logged_losses(runs["true"]) == pytest.approx(logged_losses(runs["false"]), abs=1e-5)
    assert logged_losses(runs["offload"]) == pytest.approx(logged_losses(runs["false"]), abs=1e-5)


def test_gradient_checkpointing_auto_decides_from_the_estimate(tmp_path, tiny_model_dir, identity_data, capsys):
    train(tmp_path, tiny_model_dir, identity_data, "max_steps=1", "gradient_checkpointing=auto", output="auto")
    printed = capsys.readouterr().out
    assert "gradient checkpointing: off (auto)" in printed  # a tiny model fits in any machine's memory
    assert "GiB is free" in printed


def test_llamafactory_disable_gradient_checkpointing_means_false():
    assert load_config(None, ["dataset=x", "disable_gradient_checkpointing=true"]).train.gradient_checkpointing is False
    assert load_config(None, ["dataset=x", "disable_gradient_checkpointing=false"]).train.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="expected auto, true, false or offload"):
        load_config(None, ["dataset=x", "gradient_checkpointing=sometimes"])


def test_neftune_puts_noise_on_the_embeddings_while_training(tmp_path, tiny_model_dir, identity_data):
    plain = logged_losses(train(tmp_path, tiny_model_dir, identity_data, *SHORT, output="plain"))
    noisy_run = train(tmp_path, tiny_model_dir, identity_data, *SHORT, "neftune_noise_alpha=50", output="noisy")
    noisy = logged_losses(noisy_run)
    assert all(torch.isfinite(torch.tensor(noisy)))
    assert abs(noisy[0] - plain[0]) > 1e-4  # the very first forward already saw noise


@pytest.fixture
def optimizers(monkeypatch) -> list:
    """Every optimizer TunesmithTrainer creates in this test, to look at after training."""
    created = []
    original = TunesmithTrainer.create_optimizer

    def recording(self, model=None):
        optimizer = original(self, model)
        if not created or created[-1] is not optimizer:
            optimizer.parameter_names = {id(p): name for name, p in self.model.named_parameters()}
            created.append(optimizer)
        return optimizer

    monkeypatch.setattr(TunesmithTrainer, "create_optimizer", recording)
    return created


def test_loraplus_gives_the_b_matrices_a_larger_learning_rate(tmp_path, tiny_model_dir, identity_data, optimizers):
    output = train(tmp_path, tiny_model_dir, identity_data, *SHORT, "learning_rate=1e-3", "loraplus_lr_ratio=16")
    assert logged_losses(output)
    optimizer = optimizers[0]
    rates = {"lora_A": set(), "lora_B": set()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name = optimizer.parameter_names[id(parameter)]
            rates["lora_B" if "lora_B" in name else "lora_A"].add(group["initial_lr"])
    assert sorted(rates["lora_B"]) == pytest.approx([16e-3]) and sorted(rates["lora_A"]) == pytest.approx([1e-3])


def test_pissa_adapter_is_saved_relative_to_the_original_base(tmp_path, tiny_model_dir, identity_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = train(tmp_path, tiny_model_dir, identity_data, *SHORT, "pissa_init=true", "lora_target=q_proj")
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 16  # the difference to the initial factors: rank 2r

    # What training saw: residual base (W - s·B0A0) plus the trained factors (checkpoint-3, before conversion).
    initial = load_file(output / "pissa_init" / "adapter_model.safetensors")
    trained = load_file(output / "checkpoint-3" / "adapter_model.safetensors")
    scaling = 16 / 8
    original = load_file(tiny_model_dir / "model.safetensors")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), output)
    merged = merged.merge_and_unload().state_dict()
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        a0, b0 = initial[f"{prefix}.lora_A.weight"], initial[f"{prefix}.lora_B.weight"]
        a, b = trained[f"{prefix}.lora_A.weight"], trained[f"{prefix}.lora_B.weight"]
        weight = original[f"model.layers.{layer}.self_attn.q_proj.weight"]
        expected = weight - scaling * b0 @ a0 + scaling * b @ a
        torch.testing.assert_close(merged[f"model.layers.{layer}.self_attn.q_proj.weight"], expected, atol=1e-5, rtol=0)
        assert (b - b0).abs().max() > 1e-4  # it trained


def test_additional_target_trains_and_saves_the_whole_module(tmp_path, tiny_model_dir, identity_data):
    output = train(tmp_path, tiny_model_dir, identity_data, *SHORT, "modules_to_save=norm")
    adapter = load_file(output / "adapter_model.safetensors")
    (norm,) = [name for name in adapter if name.endswith("model.norm.weight")]
    before = load_file(tiny_model_dir / "model.safetensors")["model.norm.weight"]
    assert (adapter[norm] - before).abs().max() > 1e-4


def test_adamw_8bit_keeps_optimizer_state_in_8_bits(tmp_path, wide_tiny_model_dir, identity_data, optimizers):
    # (save_steps beyond the run: writing a checkpoint hands bitsandbytes state back de-quantized)
    settings = ("finetuning_type=full", "optim=adamw_8bit", "save_steps=100")
    output = train(tmp_path, wide_tiny_model_dir, identity_data, *SHORT, *settings)
    state_dtypes = {entry["state1"].dtype for entry in optimizers[0].state.values()}
    assert torch.uint8 in state_dtypes  # bitsandbytes' quantized moments (large tensors; small ones stay fp32)
    assert logged_losses(output)[-1] < logged_losses(output)[0]


@pytest.mark.skipif(importlib.util.find_spec("galore_torch") is None, reason='pip install -e ".[galore]"')
def test_galore_projects_the_gradients_of_full_training(tmp_path, tiny_model_dir, identity_data, optimizers):
    settings = ("finetuning_type=full", "use_galore=true", "galore_rank=4", "learning_rate=1e-3")
    output = train(tmp_path, tiny_model_dir, identity_data, *SHORT, *settings)
    assert type(optimizers[0]).__module__.startswith("galore_torch")
    projected = [group for group in optimizers[0].param_groups if "rank" in group]
    assert projected and projected[0]["rank"] == 4
    assert logged_losses(output)[-1] < logged_losses(output)[0]


def test_empty_cache_steps_reach_the_trainer(tmp_path, tiny_model_dir, identity_data, monkeypatch):
    import transformers.trainer

    calls = []
    monkeypatch.setattr(transformers.trainer, "clear_device_cache", lambda *a, **k: calls.append(1))
    train(tmp_path, tiny_model_dir, identity_data, *SHORT, "max_steps=4", "torch_empty_cache_steps=2")
    assert len(calls) == 2  # after steps 2 and 4


@pytest.mark.parametrize("chunked_loss", ["true", "false"])
def test_torch_compile_captures_the_model_and_trains_the_same(
    tmp_path, tiny_model_dir, identity_data, monkeypatch, chunked_loss
):
    import torch._dynamo

    from tunesmith.train import sft

    monkeypatch.setattr(sft, "COMPILE_BACKEND", "eager")  # inductor's code generation takes minutes on 2 cores
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    settings = (*SHORT, f"chunked_loss={chunked_loss}")
    plain = logged_losses(train(tmp_path, tiny_model_dir, identity_data, *settings, output="plain"))
    compiled = train(tmp_path, tiny_model_dir, identity_data, *settings, "torch_compile=true", output="compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo really captured graphs
    assert logged_losses(compiled) == pytest.approx(plain, abs=1e-5)


@pytest.mark.parametrize(("setting", "expected"), [("auto", "sdpa"), ("sdpa", "sdpa"), ("disabled", "eager")])
def test_attention_choice_on_this_cpu(tmp_path, tiny_model_dir, identity_data, capsys, setting, expected):
    assert choose_attention(setting, torch.float32) == expected
    train(tmp_path, tiny_model_dir, identity_data, *SHORT, "max_steps=1", f"flash_attn={setting}")
    assert f"attention: {expected}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["flash_attn=fa2"], "flash_attn: fa2`: .*(flash-attn|NVIDIA)"),
        (["enable_liger_kernel=true"], "(pip install liger-kernel|no CUDA GPU)"),
        (["use_unsloth=true"], "Unsloth runs only on NVIDIA GPUs"),
        (["additional_target=norms"], "norms is not a module of this model; modules outside"),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")
def test_settings_this_machine_or_model_cannot_honour_fail_with_the_reason(
    tmp_path, tiny_model_dir, identity_data, capsys, overrides, message
):
    assert main(train_args(tmp_path, tiny_model_dir, identity_data, *SHORT, *overrides)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["finetuning_type=full", "loraplus_lr_ratio=16"], "loraplus_lr_ratio needs finetuning_type: lora"),
        (["finetuning_type=full", "additional_target=norm"], "additional_target needs finetuning_type: lora"),
        (["use_galore=true"], "use_galore projects the gradients of full weights"),
        (["pissa_init=true", "quantization_bit=4"], "pissa_init .* needs the weights unquantized"),
        (["deepspeed=ds_z2_offload", "optim=adamw_8bit"], "names its own optimizer.*optim: adamw_8bit"),
        (["deepspeed=ds_z3", "pissa_init=true"], "not under ZeRO-3"),
        (["pissa_init=true", "use_dora=true"], "choose one"),
    ],
)
def test_options_that_cannot_work_together_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["dataset=identity", *overrides])


def test_chunked_loss_swaps_the_forward_back_afterwards():
    """The DDP/DeepSpeed path swaps the inner model's forward for one call; an instance forward set before (as
    accelerate's autocast wrapper is) comes back."""
    model = torch.nn.Linear(2, 2)
    with trainer_module._forward_computes_chunked_loss(model, None):
        assert "forward" in vars(model)
    assert "forward" not in vars(model)
    model.forward = own = lambda x: x
    with trainer_module._forward_computes_chunked_loss(model, None):
        assert model.forward is not own
    assert model.forward is own
