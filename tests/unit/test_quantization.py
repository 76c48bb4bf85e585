"""QLoRA (4-bit), 8-bit LoRA, pre-quantized models, rsLoRA and DoRA on a tiny random Llama, on the CPU.

bitsandbytes' CPU 4-bit kernels need layers at least 64 wide, so these runs use a 64-wide variant of the tiny model.
"""

import json
import shutil

import pytest
import torch

from tests.conftest import logged_losses
from tests.unit.test_train import train_args
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError, ModelError


def run_keeping_model(monkeypatch, args: list[str]):
    """Run `tunesmith train` and return the trained model still in memory."""
    import tunesmith.train.sft as sft

    kept = {}
    original = sft.save_outputs

    def keep_trainer(trainer, *rest, **kwargs):
        kept["model"] = trainer.model
        return original(trainer, *rest, **kwargs)

    monkeypatch.setattr(sft, "save_outputs", keep_trainer)
    assert main(args) == 0
    return kept["model"]


@pytest.mark.parametrize(
    ("options", "layer_check"),
    [
        (["quantization_bit=4"], lambda layer: layer.weight.quant_state.quant_type == "nf4"),
        (
            ["quantization_bit=4", "quantization_type=fp4", "double_quantization=false"],
            lambda layer: layer.weight.quant_state.quant_type == "fp4" and layer.weight.quant_state.nested is False,
        ),
        (["quantization_bit=8"], lambda layer: layer.weight.dtype == torch.int8),
    ],
    ids=["qlora-nf4-double", "4bit-fp4", "8bit"],
)
def test_quantized_lora_trains_and_the_loss_falls(
    tmp_path, wide_tiny_model_dir, identity_data, monkeypatch, options, layer_check
):
    import bitsandbytes as bnb

    args = train_args(
        tmp_path,
        wide_tiny_model_dir,
        identity_data,
        "max_steps=6",
        "save_steps=100",
        "lr_scheduler_type=constant",
        "group_by_length=false",  # the random batch order its threshold was set on (step 6 vs step 1 is per batch)
        *options,
    )
    model = run_keeping_model(monkeypatch, args)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    bits = 4 if "quantization_bit=4" in options else 8
    assert isinstance(q_proj, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    assert layer_check(q_proj)
    if bits == 4 and "double_quantization=false" not in options:
        assert q_proj.weight.quant_state.nested  # double quantization: the block constants are quantized too
    losses = logged_losses(tmp_path / "out")
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.3, losses


def test_qlora_adapter_reloads_on_the_unquantized_base_and_chats(tmp_path, wide_tiny_model_dir, identity_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.chat.engine import load_chat_engine
    from tunesmith.config.sections import ModelSection

    assert main(train_args(tmp_path, wide_tiny_model_dir, identity_data, "quantization_bit=4", "save_steps=100")) == 0
    output = tmp_path / "out"
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(wide_tiny_model_dir)
    input_ids = torch.tensor([[1, 520, 9531, 198, 4093, 359, 346, 47]])
    base = AutoModelForCausalLM.from_pretrained(wide_tiny_model_dir)
    with torch.no_grad():
        before = base(input_ids).logits
        after = PeftModel.from_pretrained(base, output).eval()(input_ids).logits
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-3  # the adapter trained on 4-bit weights changes the fp32 model

    # chat: the base model named by adapter_config, loaded unquantized, with the adapter: the same logits
    engine = load_chat_engine(ModelSection(adapter_name_or_path=str(output)))
    with torch.no_grad():
        torch.testing.assert_close(engine.model(input_ids).logits, after)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantization_bit=4", "finetuning_type=full"], "set finetuning_type: lora"),
        (["quantization_bit=8", "finetuning_type=freeze"], "set finetuning_type: lora"),
        (["quantization_bit=3"], "`quantization_bit`: got 3; expected 4 or 8"),
        (["quantization_type=fp4"], "only apply to 4-bit quantization; set quantization_bit: 4"),
        (["quantization_bit=8", "double_quantization=false"], "double_quantization only apply to 4-bit"),
        (["quantization_bit=4", "quantization_method=gptq"], "`quantization_method`: got 'gptq'"),
        (["use_dora=true", "finetuning_type=full"], "use_dora needs finetuning_type: lora"),
    ],
)
def test_quantization_and_lora_options_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["dataset=x", *overrides])


def test_bnb_alias_is_accepted():
    assert load_config(None, ["dataset=x", "quantization_bit=4", "quantization_method=bnb"]).model.quantization_bit == 4


def test_4bit_on_layers_narrower_than_a_block_fails_with_the_reason(tmp_path, tiny_model_dir, identity_data, capsys):
    assert main(train_args(tmp_path, tiny_model_dir, identity_data, "quantization_bit=4")) != 0
    assert "4-bit on the CPU needs layers at least 64 wide" in capsys.readouterr().err


@pytest.mark.parametrize(("method", "packages"), [("gptq", "optimum gptqmodel"), ("awq", "gptqmodel")])
def test_prequantized_model_without_its_library_names_the_package(tmp_path, tiny_model_dir, method, packages):
    from tunesmith.model.quantize import quantization_for

    model_dir = tmp_path / "quantized"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"quantized with {method}; loading it needs: pip install {packages}"):
        quantization_for(str(model_dir), None, "nf4", True, torch.float32)
    with pytest.raises(ModelError, match=r"already quantized with .*remove quantization_bit"):
        quantization_for(str(model_dir), 4, "nf4", True, torch.float32)


def test_rslora_changes_the_scaling_and_dora_adds_magnitudes(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.model.adapters import apply_lora

    def q_proj(**flags):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return apply_lora(model, ["q_proj"], 4, 8, 0.0, **flags).get_base_model().model.layers[0].self_attn.q_proj

    plain, rslora, dora = q_proj(), q_proj(use_rslora=True), q_proj(use_dora=True)
    assert plain.scaling["default"] == pytest.approx(8 / 4)
    assert rslora.scaling["default"] == pytest.approx(8 / 4**0.5)
    assert "default" not in plain.lora_magnitude_vector
    assert "default" in dora.lora_magnitude_vector


def test_dora_run_saves_the_magnitudes(tmp_path, tiny_model_dir, identity_data):
    from safetensors.torch import load_file

    assert main(train_args(tmp_path, tiny_model_dir, identity_data, "use_dora=true", "use_rslora=true")) == 0
    output = tmp_path / "out"
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is True and adapter_config["use_rslora"] is True
    assert any("lora_magnitude_vector" in name for name in load_file(output / "adapter_model.safetensors"))
