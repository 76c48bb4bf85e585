"""Prompt templates: the tokenizer's own chat template by default, or a named one.

A named template is a few format strings (LLaMA-Factory's layouts, so its tutorials' `template:` values render the
same text). Each is turned into an ordinary Jinja chat template, so that training, `tunesmith chat` and the saved
tokenizer all render through `tokenizer.apply_chat_template`: one code path, and a saved model carries its template.

In the format strings `{content}` is the message text, `{bos}` / `{eos}` the tokenizer's special tokens. The user
format ends with the assistant header (the generation prompt), as in LLaMA-Factory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tunesmith.errors import ConfigError


@dataclass(frozen=True)
class NamedTemplate:
    name: str
    user: str
    assistant: str
    system: str = "{content}"
    default_system: str = ""
    prefix: str = ""
    system_in_first_user: bool = False  # llama2 puts <<SYS>> inside the first [INST]
    stop_words: tuple[str, ...] = field(default=())

    def jinja(self) -> str:
        """This template as a Jinja chat template for `tokenizer.apply_chat_template`."""
        system_block = (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system_text = messages[0]['content'] -%}"
            f"{{%- else -%}}{{%- set system_text = {_literal(self.default_system)} -%}}{{%- endif -%}}"
        )
        system_render = _render(self.system, "system_text")
        parts = [system_block, _render(self.prefix, None)]
        if not self.system_in_first_user:
            parts.append(f"{{%- if system_text -%}}{system_render}{{%- endif -%}}")
        user = _render(self.user, "message['content']")
        if self.system_in_first_user:
            user_with_system = _render(self.user, f"({_system_expr(self.system)} + message['content'])")
            user = f"{{%- if loop.first and system_text -%}}{user_with_system}{{%- else -%}}{user}{{%- endif -%}}"
        assistant = _render(self.assistant, "message['content']")
        parts.append(
            "{%- for message in messages if message['role'] != 'system' -%}"
            f"{{%- if message['role'] == 'user' -%}}{user}"
            f"{{%- elif message['role'] == 'assistant' -%}}{assistant}"
            "{%- else -%}{{ raise_exception('template " + self.name + " has no format for role ' + message['role']) }}"
            "{%- endif -%}{%- endfor -%}"
        )
        return "".join(parts)


def _literal(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal


def _pieces(fmt: str, content_expr: str | None) -> list[str]:
    """Split a format string into Jinja expressions: literals, the content expression, bos_token, eos_token."""
    expressions: list[str] = []
    rest = fmt
    while rest:
        positions = {marker: rest.find(marker) for marker in ("{content}", "{bos}", "{eos}") if marker in rest}
        if not positions:
            expressions.append(_literal(rest))
            break
        marker = min(positions, key=positions.get)
        start = positions[marker]
        if start:
            expressions.append(_literal(rest[:start]))
        if marker == "{content}":
            if content_expr is None:
                raise ValueError("{content} is not allowed here")
            expressions.append(content_expr)
        else:
            expressions.append("bos_token" if marker == "{bos}" else "eos_token")
        rest = rest[start + len(marker) :]
    return expressions


def _system_expr(fmt: str) -> str:
    return " + ".join(_pieces(fmt, "system_text")) or '""'


def _render(fmt: str, content_expr: str | None) -> str:
    pieces = _pieces(fmt, content_expr)
    return "{{ " + " + ".join(pieces) + " }}" if pieces else ""


TEMPLATES: dict[str, NamedTemplate] = {
    template.name: template
    for template in [
        NamedTemplate(
            name="alpaca",
            user="### Instruction:\n{content}\n\n### Response:\n",
            assistant="{content}{eos}\n\n",
            default_system=(
                "Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.\n\n"
            ),
        ),
        NamedTemplate(
            name="chatml",
            user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            assistant="{content}<|im_end|>\n",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            stop_words=("<|im_end|>",),
        ),
        NamedTemplate(
            name="qwen",
            user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            assistant="{content}<|im_end|>\n",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            stop_words=("<|im_end|>",),
        ),
        NamedTemplate(
            name="qwen3_nothink",
            user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            assistant="{content}<|im_end|>\n",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            stop_words=("<|im_end|>",),
        ),
        NamedTemplate(
            name="llama2",
            user="{bos}[INST] {content} [/INST]",
            assistant="{content}{eos}",
            system="<<SYS>>\n{content}\n<</SYS>>\n\n",
            system_in_first_user=True,
        ),
        NamedTemplate(
            name="llama3",
            prefix="{bos}",
            user=(
                "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            assistant="{content}<|eot_id|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            stop_words=("<|eot_id|>", "<|eom_id|>"),
        ),
        NamedTemplate(
            name="default",
            user="Human: {content}{eos}\nAssistant:",
            assistant="{content}{eos}\n",
            system="System: {content}{eos}\n",
        ),
        NamedTemplate(name="empty", user="{content}", assistant="{content}{eos}"),
    ]
}


@dataclass(frozen=True)
class ChatFormat:
    """The chat template a run uses, and the token that ends an assistant turn."""

    jinja: str
    eos_token: str
    source: str  # "tokenizer" or the template's name


def resolve_chat_format(template: str | None, tokenizer) -> ChatFormat:
    """Pick the Jinja template for this run and check that the tokenizer can end an assistant turn with it."""
    if template is None:
        if not tokenizer.chat_template:
            raise ConfigError(
                "this tokenizer has no chat template; set `template:` to one of " + ", ".join(sorted(TEMPLATES))
            )
        return ChatFormat(tokenizer.chat_template, tokenizer.eos_token, "tokenizer")
    if template not in TEMPLATES:
        raise ConfigError(f"`template`: unknown template {template!r}; known templates: {', '.join(sorted(TEMPLATES))}")
    named = TEMPLATES[template]
    eos_token = tokenizer.eos_token
    if named.stop_words:
        eos_token = named.stop_words[0]
        if eos_token not in tokenizer.get_vocab():
            raise ConfigError(
                f"template {template!r} ends turns with {eos_token}, which this tokenizer does not have; "
                "use a template made for this model (by default its own chat template is used)"
            )
    return ChatFormat(named.jinja(), eos_token, template)


def install_chat_format(tokenizer, chat_format: ChatFormat) -> None:
    """Make the tokenizer render and stop like the run, so that a saved tokenizer chats the way it was trained."""
    tokenizer.chat_template = chat_format.jinja
    tokenizer.eos_token = chat_format.eos_token
