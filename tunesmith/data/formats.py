"""Dataset rows in the forms our users bring → one internal example format.

An `Example` is a conversation, a list of `{"role", "content"}` messages with roles `system`, `user`, `assistant`
and `tool` (exactly what `tokenizer.apply_chat_template` takes; an assistant message may carry OpenAI-style
`tool_calls`), plus what some stages need beside it: tool definitions, the chosen and rejected answers of a
preference pair, a KTO label, media files. Pre-training rows are plain text instead.

Each input format is one function from a row to an example:
- alpaca: `instruction` (+ `input`) → user, `output` → assistant, `system`, `history` ([user, assistant] pairs);
  preference rows have `chosen`/`rejected` strings instead of `output`.
- ShareGPT: `conversations` of `{"from", "value"}` turns with the tags human, gpt, system, function_call and
  observation. A function_call turn becomes an assistant message with `tool_calls`
  (`[{"type": "function", "function": {"name", "arguments": <JSON string>}}]`); an observation a `tool` message.
- OpenAI: `messages` of `{"role", "content"}`, assistant messages possibly with `tool_calls`, `tool` results.
A tool call's `arguments` are kept as JSON text in one spelling (`json.dumps`), however the row wrote them.
- text: one text column (pre-training).
Column and tag names follow LLaMA-Factory's dataset_info.json (`Columns`, `ShareGPTTags`). Every error names the
file, the row and the field, and says what would be valid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tunesmith.data.files import Row, read_rows
from tunesmith.errors import ConfigError, DataError

__all__ = ["Row", "read_rows"]  # the readers live in files.py; re-exported for callers that read and convert

Message = dict[str, Any]
Conversation = list[Message]

MEDIA_MARKERS = {"images": "<image>", "videos": "<video>", "audios": "<audio>"}


@dataclass(frozen=True)
class Columns:
    """The file's column for each part of a row: LLaMA-Factory's dataset_info.json `columns`, with its usual names.

    A column is read when a row has it. `text` is the pre-training text (LLaMA-Factory's `prompt` in a pre-training
    entry, `columns: {prompt: text}`).
    """

    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = "history"
    messages: str | None = "conversations"
    system: str | None = "system"
    tools: str | None = "tools"
    images: str | None = "images"
    videos: str | None = "videos"
    audios: str | None = "audios"
    chosen: str | None = "chosen"
    rejected: str | None = "rejected"
    kto_tag: str | None = "kto_tag"
    text: str | None = "text"


AlpacaColumns = Columns  # the name the alpaca converter's callers know

# The names a file's columns are expected to have: the keys `column_map` may rename to.
COLUMN_NAMES = ("messages", *(value for value in asdict(Columns()).values()))


def check_column_map(column_map: dict[str, str] | None) -> None:
    """`column_map`'s keys are our column names (the config only types it: the names are the data step's)."""
    unknown = sorted(set(column_map or {}) - set(COLUMN_NAMES))
    if unknown:
        names = ", ".join(COLUMN_NAMES)
        raise ConfigError(f"`column_map`: unknown column {', '.join(unknown)}; the keys are our column names: {names}")


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
    roles: dict[str, str] = field(init=False, compare=False)

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

    def prompt_side(self) -> str:
        return f"{self.user_tag} (or {self.observation_tag})"

    def answer_side(self) -> str:
        return f"{self.assistant_tag} (or {self.function_tag})"


OPENAI_TAGS = ShareGPTTags(
    role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant", observation_tag="tool"
)


@dataclass(frozen=True)
class RowFormat:
    """How to read the rows of one dataset."""

    formatting: Literal["alpaca", "sharegpt"] = "alpaca"
    columns: Columns = Columns()
    tags: ShareGPTTags = ShareGPTTags()
    ranking: bool = False  # preference pairs: chosen and rejected answers
    media_dirs: tuple[Path, ...] = ()  # where relative image/video/audio paths are looked up, in order
    answer_optional: bool = False  # predict: an alpaca row without an answer is a prompt to complete


@dataclass
class Example:
    """One row in the internal format; `where` ("file row N") lets the encoder's errors point at the row."""

    where: str
    messages: Conversation = field(default_factory=list)  # for a preference pair: the prompt
    text: str | None = None  # pre-training text
    tools: list[dict[str, Any]] | None = None  # OpenAI-style tool definitions
    chosen: Message | None = None
    rejected: Message | None = None
    kto_tag: bool | None = None
    images: list[str] = field(default_factory=list)  # absolute paths
    videos: list[str] = field(default_factory=list)
    audios: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Example:
        return cls(**json.loads(text))


