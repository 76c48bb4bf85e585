"""QLoRA (4-bit NF4) and 8-bit LoRA on the real SmolLM2-135M-Instruct, on this CPU: a few steps, and the loss falls."""

import json

import pytest

from tests.conftest import REPO, logged_losses
from tunesmith.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_lora_on_smollm2_learns(tmp_path, bits):
    output = tmp_path / f"lora-{bits}bit"
    settings = [
        "train",
        str(REPO / "examples/qlora_alpaca.yaml"),
        f"dataset_dir={REPO / 'data'}",
        f"quantization_bit={bits}",
        "packing=false",
        "max_samples=8",  # the same 8 rows, 3 times over: the loss has to fall
        "per_device_train_batch_size=4",
        "gradient_accumulation_steps=1",
        "warmup_ratio=0",
        "max_steps=6",
        "logging_steps=2",
        "learning_rate=1e-3",
        "cutoff_len=128",
        "save_steps=100",
        "plot_loss=false",
        f"output_dir={output}",
    ]
    assert main(settings) == 0
    losses = logged_losses(output)
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"]  # an adapter for the (unquantized) base, loadable with plain peft
