"""Length-grouped batching: every row once per epoch, in batches of rows of similar length, so less padding.

Each epoch the rows are shuffled (a generator seeded by the run's seed and the epoch), cut into mega-batches of
`GROUP_BATCHES` batches, each mega-batch sorted by length (longest first) and cut into batches, and the batches
are shuffled again. The batch that holds the longest row goes first, so a run that would not fit in memory fails at
its first step. The epoch sees exactly the rows a random order would (a permutation), in a different order; the
order is a function of (seed, epoch) only, so a run resumed mid-epoch (Trainer skips the batches already trained)
sees the same batches as an uninterrupted one.

Padding is masked out of attention and loss, so each example's loss is the same in a short batch as in a long
one: grouping changes what a step costs, not what it computes. It is the default for unpacked, map-style data
(`group_by_length`); packing fills rows to `cutoff_len` and needs none of this. Transformers 5 still has a
`group_by_length` sampling strategy, but it draws from the global RNG, so a resumed run gets a different order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

GROUP_BATCHES = 16  # batches per mega-batch: more → less padding, fewer distinct neighbours for a row


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    """Row indices for one epoch: each index once, consecutive runs of `batch_size` rows of similar length."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    group = batch_size * GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        mega = sorted(order[start : start + group], key=lambda index: -lengths[index])
        batches += [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    if shuffled:
        longest = max(range(len(shuffled)), key=lambda b: lengths[shuffled[b][0]])  # each batch starts longest
        shuffled.insert(0, shuffled.pop(longest))
    return [index for batch in shuffled for index in batch]


def padded_positions(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> int:
    """Positions computed when batches of `order` are padded to their longest row."""
    total = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        total += len(batch) * max(lengths[i] for i in batch)
    return total


class LengthGroupedSampler(Sampler[int]):
    """A `Sampler` of row indices in `length_grouped_order`; Trainer calls `set_epoch` at each epoch start."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed, self.epoch))

    def padding_summary(self) -> str:
        """One line: how many padding positions grouping avoids in an epoch, against a random order."""
        real = sum(self.lengths)
        generator = torch.Generator().manual_seed(self.seed)
        random_order = torch.randperm(len(self.lengths), generator=generator).tolist()
        random_padding = padded_positions(self.lengths, random_order, self.batch_size) - real
        grouped_padding = padded_positions(self.lengths, list(self), self.batch_size) - real
        saved = random_padding - grouped_padding
        return (
            f"group_by_length: {grouped_padding:,} padding positions per epoch instead of {random_padding:,} in "
            f"random order; {saved / (real + random_padding):.0%} fewer positions to compute "
            "(group_by_length: false to turn it off)"
        )


def row_lengths(dataset) -> list[int]:
    """Tokens per row of a tokenized `datasets.Dataset`, read from its Arrow column without decoding the ids; a
    preference pair (`chosen_ids`, `rejected_ids`, as a reward model reads them) counts its longer side, to which
    its batch is padded."""
    import pyarrow.compute as pc

    columns = dataset.with_format("arrow")
    if "input_ids" in dataset.column_names:
        return pc.list_value_length(columns["input_ids"]).to_pylist()
    chosen, rejected = (pc.list_value_length(columns[name]) for name in ("chosen_ids", "rejected_ids"))
    return pc.max_element_wise(chosen, rejected).to_pylist()


def length_grouped_sampler(
    setting: bool | None, packing: bool, train_dataset, batch_size: int, seed: int
) -> LengthGroupedSampler | None:
    """The run's sampler for `group_by_length` (None: on where it applies); None means Trainer's random order."""
    from tunesmith.errors import ConfigError

    streaming = not hasattr(train_dataset, "__len__")
    if setting is False or (setting is None and (packing or streaming or batch_size == 1)):
        return None  # (one row per batch has no padding to save)
    if packing or streaming:
        why = "packing fills every row to cutoff_len" if packing else "streamed data has no lengths to group by"
        raise ConfigError(f"group_by_length: true does not apply here: {why}; drop the key")
    sampler = LengthGroupedSampler(row_lengths(train_dataset), batch_size, seed)
    print(sampler.padding_summary())
    return sampler