def row_to_example(row: Row, fmt: RowFormat, kind: Literal["chat", "text"]) -> Example:
    """One row → an example: a conversation (with what the row adds to it), or pre-training text."""
    if kind == "text":
        return Example(row.where(), text=_text(row, fmt.columns.text, required=True, hint=_TEXT_HINT))
    example = _alpaca(row, fmt) if fmt.formatting == "alpaca" else _sharegpt(row, fmt)
    example.tools = parse_tools(row, fmt.columns.tools)
    example.kto_tag = _kto_tag(row, fmt.columns.kto_tag)
    for kind_name in MEDIA_MARKERS:
        setattr(example, kind_name, _media(row, fmt, kind_name, example))
    return example


def detect_format(row: Row, kind: Literal["chat", "text"]) -> RowFormat:
    """The format of a file given by path, from its first row: OpenAI, ShareGPT, alpaca or pre-training text."""
    keys = set(row.data)
    if kind == "text":
        return RowFormat("alpaca")
    for column in ("messages", "conversations"):
        if column in keys:
            turns = _structured(row, column, list)
            first = turns[0] if turns and isinstance(turns[0], dict) else {}
            tags = OPENAI_TAGS if "role" in first else ShareGPTTags()
            ranking = {"chosen", "rejected"} <= keys
            return RowFormat("sharegpt", replace(Columns(), messages=column), tags, ranking)
    if "instruction" in keys:
        return RowFormat("alpaca", ranking={"chosen", "rejected"} <= keys)
    if "text" in keys:
        raise DataError(
            f"{row.where()}: rows with a `text` column and no instruction are pre-training text; use `stage: pt`"
        )
    raise DataError(
        f"{row.where()}: cannot tell the format from the columns {sorted(keys)}; expected alpaca (instruction, "
        "input, output), OpenAI `messages`, ShareGPT `conversations` or pre-training `text`; rename columns with "
        "column_map, e.g. `column_map: {instruction: question, output: answer}`"
    )


# --- alpaca -------------------------------------------------------------------------------------------------------


