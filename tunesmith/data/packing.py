"""Packing: whole encoded examples grouped into rows of at most cutoff_len tokens, so that batches carry less padding.

An example is never split (encoding already truncated each one to cutoff_len). A packed row keeps the length of
every example in it (`seq_lens`); `collate.PackedBatches` turns those lengths into position ids that restart at 0
per example, labels that never cross a boundary, and an attention path that keeps the examples apart. Packing here
is therefore always free of cross-contamination: what LLaMA-Factory calls `neat_packing`.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import ConfigError


@dataclass(frozen=True)
class PackingStats:
    examples: int
    rows: int
    tokens: int
    cutoff_len: int

    @property
    def fill(self) -> float:
        """Share of the rows' cutoff_len positions that hold tokens."""
        return self.tokens / max(self.rows * self.cutoff_len, 1)

    def summary(self) -> str:
        return (
            f"packing: {self.examples} examples → {self.rows} rows of at most {self.cutoff_len} tokens "
            f"({self.fill:.1%} of the row positions hold tokens, {1 - self.fill:.1%} are free for padding)"
        )


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, goes into the fullest row that still has room for it.

    Returns the example indices of each row, in the order the rows were opened. Deterministic: equal lengths keep
    their index order and equal spaces their row order.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (positions left, row number) of each row that is not full, sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if not 0 < length <= capacity:
            raise ValueError(f"example {index} has {length} tokens; packing takes 1 to {capacity} (cutoff_len)")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            rows.append([])
            space, row = capacity, len(rows) - 1
        else:
            space, row = free.pop(slot)
        rows[row].append(index)
        if space > length:
            bisect.insort(free, (space - length, row))
    return rows


def pack_dataset(dataset: Any, cutoff_len: int, seed: int) -> tuple[Any, PackingStats]:
    """Packed rows with `input_ids`, `labels` (both the examples' own, concatenated) and `seq_lens`.

    Within a row the examples keep their dataset order; the rows are shuffled with `seed`, so that the longest
    examples (packed first) do not all come first when the rows are read in order (evaluation). The tokens are
    moved as Arrow arrays, never as Python lists, so packing a large dataset takes seconds and little memory.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if not isinstance(dataset, Dataset):
        raise ConfigError("packing needs the whole dataset in memory; it cannot pack a streamed one (streaming: true)")
    table = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False).tolist()
    rows = [sorted(row) for row in pack_lengths(lengths, cutoff_len)]
    random.Random(seed).shuffle(rows)
    taken = table.take(pa.array([index for row in rows for index in row], pa.int64()))
    row_sizes = [sum(lengths[index] for index in row) for row in rows]
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_sizes)]), pa.int64())

    def concatenated(column: str) -> pa.Array:
        return pa.LargeListArray.from_arrays(offsets, pc.list_flatten(taken[column]).combine_chunks())

    packed = pa.table(
        {
            "input_ids": concatenated("input_ids"),
            "labels": concatenated("labels"),
            "seq_lens": pa.array([[lengths[index] for index in row] for row in rows], pa.list_(pa.int32())),
        }
    )
    stats = PackingStats(examples=len(lengths), rows=len(rows), tokens=sum(lengths), cutoff_len=cutoff_len)
    return Dataset(InMemoryTable(packed)), stats
