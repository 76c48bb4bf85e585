"""Batches of tokenized examples: padded to the longest example in the batch (not to cutoff_len), or packed rows.

Packed rows (`data/packing.py`) hold several examples each. `PackedBatches` keeps them apart in three ways:

- position ids restart at 0 for every example;
- the first token of every example gets label -100. The model's loss shifts labels by one (the logit at token i is
  scored against the label of token i + 1), so this is what stops the last token of one example from being trained
  to predict the first token of the next. Alone, an example's first label is never scored either, so the loss of a
  packed row equals the loss of its examples run one by one;
- attention never crosses an example boundary. Restarting position ids is not enough for that: with `sdpa` or
  `eager`, and a cache as in training, transformers 5.23 lets a packed row attend across its examples (measured).
  So, by the model's `config._attn_implementation`:
    * `sdpa`: a 4D block-diagonal causal mask [batch, 1, L, L] of bools (True = may attend), built per batch;
      it replaces the 2D padding mask, and transformers passes a 4D mask to the kernel unchanged;
    * `eager`: the same mask as floats, 0 where attention is allowed and the dtype's minimum where it is not
      (eager attention adds the mask to the scores, so a bool mask would mask nothing);
    * flash attention (GPU): no mask. The batch is flattened into one row with no padding and position ids that
      restart per example, the layout of transformers' `DataCollatorWithFlattening`; transformers finds the
      boundaries in the position ids and calls flash-attention's variable-length kernel.
  Padding positions (sdpa, eager) attend only to themselves, so no row of the mask is empty.

The mask costs L x L per row (16 MB of bools at L = 4096; four times that as float32), built per batch. Trainer
cannot count real tokens from a 4D mask (nor from a flat row without one), so a packed run counts every position
(`include_num_input_tokens_seen="all"`): its tokens/s include the little padding left in packed batches.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.errors import ConfigError

AttentionLayout = Literal["bool_mask", "float_mask", "varlen"]
VARLEN_KEYS = ("input_ids", "labels", "position_ids")


class PadToLongest:
    """Right-pad input ids with the pad token, labels with -100, and mark real tokens in the attention mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            input_ids[row, :size] = torch.as_tensor(example["input_ids"])
            labels[row, :size] = torch.as_tensor(example["labels"])
            attention_mask[row, :size] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def attention_layout(attn_implementation: str) -> AttentionLayout:
    """How packed rows are kept apart for a model's attention implementation (see the module docstring)."""
    if attn_implementation == "sdpa":
        return "bool_mask"
    if attn_implementation == "eager":
        return "float_mask"
    if attn_implementation.startswith("flash_attention") or "flash-attn" in attn_implementation:
        return "varlen"
    raise ConfigError(
        f"packing supports the sdpa, eager and flash attention implementations; this model uses "
        f"{attn_implementation!r}. Turn packing off, or load the model with one of those."
    )


class PackedBatches:
    """Collate packed rows (`input_ids`, `labels`, `seq_lens`) so that no example sees or predicts another."""

    def __init__(self, pad_token_id: int, layout: AttentionLayout, dtype: torch.dtype = torch.float32) -> None:
        self.pad_token_id = pad_token_id
        self.layout = layout
        self.dtype = dtype  # of the float mask: the model's dtype

    @classmethod
    def for_model(cls, pad_token_id: int, model) -> PackedBatches:
        return cls(pad_token_id, attention_layout(model.config._attn_implementation), model.dtype)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        parts = [packed_row(row["input_ids"], row["labels"], row["seq_lens"]) for row in rows]
        if self.layout == "varlen":
            return {key: torch.cat([part[key] for part in parts]).unsqueeze(0) for key in VARLEN_KEYS}

        length = max(len(part["input_ids"]) for part in parts)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        # which example each token belongs to; every padding position is its own negative number
        segments = -1 - torch.arange(length).repeat(len(rows), 1)
        for row, part in enumerate(parts):
            size = len(part["input_ids"])
            input_ids[row, :size] = part["input_ids"]
            labels[row, :size] = part["labels"]
            position_ids[row, :size] = part["position_ids"]
            segments[row, :size] = part["segments"]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": self.mask(segments),
        }

    def mask(self, segments: torch.Tensor) -> torch.Tensor:
        """[batch, 1, L, L]: query i may attend key j when both are in the same example and j <= i."""
        length = segments.shape[1]
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal
        allowed = allowed.unsqueeze(1)
        if self.layout == "bool_mask":
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype).masked_fill(~allowed, torch.finfo(self.dtype).min)


def packed_row(input_ids: list[int], labels: list[int], seq_lens: list[int]) -> dict[str, torch.Tensor]:
    """One packed row as tensors: ids, labels with -100 at each example's first token, restarting positions."""
    if sum(seq_lens) != len(input_ids) or len(labels) != len(input_ids):
        raise ValueError(f"a packed row of {len(input_ids)} tokens has seq_lens {seq_lens} and {len(labels)} labels")
    lengths = torch.as_tensor(seq_lens, dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    label_tensor = torch.as_tensor(labels, dtype=torch.long).clone()
    label_tensor[starts] = IGNORE_INDEX
    return {
        "input_ids": torch.as_tensor(input_ids, dtype=torch.long),
        "labels": label_tensor,
        "position_ids": torch.arange(len(input_ids)) - torch.repeat_interleave(starts, lengths),
        "segments": torch.repeat_interleave(torch.arange(len(seq_lens)), lengths),
    }