def _alpaca(row: Row, fmt: RowFormat) -> Example:
    columns = fmt.columns
    messages: Conversation = []
    system = _text(row, columns.system, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = _structured(row, columns.history, list)
    for turn, pair in enumerate(history or [], start=1):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{row.where(columns.history)}: turn {turn} must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = _text(row, columns.prompt, required=True, hint="every alpaca row needs an instruction")
    query = _text(row, columns.query, required=False)
    messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    if fmt.ranking:
        hint = "a preference row needs the better answer in `chosen` and the worse in `rejected`"
        chosen = _text(row, columns.chosen, required=True, hint=hint)
        rejected = _text(row, columns.rejected, required=True, hint=hint)
        return Example(
            row.where(),
            messages,
            chosen={"role": "assistant", "content": chosen},
            rejected={"role": "assistant", "content": rejected},
        )
    hint = "every alpaca row needs the answer"
    if columns.text and columns.text in row.data and (columns.response or "") not in row.data:
        hint += " (rows with a `text` column are pre-training text: use `stage: pt`)"
    answer = _text(row, columns.response, required=not fmt.answer_optional, hint=hint)
    if answer:
        messages.append({"role": "assistant", "content": answer})
    return Example(row.where(), messages)


def alpaca_to_messages(row: Row, columns: Columns = Columns()) -> Conversation:
    """instruction (+ input) → user, output → assistant; `history` is a list of [user, assistant] pairs before it."""
    return _alpaca(row, RowFormat("alpaca", columns)).messages


# --- ShareGPT and OpenAI --------------------------------------------------------------------------------------------


def _sharegpt(row: Row, fmt: RowFormat) -> Example:
    columns, tags = fmt.columns, fmt.tags
    column = columns.messages or "conversations"
    turns = _structured(row, column, list)
    if not turns:
        raise DataError(
            f"{row.where(column)}: expected a non-empty list of messages, e.g. "
            f'[{{"{tags.role_tag}": "{tags.user_tag}", "{tags.content_tag}": "..."}}, ...]'
        )
    system = _text(row, columns.system, required=False)
    messages: Conversation = []
    positions: list[tuple[int, str]] = []  # each message's place in the row and its tag, for error messages
    for index, turn in enumerate(turns, start=1):
        place = f"{row.where(column)} message {index}"
        tag, message = _message(turn, tags, place)
        if message["role"] == "system":
            if index != 1:
                raise DataError(f"{place}: a {tags.system_tag} message can only come first")
            system = message["content"]
            continue
        messages.append(message)
        positions.append((index, tag))
    _check_order(messages, positions, tags, row.where(column), fmt.ranking)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    example = Example(row.where(), messages)
    if fmt.ranking:
        example.chosen = _answer(row, columns.chosen or "chosen", tags)
        example.rejected = _answer(row, columns.rejected or "rejected", tags)
    return example


def sharegpt_to_messages(row: Row, messages_column: str, tags: ShareGPTTags, system_column: str | None) -> Conversation:
    """ShareGPT `conversations` / OpenAI `messages` as plain messages, tool calls written into the content as JSON.

    That is what a chat template that ignores `tool_calls` is given (see `calls_as_content`); the data step keeps
    `tool_calls` for templates that render them.
    """
    fmt = RowFormat("sharegpt", replace(Columns(), messages=messages_column, system=system_column), tags)
    return calls_as_content(_sharegpt(row, fmt).messages)


def _message(turn: Any, tags: ShareGPTTags, place: str) -> tuple[str, Message]:
    if not isinstance(turn, dict):
        raise DataError(f"{place}: expected an object with `{tags.role_tag}` and `{tags.content_tag}`")
    tag = turn.get(tags.role_tag)
    if not isinstance(tag, str) or tag not in tags.roles:
        raise DataError(f"{place}: `{tags.role_tag}` is {tag!r}; expected one of {', '.join(tags.roles)}")
    role = tags.roles[tag]
    content = turn.get(tags.content_tag)
    if tag == tags.function_tag and tag != tags.assistant_tag:
        if not isinstance(content, str):
            raise DataError(f"{place}: `{tags.content_tag}` must be a string, found {type(content).__name__}")
        return tag, {"role": "assistant", "content": "", "tool_calls": parse_call_text(content, place)}
    calls = turn.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise DataError(f"{place}: only {tags.assistant_tag} messages can carry `tool_calls`")
        calls = [_tool_call(call, f"{place} tool call {n}") for n, call in enumerate(_as_list(calls), start=1)]
        content = "" if content is None else content
    if not isinstance(content, str):
        raise DataError(
            f"{place}: `{tags.content_tag}` must be a string, found {type(content).__name__} "
            "(lists of content parts are not supported; write the text as one string)"
        )
    message: Message = {"role": role, "content": content}
    if calls:
        message["tool_calls"] = calls
    return tag, message


def _check_order(
    messages: Conversation, positions: list[tuple[int, str]], tags: ShareGPTTags, place: str, ranking: bool
) -> None:
    """After an optional system message: prompt turns (user, or tool results) and answers alternate.

    Consecutive tool results (the answers to parallel calls) count as one turn. A conversation ends with an answer;
    a preference row's ends with a prompt turn, since its answers are `chosen` and `rejected`.
    """
    rule = f"after an optional {tags.system_tag} message, turns alternate {tags.prompt_side()} → {tags.answer_side()}"
    expect_prompt = True
    previous = None
    for message, (index, tag) in zip(messages, positions, strict=True):
        role = message["role"]
        if role == "tool" and previous == "tool":
            continue
        if (role in ("user", "tool")) != expect_prompt:
            wanted = tags.prompt_side() if expect_prompt else tags.answer_side()
            raise DataError(f"{place}: message {index} is {tag!r} but should be {wanted}; {rule}")
        expect_prompt = not expect_prompt
        previous = role
    if ranking and expect_prompt:
        raise DataError(
            f"{place}: a preference row's conversation must end with a {tags.prompt_side()} turn; "
            "the answers go in `chosen` and `rejected`"
        )
    if not ranking and not expect_prompt:
        raise DataError(f"{place}: the conversation must end with a {tags.answer_side()} turn; {rule}")


def _answer(row: Row, column: str, tags: ShareGPTTags) -> Message:
    """A preference pair's chosen or rejected answer: a message object (or a plain string)."""
    value = row.data.get(column)
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = _structured(row, column, dict)
    if isinstance(value, str) and value:
        return {"role": "assistant", "content": value}
    if value is None or value == "":
        raise DataError(
            f"{row.where(column)}: missing or empty; a preference row needs `chosen` and `rejected` answers, "
            f'each {{"{tags.role_tag}": "{tags.assistant_tag}", "{tags.content_tag}": "..."}}'
        )
    _tag, message = _message(value, tags, row.where(column))
    if message["role"] != "assistant":
        raise DataError(f"{row.where(column)}: must be a {tags.answer_side()} message, found {_tag!r}")
    return message


# --- tools --------------------------------------------------------------------------------------------------------


def parse_tools(row: Row, column: str | None) -> list[dict[str, Any]] | None:
    """The tool definitions of a row (a list, or a JSON string of one) in OpenAI's `{"type": "function", ...}` form."""
    if not column or row.data.get(column) in (None, ""):
        return None
    place = row.where(column)
    valid = '[{"name": ..., "description": ..., "parameters": {...}}]'
    value = row.data[column]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{place}: not valid JSON ({error.msg}); expected a list of tool definitions, {valid}"
            ) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{place}: expected a list of tool definitions, {valid}; found {type(value).__name__}")
    tools = []
    for index, tool in enumerate(value, start=1):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]):
            raise DataError(f"{place} tool {index}: expected an object with a `name`, as in {valid}")
        tools.append({"type": "function", "function": function})
    return tools or None


