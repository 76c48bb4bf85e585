"""Which rows a run uses: split slices (`train[:2000]`, `train[10%:]`), `num_samples`, `max_samples`, mixing several
datasets (concat or interleave) and holding rows out for eval. Everything random takes the run's seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

from tunesmith.errors import DataError

T = TypeVar("T")

_SPLIT = re.compile(r"^\s*(?P<name>[\w.-]+)\s*(?:\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<stop>-?\d+%?)?\s*\])?\s*$")
SPLIT_SYNTAX = "a split name with an optional slice: train, train[:2000], train[10%:], train[100:200], train[-50:]"

# mix_strategy → datasets.interleave_datasets' stopping_strategy
STOPPING_STRATEGIES = {
    "interleave_under": "first_exhausted",  # stop when the first dataset runs out
    "interleave_over": "all_exhausted",  # repeat the smaller datasets until every one has been used up
    "interleave_once": "all_exhausted_without_replacement",  # every row once, none repeated
}


@dataclass(frozen=True)
class Split:
    """Hugging Face split syntax: a name and an optional [start:stop] slice of row counts or percentages."""

    name: str
    start: str | None = None
    stop: str | None = None

    @property
    def needs_length(self) -> bool:
        """Percentages and negative bounds are relative to the number of rows, so all rows must be read first."""
        return any(bound and (bound.endswith("%") or bound.startswith("-")) for bound in (self.start, self.stop))

    def bounds(self, length: int | None) -> tuple[int, int | None]:
        return self._bound(self.start, length) or 0, self._bound(self.stop, length)

    @staticmethod
    def _bound(bound: str | None, length: int | None) -> int | None:
        if bound is None:
            return None
        if bound.endswith("%"):
            assert length is not None
            value = round(int(bound[:-1]) * length / 100.0)  # Hugging Face's "closest" rounding
        else:
            value = int(bound)
        if value < 0:
            assert length is not None
            value = max(0, length + value)
        return value


def parse_split(text: str, where: str) -> Split:
    match = _SPLIT.match(text)
    if not match:
        raise DataError(f"{where}: split {text!r} is not valid; use {SPLIT_SYNTAX}")
    for bound in (match["start"], match["stop"]):
        if bound and bound.endswith("%") and not 0 <= abs(int(bound[:-1])) <= 100:
            raise DataError(f"{where}: split {text!r}: a percentage must be between -100% and 100%")
    return Split(match["name"], match["start"], match["stop"])


def select_rows(
    rows: Iterable[T], split: Split, num_samples: int | None, max_samples: int | None, seed: int
) -> list[T]:
    """The slice of the split, then `num_samples` drawn with the seed (LLaMA-Factory's: every row once before any
    row repeats), then the first `max_samples`. Reads only as far as needed when the slice is in plain counts."""
    if not split.needs_length and num_samples is None:
        start, stop = split.bounds(None)
        if max_samples is not None:
            stop = start + max_samples if stop is None else min(stop, start + max_samples)
        return list(islice(rows, start, stop))
    selected = list(rows)
    start, stop = split.bounds(len(selected))
    selected = selected[start:stop]
    if num_samples is not None:
        selected = sample(selected, num_samples, seed)
    if max_samples is not None:
        selected = selected[:max_samples]
    return selected


def stream_rows(rows: Iterable[T], split: Split, limit: int | None, where: str) -> Iterator[T]:
    """The slice of a streamed split: only plain row counts, since the length is not known in advance."""
    if split.needs_length:
        raise DataError(
            f"{where}: split slice [{split.start or ''}:{split.stop or ''}] needs the number of rows, which a "
            "streamed dataset does not know; use row counts (train[:2000], train[100:]) with `streaming: true`"
        )
    start, stop = split.bounds(None)
    if limit is not None:
        stop = start + limit if stop is None else min(stop, start + limit)
    return islice(rows, start, stop)


def sample(items: list[T], count: int, seed: int) -> list[T]:
    """`count` items drawn with the seed: a shuffled pass over all of them, then draws with replacement if more."""
    generator = random.Random(seed)
    order = list(range(len(items)))
    generator.shuffle(order)
    order = order[:count]
    if count > len(items) and items:
        order += [generator.randrange(len(items)) for _ in range(count - len(items))]
    return [items[index] for index in order]


def mix(datasets: list, strategy: str, probabilities: list[float] | None, seed: int):
    """Several tokenized datasets → one: concatenated, or interleaved with the seed (`datasets.interleave_datasets`)."""
    from datasets import concatenate_datasets, interleave_datasets

    if len(datasets) == 1:
        return datasets[0]
    if strategy == "concat":
        return concatenate_datasets(datasets)
    return interleave_datasets(
        datasets, probabilities=probabilities, seed=seed, stopping_strategy=STOPPING_STRATEGIES[strategy]
    )


def split_validation(dataset, val_size: float, seed: int):
    """Hold out `val_size` rows (a fraction below 1, or a count) chosen with a seeded shuffle."""
    if not val_size:
        return dataset, None
    held_out = held_out_rows(len(dataset), val_size, seed)
    kept = sorted(set(range(len(dataset))) - set(held_out))
    return dataset.select(kept), dataset.select(held_out)


def held_out_rows(length: int, val_size: float, seed: int) -> list[int]:
    """The indices (in order) of the rows `val_size` holds out of `length`: the rule training's eval split and
    predict's `val_size` share, so predict can score exactly the rows a run did not train on."""
    count = int(val_size) if val_size >= 1 else max(1, round(length * val_size))
    if count >= length:
        raise DataError(f"val_size={val_size} leaves no training rows out of {length}")
    order = list(range(length))
    random.Random(seed).shuffle(order)
    return sorted(order[:count])
