"""The data step of a supervised fine-tuning run: named datasets → tokenized train (and eval) sets."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

from tunesmith.config.sections import DataSection
from tunesmith.data.encode import encode_conversation
from tunesmith.data.formats import (
    OPENAI_TAGS,
    AlpacaColumns,
    Conversation,
    Row,
    ShareGPTTags,
    alpaca_to_messages,
    fill_placeholders,
    read_rows,
    sharegpt_to_messages,
)
from tunesmith.data.registry import SUPPORTED_SUFFIXES, DatasetSpec, resolve_datasets
from tunesmith.errors import DataError


@dataclass
class SFTData:
    train: Any  # datasets.Dataset with input_ids and labels
    eval: Any | None
    rows: int
    truncated: int
    dropped: int

    def summary(self) -> str:
        eval_rows = len(self.eval) if self.eval is not None else 0
        return (
            f"data: {self.rows} rows → {len(self.train)} train + {eval_rows} eval examples; "
            f"{self.truncated} truncated at cutoff_len, {self.dropped} dropped with no supervised token"
        )


def load_conversations(spec: DatasetSpec, placeholders: dict[str, str | None], limit: int | None) -> list[Conversation]:
    files = (
        sorted(p for p in spec.path.iterdir() if p.suffix in SUPPORTED_SUFFIXES) if spec.path.is_dir() else [spec.path]
    )
    to_messages = None
    conversations: list[Conversation] = []
    for file in files:
        for row in read_rows(file):
            if to_messages is None:
                to_messages = row_converter(spec, row)
            conversations.append(fill_placeholders(to_messages(row), placeholders, row.where()))
            if limit is not None and len(conversations) >= limit:
                return conversations
    if not conversations:
        raise DataError(f"dataset {spec.name!r} ({spec.path}) has no rows")
    return conversations


def row_converter(spec: DatasetSpec, first_row: Row):
    """The row → conversation function for this dataset, from its registry entry or, for a bare file, its columns."""
    formatting = spec.formatting
    columns = spec.columns
    if formatting is None:  # a file given by path: look at the first row
        keys = set(first_row.data)
        if "messages" in keys:
            formatting, columns = "sharegpt", {"messages": "messages"}
            spec = spec.model_copy(update={"tags": OPENAI_TAGS.__dict__ | spec.tags})
        elif "conversations" in keys:
            formatting = "sharegpt"
        elif {"instruction", "output"} <= keys:
            formatting = "alpaca"
        else:
            raise DataError(
                f"{first_row.where()}: cannot tell the format from columns {sorted(keys)}; expected alpaca "
                "(instruction, input, output), OpenAI `messages` or ShareGPT `conversations`"
            )
    if formatting == "alpaca":
        alpaca = AlpacaColumns(**{key: columns[key] for key in columns if key in AlpacaColumns.__dataclass_fields__})
        return lambda row: alpaca_to_messages(row, alpaca)
    tags = ShareGPTTags(**{key: value for key, value in spec.tags.items() if key != "roles"})
    messages_column = columns.get("messages", "conversations")
    system_column = columns.get("system")
    return lambda row: sharegpt_to_messages(row, messages_column, tags, system_column)


def load_sft_data(data: DataSection, tokenizer, chat_template: str, seed: int) -> SFTData:
    from datasets import Dataset

    conversations: list[Conversation] = []
    for spec in resolve_datasets(data.dataset, data.dataset_dir):
        limit = min(filter(None, [data.max_samples, spec.num_samples]), default=None)
        conversations += load_conversations(spec, {"name": data.name, "author": data.author}, limit)

    def encode(example: dict[str, Any]) -> dict[str, Any]:
        encoded = encode_conversation(
            tokenizer, chat_template, example["messages"], data.cutoff_len, data.train_on_prompt
        )
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "truncated": encoded.truncated,
            "supervised": encoded.supervised_tokens,
        }

    dataset = Dataset.from_list([{"messages": messages} for messages in conversations])
    dataset = dataset.map(
        encode,
        remove_columns=["messages"],
        num_proc=worker_count(data.preprocessing_num_workers),
        desc="Tokenizing",
    )
    rows = len(dataset)
    truncated = sum(dataset["truncated"])
    empty = sum(1 for count in dataset["supervised"] if count == 0)
    if empty * 2 > rows:
        raise DataError(
            f"{empty} of {rows} examples have no supervised token: their prompts fill cutoff_len={data.cutoff_len} "
            "before the answer starts. Raise cutoff_len, or shorten the prompts."
        )
    dataset = dataset.filter(lambda example: example["supervised"] > 0).remove_columns(["truncated", "supervised"])

    train, evaluation = split_validation(dataset, data.val_size, seed)
    return SFTData(train=train, eval=evaluation, rows=rows, truncated=truncated, dropped=empty)


def worker_count(requested: int | None) -> int | None:
    """Tokenizing processes: copied configs ask for 16; more processes than cores only adds start-up time."""
    count = min(requested or 1, os.cpu_count() or 1)
    return count if count > 1 else None


def split_validation(dataset, val_size: float, seed: int):
    """Hold out `val_size` rows (a fraction below 1, or a count) chosen with a seeded shuffle."""
    if not val_size:
        return dataset, None
    count = int(val_size) if val_size >= 1 else max(1, round(len(dataset) * val_size))
    if count >= len(dataset):
        raise DataError(f"val_size={val_size} leaves no training rows out of {len(dataset)}")
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    return dataset.select(sorted(order[count:])), dataset.select(sorted(order[:count]))