def parse_call_text(text: str, place: str) -> list[dict[str, Any]]:
    """A ShareGPT function_call turn's JSON (one call or a list of them) → OpenAI-style tool calls."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise DataError(
            f'{place}: a function call must be JSON, {{"name": "...", "arguments": {{...}}}} (or a list of them); '
            f"found {text[:80]!r}"
        ) from None
    return [_tool_call(call, place) for call in _as_list(value)]


def _tool_call(call: Any, place: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
    if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]):
        raise DataError(f'{place}: a tool call needs a `name`, e.g. {{"name": "get_weather", "arguments": {{...}}}}')
    arguments = function.get("arguments")
    if arguments is None:
        arguments = "{}"
    else:
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise DataError(f"{place}: the `arguments` of {function['name']!r} are not valid JSON") from None
        # one spelling of the same JSON, whichever way a row wrote it: what templates render (`tojson`) and
        # what every format can give back
        arguments = json.dumps(arguments, ensure_ascii=False)
    result: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        result["id"] = call["id"]
    return result


def calls_as_content(messages: Conversation) -> Conversation:
    """Tool calls written into the assistant's content, one `{"name", "arguments"}` JSON object per line.

    For chat templates that ignore `tool_calls` (SmolLM2's writes only each message's role and content): without
    this the call would vanish from the text and the model would be trained to answer with an empty turn.
    """
    result = []
    for message in messages:
        calls = message.get("tool_calls")
        if not calls:
            result.append(message)
            continue
        text = "\n".join(
            json.dumps(
                {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])},
                ensure_ascii=False,
            )
            for call in calls
        )
        content = f"{message['content']}\n{text}" if message["content"] else text
        result.append({key: value for key, value in message.items() if key != "tool_calls"} | {"content": content})
    return result


def tools_in_system(messages: Conversation, tools: list[dict[str, Any]]) -> Conversation:
    """Tool definitions written into the system message, for chat templates that ignore `tools`."""
    text = "You have access to the following tools:\n" + "\n".join(
        json.dumps(tool["function"], ensure_ascii=False) for tool in tools
    )
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# --- KTO labels and media -----------------------------------------------------------------------------------------


def _kto_tag(row: Row, column: str | None) -> bool | None:
    value = row.data.get(column) if column else None
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(f"{row.where(column)}: a KTO label must be true (a desired answer) or false; found {value!r}")


def _media(row: Row, fmt: RowFormat, kind: str, example: Example) -> list[str]:
    """A row's image/video/audio files: resolved, checked to exist, and as many as the markers in its messages."""
    column = getattr(fmt.columns, kind)
    if not column or column not in row.data:
        return []
    place = row.where(column)
    value = row.data[column]
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = _structured(row, column, list)
    files = [value] if isinstance(value, str) else (value or [])
    if not isinstance(files, list) or not all(isinstance(item, str) and item for item in files):
        raise DataError(f"{place}: expected a list of file paths (relative to dataset_dir), found {value!r}")
    marker = MEDIA_MARKERS[kind]
    texts = [message.get("content") or "" for message in example.messages]
    texts += [answer["content"] for answer in (example.chosen, example.rejected) if answer]
    markers = sum(text.count(marker) for text in texts)
    if markers != len(files):
        raise DataError(
            f"{place}: {len(files)} file(s) but {markers} {marker} marker(s) in the messages; "
            f"put one {marker} in the text where each file goes"
        )
    return [_find_media(name, fmt.media_dirs, place) for name in files]


