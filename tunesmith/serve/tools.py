"""Function calls: which tool style a chat template writes, and reading the calls back out of a model's answer.

A template shows the tools and writes an assistant's calls in one style (our templates include one of
`data/templates/parts/tools_*.jinja`; a tokenizer's own template is recognised by the same markers). The model,
trained on that text, answers in the same style, so each style's parser is the inverse of its `tool_calls_text`:

- qwen (Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call;
- llama3: `{"name": ..., "parameters": {...}}`, a JSON list of them for several calls;
- mistral: `[TOOL_CALLS]` (optional) then `[{"name": ..., "arguments": {...}}, ...]`;
- glm4: the function's name on one line, its JSON arguments on the next;
- default (LLaMA-Factory's): `Action: name` and `Action Input: {json}` lines.

An answer that does not parse as calls is plain text (the model chose to answer), never an error.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

# The first marker found in a template's text names its style; the order puts the most specific first.
STYLE_MARKERS: tuple[tuple[str, str], ...] = (
    ("qwen", "<tool_call>"),
    ("mistral", "[AVAILABLE_TOOLS]"),
    ("llama3", '{"name": function name, "parameters"'),
    ("glm4", "# 可用工具"),
    ("default", "Action Input:"),
)
TOOL_STYLES = tuple(style for style, _ in STYLE_MARKERS)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON text, as OpenAI returns it

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def tool_style(chat_template: str | None) -> str | None:
    """The tool style of a chat template, or None when it cannot show tools."""
    if not chat_template or "tools" not in chat_template:
        return None
    for style, marker in STYLE_MARKERS:
        if marker in chat_template:
            return style
    return None


def parse_tool_calls(style: str, text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(the text before the calls or None, the calls) when `text` holds calls of known `names`, else (text, [])."""
    content, calls = PARSERS[style](text)
    if not calls or any(call.name not in names for call in calls):
        return text, []
    content = EMPTY_THINKING.sub("", content or "").strip()  # reasoning templates write an empty block
    return content or None, calls


EMPTY_THINKING = re.compile(r"<think>\s*</think>")


def _call(name: Any, arguments: Any) -> ParsedCall | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _calls_from_objects(found: Any, arguments_key: str) -> list[ParsedCall]:
    objects = found if isinstance(found, list) else [found]
    calls = [
        _call(item.get("name"), item.get(arguments_key, item.get("arguments")))
        for item in objects
        if isinstance(item, dict)
    ]
    return calls if calls and len(calls) == len(objects) and all(calls) else []


_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_qwen(text: str) -> tuple[str | None, list[ParsedCall]]:
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = []
    for block in _QWEN_CALL.findall(text[start:]):
        found = _json(block)
        call = _call(found.get("name"), found.get("arguments")) if isinstance(found, dict) else None
        if call is None:
            return text, []
        calls.append(call)
    return text[:start], calls


def parse_llama3(text: str) -> tuple[str | None, list[ParsedCall]]:
    stripped = text.strip()
    if stripped.startswith("<|python_tag|>"):
        stripped = stripped.removeprefix("<|python_tag|>").strip()
    return None, _calls_from_objects(_json(stripped), "parameters")


def parse_mistral(text: str) -> tuple[str | None, list[ParsedCall]]:
    stripped = text.strip()
    content = None
    if "[TOOL_CALLS]" in stripped:
        content, stripped = stripped.split("[TOOL_CALLS]", 1)
    return content, _calls_from_objects(_json(stripped.strip()), "arguments")


def parse_glm4(text: str) -> tuple[str | None, list[ParsedCall]]:
    name, _, arguments = text.strip().partition("\n")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name.strip()):
        return text, []
    found = _json(arguments.strip())
    call = _call(name.strip(), found) if isinstance(found, dict) else None
    return None, [call] if call else []


_ACTION = re.compile(r"Action:\s*(.+?)\s*\nAction Input:\s*(.*?)\s*(?=\nAction:|$)", re.DOTALL)


def parse_default(text: str) -> tuple[str | None, list[ParsedCall]]:
    start = text.find("Action:")
    if start < 0:
        return text, []
    calls = []
    for name, arguments in _ACTION.findall(text[start:]):
        found = _json(arguments.strip("`\n "))
        call = _call(name.strip(), found) if isinstance(found, dict) else None
        if call is None:
            return text, []
        calls.append(call)
    return text[:start], calls


PARSERS = {
    "qwen": parse_qwen,
    "llama3": parse_llama3,
    "mistral": parse_mistral,
    "glm4": parse_glm4,
    "default": parse_default,
}
