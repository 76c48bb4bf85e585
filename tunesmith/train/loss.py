"""The supervised loss computed in chunks, so the `[batch, seq, vocab]` logits tensor never exists.

A causal LM's own loss projects every position onto the vocabulary (SmolLM2: 49,152 columns) and only then drops
the positions whose label is -100. Here the decoder runs without its output head; only the hidden states of
supervised positions are kept, and the head + cross-entropy run over them `chunk_size` rows at a time, each chunk
under activation checkpointing so that the backward pass recomputes its logits instead of keeping them. The result
is the same number as the model's loss: a sum over supervised tokens divided by Trainer's `num_items_in_batch`
(the supervised tokens of the whole global batch) when given, else a mean.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024
# Config attributes that change the logits after the head; a model with one uses its own loss.
LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder without head, output head) of a causal LM, unwrapping peft; None if the model cannot be split."""
    if hasattr(model, "get_base_model"):  # a peft PeftModel: LoRA layers live inside the wrapped model
        model = model.get_base_model()
    config = model_text_config(model)  # a vision-language model's logits are its language model's
    if config is None or any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    prefix = getattr(model, "base_model_prefix", "")
    decoder = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def model_text_config(module: nn.Module):
    """The config of a module's language model: its own, or a vision-language model's `text_config`."""
    config = getattr(module, "config", None)
    return config.get_text_config() if config is not None else None


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The model's causal-LM loss for `inputs` (which hold `labels`), without materialising all logits."""
    parts = causal_lm_parts(model)
    if parts is None:
        raise ValueError("this model cannot be split into a decoder and an output head; use chunked_loss: false")
    decoder, head = parts
    labels = inputs["labels"]
    model_inputs = {name: value for name, value in inputs.items() if name != "labels"}
    outputs = decoder(**model_inputs, use_cache=False)
    hidden = outputs[0] if not hasattr(outputs, "last_hidden_state") else outputs.last_hidden_state

    # The hidden state at position i predicts the label at i + 1; the last position predicts nothing.
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(hidden.device)
    supervised = shift_labels != IGNORE_INDEX
    hidden = hidden[supervised]
    targets = shift_labels[supervised]

    softcap = getattr(model_text_config(decoder), "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            total = total + checkpoint(
                _chunk_loss_sum, head, hidden[chunk], targets[chunk], softcap, use_reentrant=False
            )
        else:
            total = total + _chunk_loss_sum(head, hidden[chunk], targets[chunk], softcap)

    if num_items_in_batch is None:
        # Like the model's mean: NaN when nothing in the batch is supervised.
        return total / supervised.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
