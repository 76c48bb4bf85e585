"""Prompt templates: the tokenizer's own chat template by default, or a named one, or one read from a file.

A named template is a Jinja chat template shipped in this folder, `<name>.jinja` (LLaMA-Factory's layouts, so its
tutorials' `template:` values render the same text); adding a file adds a template. Training, `tunesmith chat` and
the saved tokenizer all render through `tokenizer.apply_chat_template` (transformers' sandboxed Jinja): one code
path, and a saved model carries its template. See `jinja_source.py` for what a template file may contain beyond Jinja.

Messages are `{"role": system|user|assistant|tool, "content": ...}`. An assistant message may carry OpenAI-style
`tool_calls` and a `reasoning_content`; tool definitions come as `apply_chat_template(..., tools=[...])` and are
written after the system text in the template's tool style.

Every rendering is prefix-stable: a turn renders the same whatever comes after it, which the label masking in
`encode.py` relies on. The one exception is opt-in: reasoning templates rendered with `preserve_thinking=False` drop
the thoughts of assistant turns before the last user message, as the models do at inference; only the last turn can
then be located, which is what `mask_history` trains.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.templates.files import looks_like_template_file, read_template_file
from tunesmith.data.templates.jinja_source import TEMPLATE_DIR, Template, read_jinja_template
from tunesmith.errors import ConfigError

TEMPLATES: tuple[str, ...] = tuple(sorted(path.stem for path in TEMPLATE_DIR.glob("*.jinja")))


@dataclass(frozen=True)
class ChatFormat:
    """The chat template a run uses, and the token that ends an assistant turn."""

    jinja: str
    eos_token: str
    source: str  # "tokenizer", the template's name, or the template file's path


def find_template(template: str) -> Template:
    """A named template, or the template in a file (.jinja, or .yaml/.json: our fields or an Alpaca-LoRA file)."""
    if template in TEMPLATES:
        return read_jinja_template(TEMPLATE_DIR / f"{template}.jinja")
    if not looks_like_template_file(template):
        raise ConfigError(
            f"`template`: unknown template {template!r}; known templates: {', '.join(TEMPLATES)}; "
            "or give the path of a .jinja, .yaml or .json template file"
        )
    return read_template_file(template)


def resolve_chat_format(template: str | None, tokenizer) -> ChatFormat:
    """Pick the Jinja template for this run and check that the tokenizer can end an assistant turn with it."""
    if template is None:
        if not tokenizer.chat_template:
            raise ConfigError("this tokenizer has no chat template; set `template:` to one of " + ", ".join(TEMPLATES))
        return ChatFormat(tokenizer.chat_template, tokenizer.eos_token, "tokenizer")
    found = find_template(template)
    eos_token = tokenizer.eos_token
    if found.end_of_turn is not None:
        eos_token = found.end_of_turn
        if eos_token not in tokenizer.get_vocab():
            raise ConfigError(
                f"template {found.name!r} ends turns with {eos_token}, which this tokenizer does not have; "
                "use a template made for this model (by default its own chat template is used)"
            )
    elif eos_token is None:
        raise ConfigError(f"template {found.name!r} ends turns with the EOS token, which this tokenizer does not have")
    source = found.name if template in TEMPLATES else template
    return ChatFormat(found.jinja, eos_token, source)


def use_chat_format(tokenizer, template: str | None, processor=None) -> ChatFormat:
    """The run's chat format (`resolve_chat_format`), installed in the tokenizer (`install_chat_format`).

    A vision-language model's `processor` brings its own chat template, which renders image parts."""
    if processor is not None:
        if template is not None:
            print(f"note: template: {template} is not used; a vision-language model renders with its own template")
            template = None
        tokenizer.chat_template = processor.chat_template or tokenizer.chat_template
    chat_format = resolve_chat_format(template, tokenizer)
    install_chat_format(tokenizer, chat_format)
    return chat_format


def install_chat_format(tokenizer, chat_format: ChatFormat) -> None:
    """Make the tokenizer render and stop like the run, so that a saved tokenizer chats the way it was trained."""
    tokenizer.chat_template = chat_format.jinja
    tokenizer.eos_token = chat_format.eos_token
