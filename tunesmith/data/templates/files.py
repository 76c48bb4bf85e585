"""Templates from files: a .jinja chat template, or YAML/JSON fields (ours, or an Alpaca-LoRA template file as it is).

A .jinja file is read like a named template (see `jinja_source.py`). A YAML or JSON file gives the fields of
`TemplateFields` below, for example::

    user: "<|user|>\\n{content}<|end|>\\n<|assistant|>\\n"
    assistant: "{content}<|end|>\\n"
    system: "<|system|>\\n{content}<|end|>\\n"
    stop_words: ["<|end|>"]

The fields are written into the Jinja of `fields/renderer.jinja` as data (a JSON literal), never as code, so a file
cannot reach past what the renderer does; every template, whatever its source, renders in transformers'
`ImmutableSandboxedEnvironment` through `tokenizer.apply_chat_template`.

An Alpaca-LoRA file (`prompt_input`, `prompt_no_input`, `response_split`, `description`) is recognised by its keys.
Alpaca-LoRA fills `prompt_input` with a row's instruction and input, and `prompt_no_input` when there is no input;
the answer follows, then EOS. Our alpaca rows arrive as one user message, "instruction\\ninput", so:
`prompt_no_input` renders the user message (its `{instruction}` is the whole message text), and `prompt_input`
renders a user message that also carries separate `instruction` and `input` keys, which is exactly Alpaca-LoRA's
prompt. A system message, which Alpaca-LoRA has no place for, is written before the first prompt, followed by a
blank line.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from tunesmith.data.templates.jinja_source import PARTS_DIR, TEMPLATE_DIR, Template, read_jinja_template, with_parts
from tunesmith.errors import ConfigError

TEMPLATE_FILE_SUFFIXES = (".jinja", ".yaml", ".yml", ".json")
ALPACA_LORA_KEYS = {"description", "prompt_input", "prompt_no_input", "response_split"}
TOOL_STYLES = tuple(sorted(path.stem.removeprefix("tools_") for path in PARTS_DIR.glob("tools_*.jinja")))
RENDERER = TEMPLATE_DIR / "fields" / "renderer.jinja"


@dataclass(frozen=True)
class TemplateFields:
    """A template as format strings, in LLaMA-Factory's terms: `{content}` is the text, `{bos}`/`{eos}` the tokens."""

    name: str
    user: str  # a user turn followed by the assistant header
    assistant: str  # an assistant turn with its end-of-turn marker
    system: str = "{content}"
    default_system: str = ""
    prefix: str = ""  # written once at the start, e.g. "{bos}"
    system_in_first_user: bool = False  # llama2 puts <<SYS>> inside the first [INST]
    function: str = ""  # an assistant turn that calls tools; default: the assistant format
    observation: str = ""  # a tool result (role `tool`) followed by the assistant header; default: the user format
    tool_style: str = "default"  # how tool definitions and calls are written: one of TOOL_STYLES
    thought_words: tuple[str, str] | None = None  # reasoning templates: the words around a thought
    efficient_eos: bool = False  # a turn ends with the stop word that opens the next one (glm4, baichuan2)
    user_with_input: str = ""  # Alpaca-LoRA's prompt_input: for user messages carrying `instruction` and `input`
    stop_words: tuple[str, ...] = ()  # the first one ends an assistant turn (else the tokenizer's EOS)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "thought_words":
                if value is not None and not (_words(value) and len(value) == 2):
                    raise ValueError("`thought_words` must be two non-empty strings, e.g. ['<think>', '</think>']")
            elif item.name == "stop_words":
                if not _words(value):
                    raise ValueError("`stop_words` must be a list of non-empty strings")
            elif not isinstance(value, bool if isinstance(item.default, bool) else str):
                expected = "true or false" if isinstance(item.default, bool) else "a string"
                raise ValueError(f"`{item.name}` must be {expected}, not {value!r}")
        for name in ("user", "assistant", "system", "function", "observation"):
            fmt = getattr(self, name)
            if fmt and "{content}" not in fmt:
                raise ValueError(f"the `{name}` format must contain {{content}}: {fmt!r}")
        if "{content}" in self.prefix:
            raise ValueError("the `prefix` cannot contain {content}")
        if self.tool_style not in TOOL_STYLES:
            raise ValueError(f"`tool_style` must be one of {', '.join(TOOL_STYLES)}, not {self.tool_style!r}")
        if self.user_with_input:
            if not ("{instruction}" in self.user_with_input and "{input}" in self.user_with_input):
                raise ValueError("`user_with_input` must contain {instruction} and {input}")
            if self.system_in_first_user or self.efficient_eos:
                raise ValueError("`user_with_input` cannot be combined with system_in_first_user or efficient_eos")
        if self.efficient_eos:
            for name in ("user", "observation"):
                fmt = getattr(self, name) or self.user
                if not any(fmt.startswith(word) for word in self.stop_words):
                    raise ValueError(f"with efficient_eos the `{name}` format must start with one of the stop_words")

    def jinja(self) -> str:
        """These fields as one Jinja chat template: the fields as data, the tool style's macros, the renderer."""
        data = asdict(self) | {"thought_words": list(self.thought_words or ()), "stop_words": list(self.stop_words)}
        head = (
            "{#- A template file's fields, rendered by tunesmith's fields/renderer.jinja. -#}\n"
            f"{{%- set fields = {json.dumps(data, ensure_ascii=False)} -%}}\n"  # a JSON object is a Jinja literal
            '{%- include "calls.jinja" -%}\n'
            f'{{%- include "tools_{self.tool_style}.jinja" -%}}\n'
        )
        return with_parts(head + RENDERER.read_text(encoding="utf-8"), RENDERER)


