"""Dataset rows in the forms our users bring → one internal conversation format.

A conversation is a list of `{"role": ..., "content": ...}` messages with roles `system`, `user`, `assistant` and
`tool`: exactly what `tokenizer.apply_chat_template` takes. Each input format is one function from a row to a
conversation; every error names the file, the row and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError

Message = dict[str, str]
Conversation = list[Message]


@dataclass(frozen=True)
class Row:
    """One raw row and where it came from, so that every error can point at it."""

    data: Mapping[str, Any]
    file: str
    number: int  # 1-based: the line of a .jsonl file, the position in a .json list

    def where(self, field_name: str | None = None) -> str:
        field_part = f", field `{field_name}`" if field_name else ""
        return f"{self.file} row {self.number}{field_part}"


def read_rows(path: Path) -> Iterator[Row]:
    """Rows of a `.json` file (a list of objects) or a `.jsonl` file (one object per line)."""
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .json or .jsonl")


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(data, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, found {type(data).__name__}")
            yield Row(data, str(path), number)


def _read_json(path: Path) -> Iterator[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        if error.lineno > 1 and text.lstrip().startswith("{"):  # JSON lines saved with a .json name
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path} line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise DataError(f"{path}: expected a list of objects, found {type(content).__name__}")
    for number, data in enumerate(content, start=1):
        if not isinstance(data, dict):
            raise DataError(f"{path} row {number}: expected a JSON object, found {type(data).__name__}")
        yield Row(data, str(path), number)


def _text(row: Row, column: str | None, required: bool) -> str:
    if column is None:
        return ""
    value = row.data.get(column)
    if value is None or value == "":
        if required:
            raise DataError(f"{row.where(column)}: missing or empty")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.where(column)}: expected a string, found {type(value).__name__}")
    return value


@dataclass(frozen=True)
class AlpacaColumns:
    """LLaMA-Factory's alpaca column names (dataset_info.json `columns`), defaults as in its docs."""

    prompt: str = "instruction"
    query: str | None = "input"
    response: str = "output"
    system: str | None = "system"
    history: str | None = "history"


def alpaca_to_messages(row: Row, columns: AlpacaColumns) -> Conversation:
    """instruction (+ input) → user, output → assistant; `history` is a list of [user, assistant] pairs before it."""
    messages: Conversation = []
    system = _text(row, columns.system, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = row.data.get(columns.history) if columns.history else None
    for turn, pair in enumerate(history or [], start=1):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{row.where(columns.history)}: turn {turn} must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = _text(row, columns.prompt, required=True)
    query = _text(row, columns.query, required=False)
    messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    messages.append({"role": "assistant", "content": _text(row, columns.response, required=True)})
    return messages


@dataclass(frozen=True)
class ShareGPTTags:
    """LLaMA-Factory's ShareGPT tags; OpenAI `messages` rows are the same shape with role/content tags."""

    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"
    roles: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "roles",
            {
                self.user_tag: "user",
                self.assistant_tag: "assistant",
                self.system_tag: "system",
                self.observation_tag: "tool",
                self.function_tag: "assistant",
            },
        )


OPENAI_TAGS = ShareGPTTags(role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant")


def sharegpt_to_messages(row: Row, messages_column: str, tags: ShareGPTTags, system_column: str | None) -> Conversation:
    """ShareGPT `conversations` / OpenAI `messages`: system first (optional), then user and assistant alternating."""
    turns = row.data.get(messages_column)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row.where(messages_column)}: expected a non-empty list of messages")
    messages: Conversation = []
    system = _text(row, system_column, required=False) if system_column else ""
    if system:
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns, start=1):
        place = f"{row.where(messages_column)} message {index}"
        if not isinstance(turn, dict):
            raise DataError(f"{place}: expected an object, found {type(turn).__name__}")
        tag = turn.get(tags.role_tag)
        if tag not in tags.roles:
            raise DataError(f"{place}: `{tags.role_tag}` is {tag!r}; expected one of {', '.join(tags.roles)}")
        content = turn.get(tags.content_tag)
        if not isinstance(content, str):
            raise DataError(f"{place}: `{tags.content_tag}` must be a string, found {type(content).__name__}")
        messages.append({"role": tags.roles[tag], "content": content})
    _check_order(messages, row.where(messages_column))
    return messages


def _check_order(messages: Conversation, place: str) -> None:
    """After an optional system message: user (or tool result) and assistant turns alternate, ending on assistant."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for index, message in enumerate(turns):
        expected = ("user", "tool") if index % 2 == 0 else ("assistant",)
        if message["role"] not in expected:
            raise DataError(
                f"{place}: turn {index + 1} is {message['role']!r} but should be {' or '.join(expected)} "
                "(turns alternate user → assistant after an optional system message)"
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise DataError(f"{place}: the conversation must end with an assistant turn")


def fill_placeholders(messages: Conversation, values: Mapping[str, str | None], place: str) -> Conversation:
    """Replace `{{name}}`-style placeholders (identity.json); an unset one is an error, never left in the data."""
    filled = []
    for message in messages:
        content = message["content"]
        for key, value in values.items():
            marker = "{{" + key + "}}"
            if marker in content:
                if value is None:
                    raise DataError(f"{place} contains {marker}; set it, e.g. `tunesmith train ... {key}=...`")
                content = content.replace(marker, value)
        filled.append({**message, "content": content})
    return filled
