"""Custom templates from YAML or JSON files: our own fields, or an Alpaca-LoRA template file as it is.

A template file gives the fields of `NamedTemplate` (see `templates.py`), for example::

    user: "<|user|>\\n{content}<|end|>\\n<|assistant|>\\n"
    assistant: "{content}<|end|>\\n"
    system: "<|system|>\\n{content}<|end|>\\n"
    stop_words: ["<|end|>"]

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
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import ConfigError

TEMPLATE_FILE_SUFFIXES = (".yaml", ".yml", ".json")
ALPACA_LORA_KEYS = {"description", "prompt_input", "prompt_no_input", "response_split"}


def looks_like_template_file(value: str) -> bool:
    return value.endswith(TEMPLATE_FILE_SUFFIXES) or "/" in value or "\\" in value


def read_template_file(path: Path) -> dict[str, Any]:
    """The `NamedTemplate` keyword arguments a template file gives (checked by `NamedTemplate` itself)."""
    if not path.is_file():
        raise ConfigError(f"`template`: template file {path} does not exist")
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