def _words(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(word, str) and word for word in value)


def looks_like_template_file(value: str) -> bool:
    return value.endswith(TEMPLATE_FILE_SUFFIXES) or "/" in value or "\\" in value


def read_template_file(template: str) -> Template:
    """The template in a .jinja file, or the one that the fields of a YAML/JSON file make."""
    path = Path(template)
    if not path.is_file():
        raise ConfigError(f"`template`: template file {path} does not exist")
    if path.suffix == ".jinja":
        return read_jinja_template(path)
    values = {"name": path.stem, **_read_fields(path)}
    known = [item.name for item in fields(TemplateFields)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"template file {path}: unknown keys {', '.join(unknown)}; the known keys are {', '.join(known)}"
        )
    missing = [key for key in ("user", "assistant") if key not in values]
    if missing:
        raise ConfigError(f"template file {path}: {' and '.join(missing)} must be given")
    try:
        template_fields = TemplateFields(**values)
    except ValueError as error:
        raise ConfigError(f"template file {path}: {error}") from None
    end_of_turn = template_fields.stop_words[0] if template_fields.stop_words else None
    return Template(path.stem, template_fields.jinja(), end_of_turn)


def _read_fields(path: Path) -> dict[str, Any]:
    """The `TemplateFields` keyword arguments a YAML/JSON file gives (checked by `TemplateFields` itself)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"template file {path} cannot be read: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"template file {path} must hold a mapping of template fields")
    if "prompt_no_input" in data:
        return _from_alpaca_lora(data, path)
    return {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}


def _from_alpaca_lora(data: dict[str, Any], path: Path) -> dict[str, Any]:
    unknown = set(data) - ALPACA_LORA_KEYS
    if unknown:
        raise ConfigError(f"Alpaca-LoRA template file {path}: unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {"assistant": "{content}{eos}", "system": "{content}\n\n"}
    values["user"] = _python_format(data, "prompt_no_input", {"instruction": "{content}"}, path)
    if "prompt_input" in data:
        values["user_with_input"] = _python_format(
            data, "prompt_input", {"instruction": "{instruction}", "input": "{input}"}, path
        )
    split = data.get("response_split")
    for key in ("prompt_input", "prompt_no_input"):
        if split is not None and key in data and split not in data[key]:
            raise ConfigError(f"Alpaca-LoRA template file {path}: `{key}` does not contain `response_split` {split!r}")
    return values


def _python_format(data: dict[str, Any], key: str, fields: dict[str, str], path: Path) -> str:
    """A `str.format` template (Alpaca-LoRA's) in our format-string language."""
    fmt = data[key]
    if not isinstance(fmt, str):
        raise ConfigError(f"template file {path}: `{key}` must be a string")
    pieces = []
    try:
        for literal, field, _spec, _conversion in string.Formatter().parse(fmt):
            if any(marker in literal for marker in ("{content}", "{bos}", "{eos}", "{instruction}", "{input}")):
                raise ConfigError(f"template file {path}: `{key}` has a literal {{...}} that would read as a field")
            pieces.append(literal)
            if field is not None:
                if field not in fields:
                    raise ConfigError(
                        f"template file {path}: `{key}` has the field {{{field}}}; expected {', '.join(fields)}"
                    )
                pieces.append(fields[field])
    except ValueError as error:  # unbalanced braces
        raise ConfigError(f"template file {path}: `{key}` is not a valid format string ({error})") from None
    missing = [name for name in fields if fields[name] not in pieces]
    if missing:
        raise ConfigError(f"template file {path}: `{key}` lacks {', '.join('{' + name + '}' for name in missing)}")
    return "".join(pieces)
