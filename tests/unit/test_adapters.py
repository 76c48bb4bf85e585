"""`adapter_name_or_path` in training, LLaMA-Factory's way: go on training an adapter; with a list, merge all but the
last; `create_new_adapter` merges them all and trains a new one. Checked on the tiny model by the weights a run
starts from."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_train import train, train_args
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.train.trainer import TunesmithTrainer

TWO_STEPS = ("max_steps=2", "save_steps=2", "plot_loss=false", "gradient_checkpointing=false", "lora_rank=8")


@pytest.fixture
def starting_weights(monkeypatch) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """For each run (output_dir): the adapter (peft's saved names) and the base weights as training starts."""
    from peft.utils import get_peft_model_state_dict

    recorded: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    original_train = TunesmithTrainer.train

    def recording_train(self, *args, **kwargs):
        base = {
            plain_name(name): tensor.detach().clone()
            for name, tensor in self.model.state_dict().items()
            if ".lora_" not in name
        }
        adapter = {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(self.model).items()}
        recorded[self.args.output_dir] = {"adapter": adapter, "base": base}
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(TunesmithTrainer, "train", recording_train)
    return recorded


def plain_name(peft_name: str) -> str:
    """`base_model.model.model.layers.0.mlp.up_proj.base_layer.weight` → `model.layers.0.mlp.up_proj.weight`"""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def merged_weights(model_dir, *adapter_dirs) -> dict[str, torch.Tensor]:
    """The base model's weights with each adapter merged in, in order, by plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for adapter_dir in adapter_dirs:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.state_dict()


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 0.0):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=atol, rtol=0, msg=name)


def test_training_goes_on_from_the_saved_adapter(tmp_path, tiny_model_dir, identity_data, starting_weights):
    first = train(tmp_path, tiny_model_dir, identity_data, *TWO_STEPS, output="first")
    saved = load_file(first / "adapter_model.safetensors")
    second = train(
        tmp_path, tiny_model_dir, identity_data, *TWO_STEPS, f"adapter_name_or_path={first}", output="second"
    )

    assert_same_tensors(starting_weights[str(second)]["adapter"], saved)  # exactly the saved weights
    # the base is the plain base model: nothing was merged
    assert_same_tensors(starting_weights[str(second)]["base"], merged_weights(tiny_model_dir))
    continued = load_file(second / "adapter_model.safetensors")
    assert any(not torch.equal(continued[name], saved[name]) for name in saved), "the second run trained nothing"
    assert json.loads((second / "adapter_config.json").read_text())["r"] == 8


def test_a_list_merges_all_but_the_last_and_trains_the_last(tmp_path, tiny_model_dir, identity_data, starting_weights):
    first = train(tmp_path, tiny_model_dir, identity_data, *TWO_STEPS, output="a")
    second = train(tmp_path, tiny_model_dir, identity_data, *TWO_STEPS, "seed=7", output="b")
    both = train(
        tmp_path, tiny_model_dir, identity_data, *TWO_STEPS, f"adapter_name_or_path={first},{second}", output="ab"
    )
    start = starting_weights[str(both)]
    assert_same_tensors(start["adapter"], load_file(second / "adapter_model.safetensors"))
    base, with_first = merged_weights(tiny_model_dir), merged_weights(tiny_model_dir, first)
    assert_same_tensors(start["base"], with_first, atol=1e-6)
    changed = [name for name in base if not torch.allclose(base[name], with_first[name])]
    assert changed, "merging the first adapter changed no weight; the test would prove nothing"
    # The output applies on top of the first adapter: given alone (to chat, or to train further), that one is
    # merged in first, as its saved config records.
    assert_applies_on_top_of(both, tiny_model_dir, first)


def test_create_new_adapter_merges_them_all_and_trains_a_new_one(
    tmp_path, tiny_model_dir, identity_data, starting_weights
):
    first = train(tmp_path, tiny_model_dir, identity_data, *TWO_STEPS, output="a")
    second = train(tmp_path, tiny_model_dir, identity_data, *TWO_STEPS, "seed=7", output="b")
    new = train(
        tmp_path,
        tiny_model_dir,
        identity_data,
        *TWO_STEPS,
        f"adapter_name_or_path={first},{second}",
        "create_new_adapter=true",
        "lora_rank=4",  # a new adapter takes the run's LoRA keys
        output="new",
    )
    start = starting_weights[str(new)]
    assert_same_tensors(start["base"], merged_weights(tiny_model_dir, first, second), atol=1e-6)
    b_matrices = [tensor for name, tensor in start["adapter"].items() if "lora_B" in name]
    assert b_matrices and all(not torch.any(tensor) for tensor in b_matrices)  # a fresh adapter starts at zero
    assert json.loads((new / "adapter_config.json").read_text())["r"] == 4
    assert_applies_on_top_of(new, tiny_model_dir, first, second)


def assert_applies_on_top_of(adapter_dir, model_dir, *beneath) -> None:
    """Chat with `adapter_dir` alone gives the logits of the base with `beneath` merged and the adapter on top."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.chat.engine import load_chat_engine
    from tunesmith.config.sections import ModelSection

    chat = load_chat_engine(ModelSection(adapter_name_or_path=str(adapter_dir)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for merged in beneath:
        model = PeftModel.from_pretrained(model, str(merged)).merge_and_unload()
    reference = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)).eval()
    inputs = chat.encode([{"role": "user", "content": "Who are you?"}])
    with torch.no_grad():
        logits, expected, without = (model(**inputs).logits for model in (chat.model, reference, alone))
    assert not torch.allclose(without, expected, atol=1e-4), "the adapters beneath change nothing"
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_a_lora_key_the_continued_adapter_cannot_honour_is_refused(tmp_path, tiny_model_dir, identity_data, capsys):
    first = train(tmp_path, tiny_model_dir, identity_data, *TWO_STEPS, "lora_target=q_proj,v_proj", output="a")
    for override, message in (
        ("lora_rank=16", r"`lora_rank: 16` differs from the adapter being trained further .* has r: 8"),
        ("lora_target=all", r"`lora_target: all`, but the adapter .* adapts only q_proj, v_proj, not down_proj"),
    ):
        argv = train_args(
            tmp_path, tiny_model_dir, identity_data, *TWO_STEPS, f"adapter_name_or_path={first}", override, output="no"
        )
        assert main(argv) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not (tmp_path / "no" / "adapter_model.safetensors").exists()


def test_an_adapter_of_another_model_is_refused_naming_both(
    tmp_path, tiny_model_dir, wide_tiny_model_dir, identity_data, capsys
):
    wide = train(tmp_path, wide_tiny_model_dir, identity_data, *TWO_STEPS, output="wide")
    argv = train_args(tmp_path, tiny_model_dir, identity_data, *TWO_STEPS, f"adapter_name_or_path={wide}", output="x")
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert (
        f"the adapter in {wide} was trained on {wide_tiny_model_dir} and does not fit model {tiny_model_dir}" in error
    )
    assert re.search(
        r"layer model\.layers\.0\.\w+\.\w+ has in_features (32|64) here, and (64|128) in the adapter", error
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapter_name_or_path=a,b", "quantization_bit=4"], "takes one adapter to train further"),
        (["adapter_name_or_path=a", "quantization_bit=4", "create_new_adapter=true"], "takes one adapter"),
        (["adapter_name_or_path=a", "finetuning_type=full"], "which finetuning_type: full does not train"),
        (["create_new_adapter=true"], "none is set"),
        (["adapter_name_or_path=a", "pissa_init=true"], "set create_new_adapter: true"),
        (["adapter_name_or_path=runs/x", "output_dir=runs/x/"], "would write over the adapter it starts from"),
    ],
)
def test_adapter_combinations_that_cannot_work_are_refused_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["dataset=identity", *overrides])


def test_adapter_list_is_split_like_llamafactory():
    config = load_config(None, ["dataset=identity", "adapter_name_or_path=runs/a, runs/b"])
    assert config.model.adapter_name_or_path == ["runs/a", "runs/b"]
