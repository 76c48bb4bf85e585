"""`gradient_checkpointing: offload` with LoRA and QLoRA: reentrant checkpointing of frozen layers still trains the
adapter inside them (the layer input must carry a gradient), with the same losses as a run without checkpointing."""

from __future__ import annotations

import pytest

from tests.conftest import logged_losses
from tests.unit.test_train import train
from tunesmith.train.trainer import TunesmithTrainer

# One batch of the same two rows every step, so the loss must fall from step to step as the adapter learns.
SAME_BATCH = ("max_samples=2", "per_device_train_batch_size=2", "max_steps=6", "save_steps=6", "plot_loss=false")


@pytest.fixture
def adapter_gradients(monkeypatch) -> dict[str, set[str]]:
    """For each run (output_dir), the names of the LoRA parameters that got a non-zero gradient in some step."""
    reached: dict[str, set[str]] = {}
    original_step = TunesmithTrainer.training_step

    def recording_step(self, model, inputs, num_items_in_batch=None):
        result = original_step(self, model, inputs, num_items_in_batch)
        names = reached.setdefault(self.args.output_dir, set())
        for name, parameter in model.named_parameters():
            if "lora_" in name and parameter.grad is not None and parameter.grad.abs().sum() > 0:
                names.add(name)
        return result

    monkeypatch.setattr(TunesmithTrainer, "training_step", recording_step)
    return reached


@pytest.mark.parametrize(
    ("quantization", "model_fixture"),
    [
        pytest.param((), "tiny_model_dir", id="lora"),
        pytest.param(("quantization_bit=4",), "wide_tiny_model_dir", id="qlora"),
    ],
)
def test_offloaded_checkpointing_trains_every_adapter_matrix(
    tmp_path, identity_data, adapter_gradients, request, monkeypatch, quantization, model_fixture
):
    from transformers import PreTrainedModel

    model_dir = request.getfixturevalue(model_fixture)
    # Transformers 5 makes the embeddings' output require grad when it enables checkpointing; older versions and
    # models with their own checkpointing code do not. The recipe must not depend on it.
    monkeypatch.setattr(PreTrainedModel, "enable_input_require_grads", lambda self: None)
    runs = {
        setting: train(
            tmp_path,
            model_dir,
            identity_data,
            *SAME_BATCH,
            *quantization,
            f"gradient_checkpointing={setting}",
            output=setting,
        )
        for setting in ("offload", "false")
    }
    offloaded, plain = (str(runs[setting]) for setting in ("offload", "false"))
    assert adapter_gradients[plain], "no LoRA parameter got a gradient even without checkpointing"
    # Every LoRA matrix of every layer learns under offload, exactly those that learn without checkpointing.
    assert adapter_gradients[offloaded] == adapter_gradients[plain]
    losses = logged_losses(runs["offload"])
    assert losses[-1] < losses[0] - 0.1, losses
    assert losses == pytest.approx(logged_losses(runs["false"]), abs=1e-4)
