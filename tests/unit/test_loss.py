"""The chunked supervised-only loss: the model's own loss and gradients, without the full logits tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from tests.unit.test_train import train
from tunesmith.train.loss import chunked_causal_lm_loss


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator returns, forward and backward (checkpoint recomputation included).

    Tensor memory on the CPU is invisible to tracemalloc and the profiler's numbers depend on the allocator; every
    tensor, though, is the output of some operator, and the dispatch mode sees each one as it is made. So the
    largest output bounds what must be held at once, exactly and deterministically.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def tiny_llama(vocab_size: int = 1000, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def batch(vocab_size: int, rows: int = 3, length: int = 40, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :7] = -100  # a prompt
    attention_mask = torch.ones_like(input_ids)
    if rows > 1:  # a padded row
        labels[1, 25:] = -100
        attention_mask[1, 25:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(150)])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "peft-lora"])
def test_equals_the_models_own_loss_and_gradients(num_items_in_batch, lora):
    model = tiny_llama()
    if lora:
        from tunesmith.model.adapters import apply_lora

        model = apply_lora(model, ["q_proj", "v_proj", "down_proj"], 4, 8, 0.0)
        for name, parameter in model.named_parameters():  # make B non-zero so every LoRA gradient is informative
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
    inputs = batch(1000)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}

    expected, expected_grads = loss_and_grads(model, lambda: model(**inputs, **extra).loss)
    got, got_grads = loss_and_grads(
        model, lambda: chunked_causal_lm_loss(model, inputs, num_items_in_batch, chunk_size=16)
    )

    assert abs(got.item() - expected.item()) <= 1e-5
    assert got_grads.keys() == expected_grads.keys() and got_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_never_allocates_the_full_logits():
    vocab, length, chunk = 200_000, 512, 128
    model = tiny_llama(vocab)
    inputs = batch(vocab, rows=1, length=length)
    with LargestTensor() as probe:
        chunked_causal_lm_loss(model, inputs, chunk_size=chunk).backward()
    assert probe.largest <= chunk * vocab  # one chunk's logits at most, in the forward and the backward pass
    assert probe.largest < length * vocab // 2

    # The probe does see full logits when they exist: the model's own loss, on a sequence short enough to be cheap.
    short = batch(vocab, rows=1, length=64)
    with LargestTensor() as probe:
        model(**short).loss.backward()
    assert probe.largest >= 64 * vocab


def test_no_supervised_token_gives_nan_like_the_model():
    model = tiny_llama()
    inputs = batch(1000)
    inputs["labels"][:] = -100
    assert torch.isnan(chunked_causal_lm_loss(model, inputs)) and torch.isnan(model(**inputs).loss)


def first_losses(output) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


@pytest.mark.parametrize(
    "options", [[], ["gradient_accumulation_steps=2"], ["packing=true"]], ids=["plain", "accumulation", "packing"]
)
def test_training_gives_the_same_loss_with_and_without_chunking(
    tmp_path, tiny_model_dir, identity_data, options, monkeypatch
):
    import tunesmith.train.loss as loss_module

    calls = []
    original = loss_module.chunked_causal_lm_loss
    monkeypatch.setattr(
        loss_module, "chunked_causal_lm_loss", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    )
    settings = ("max_steps=3", "save_steps=100", "plot_loss=false", *options)
    chunked = train(tmp_path, tiny_model_dir, identity_data, *settings, output="chunked")
    assert len(calls) == 3 * (2 if "gradient_accumulation_steps=2" in options else 1)  # every micro-batch
    calls.clear()
    plain = train(tmp_path, tiny_model_dir, identity_data, *settings, "chunked_loss=false", output="plain")
    assert not calls
    chunked_losses, plain_losses = first_losses(chunked), first_losses(plain)
    assert abs(chunked_losses[0] - plain_losses[0]) <= 1e-5
    assert chunked_losses == pytest.approx(plain_losses, abs=1e-4)
    chunked_adapter = load_file(chunked / "adapter_model.safetensors")
    plain_adapter = load_file(plain / "adapter_model.safetensors")
    for name, tensor in plain_adapter.items():
        torch.testing.assert_close(chunked_adapter[name], tensor, rtol=1e-3, atol=1e-5, msg=name)