def _find_media(name: str, folders: tuple[Path, ...], place: str) -> str:
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [folder / path for folder in folders]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    looked = ", ".join(str(folder) for folder in folders) or "(absolute paths only)"
    raise DataError(f"{place}: file {name!r} does not exist (looked in {looked}; paths are relative to dataset_dir)")


# --- placeholders -------------------------------------------------------------------------------------------------


def fill_placeholders(messages: Conversation, values: Mapping[str, str | None], place: str) -> Conversation:
    """Replace `{{name}}`-style placeholders (identity.json); an unset one is an error, never left in the data."""
    return [_fill(message, values, place) for message in messages]


def fill_example_placeholders(example: Example, values: Mapping[str, str | None]) -> Example:
    example.messages = fill_placeholders(example.messages, values, example.where)
    if example.chosen:
        example.chosen = _fill(example.chosen, values, example.where)
    if example.rejected:
        example.rejected = _fill(example.rejected, values, example.where)
    return example


def _fill(message: Message, values: Mapping[str, str | None], place: str) -> Message:
    content = message["content"]
    for key, value in values.items():
        marker = "{{" + key + "}}"
        if marker in content:
            if value is None:
                raise DataError(f"{place} contains {marker}; set it, e.g. `tunesmith train ... {key}=...`")
            content = content.replace(marker, value)
    return {**message, "content": content}


# --- cells --------------------------------------------------------------------------------------------------------

_TEXT_HINT = "pre-training reads one text column; name it with `columns: {prompt: ...}` or `column_map: {text: ...}`"


def _text(row: Row, column: str | None, required: bool, hint: str = "") -> str:
    if column is None:
        if required:
            raise DataError(f"{row.where()}: no column is set for a required field{'; ' + hint if hint else ''}")
        return ""
    value = row.data.get(column)
    if value is None or value == "":
        if required:
            raise DataError(f"{row.where(column)}: missing or empty{'; ' + hint if hint else ''}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.where(column)}: expected a string, found {type(value).__name__}")
    return value


def _structured(row: Row, column: str | None, kind: type) -> Any:
    """A list or object cell; a string holding JSON (a CSV cell, a `tools` column) is parsed. None when absent."""
    value = row.data.get(column) if column else None
    if value is None or value == "":
        return None
    expected = "a list" if kind is list else "an object"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"{row.where(column)}: expected {expected} (or JSON text of one); {error.msg}") from None
    if not isinstance(value, kind):
        raise DataError(f"{row.where(column)}: expected {expected}, found {type(value).__name__}")
    return value


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]
