"""The Ollama Modelfile: FROM, a TEMPLATE in Ollama's Go template language, SYSTEM, stop tokens and num_ctx.

The Go template is derived from the chat template by rendering, not by parsing Jinja: a conversation of marker
messages is rendered with and without a system message, and the text between the markers gives each role's
opening and closing text, the default system prompt, and whether the system text sits inside the first user turn
(Mistral, Gemma) or in a turn of its own (ChatML, Llama 3). This works for every template whose turns render the
same whatever comes after them, which is what training requires of a template too (see data/templates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ModelError

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) → text
MARKERS = {"system": "\x00SYSTEM\x00", "user1": "\x00USER1\x00", "answer1": "\x00ANSWER1\x00"}
MARKERS |= {"user2": "\x00USER2\x00", "answer2": "\x00ANSWER2\x00"}


@dataclass(frozen=True)
class TurnFormat:
    """The text around each message, as the chat template renders it."""

    head: str  # the start of a conversation without a system message (bos, a default system turn)
    system_open: str  # separate style: before the system text (bos included); merged style: unused
    system_close: str  # separate style: after the system text; merged style: between it and the first user text
    system_in_first_user: bool
    user_open: str
    user_close: str  # after the user text
    answer_open: str  # before an answer in the history
    answer_close: str
    generation_prompt: str  # after the last user message: opens the answer to generate
    default_system: str | None


def _split(text: str, keys: list[str]) -> list[str]:
    pieces = []
    for key in keys:
        before, found, text = text.partition(MARKERS[key])
        if not found:
            raise ModelError(f"the chat template dropped the {key} message; cannot translate it for Ollama")
        pieces.append(before)
    return [*pieces, text]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ModelError(f"the chat template's {what} is not regular enough to translate for Ollama")
    return text[len(prefix) :]


def read_turn_format(render: Render) -> TurnFormat:
    def message(role: str, key: str) -> dict[str, str]:
        return {"role": role, "content": MARKERS[key]}

    turns = [message("user", "user1"), message("assistant", "answer1")]
    turns += [message("user", "user2"), message("assistant", "answer2")]
    plain = _split(render(turns, False), ["user1", "answer1", "user2", "answer2"])
    with_system = _split(render([message("system", "system"), *turns], False), ["system", "user1"])
    start, user_close_in_history, between_answer_and_user, last_user_close, answer_close = plain
    if user_close_in_history != last_user_close:
        raise ModelError("the chat template renders user turns differently; cannot translate it for Ollama")
    user_only = render([message("user", "user1")], False)
    generation_prompt = _strip_prefix(render([message("user", "user1")], True), user_only, "generation prompt")
    user_close = user_only.partition(MARKERS["user1"])[2]
    answer_open = _strip_prefix(user_close_in_history, user_close, "answer turn")
    user_open = _strip_prefix(between_answer_and_user, answer_close, "turn order")
    if not start.endswith(user_open):
        raise ModelError("the chat template opens the first user turn differently; cannot translate it for Ollama")
    head = start[: len(start) - len(user_open)]
    system_open, system_close = with_system[0], with_system[1]
    merged = system_open == head + user_open
    default_system = None
    if merged:
        system_open = head
    else:
        system_close = system_close[: len(system_close) - len(user_open)] if system_close.endswith(user_open) else ""
        if not with_system[1].endswith(user_open):
            raise ModelError("the chat template's system turn is not regular enough to translate for Ollama")
        if head != system_open and head.startswith(system_open) and head.endswith(system_close):
            default_system = head[len(system_open) : len(head) - len(system_close)]
    return TurnFormat(
        head=head,
        system_open=system_open,
        system_close=system_close,
        system_in_first_user=merged,
        user_open=user_open,
        user_close=user_close,
        answer_open=answer_open,
        answer_close=answer_close,
        generation_prompt=generation_prompt,
        default_system=default_system or None,
    )


def chat_renderer(tokenizer) -> Render:
    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def go_literal(text: str) -> str:
    """Text for the template body; `{{` would start an action, so it is written as a Go string action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(turns: TurnFormat) -> str:
    """Ollama's template: .System is the system prompt, .Messages the conversation (system messages skipped)."""
    lit = go_literal
    if turns.system_in_first_user:
        system = f"{lit(turns.head)}{{{{ $system := .System }}}}"
        user = (
            f"{lit(turns.user_open)}{{{{ if $system }}}}{{{{ $system }}}}{lit(turns.system_close)}"
            f'{{{{ $system = "" }}}}{{{{ end }}}}{{{{ .Content }}}}{lit(turns.user_close)}'
        )
    else:
        system = (
            f"{{{{ if .System }}}}{lit(turns.system_open)}{{{{ .System }}}}{lit(turns.system_close)}"
            f"{{{{ else }}}}{lit(turns.head)}{{{{ end }}}}"
        )
        user = f"{lit(turns.user_open)}{{{{ .Content }}}}{lit(turns.user_close)}"
    if turns.generation_prompt:
        user += f"{{{{ if eq (len (slice $.Messages $i)) 1 }}}}{lit(turns.generation_prompt)}{{{{ end }}}}"
    answer = f"{lit(turns.answer_open)}{{{{ .Content }}}}{lit(turns.answer_close)}"
    return (
        f"{system}{{{{ range $i, $message := .Messages }}}}"
        f'{{{{ if eq .Role "user" }}}}{user}{{{{ else if eq .Role "assistant" }}}}{answer}{{{{ end }}}}'
        "{{ end }}"
    )


def quoted(text: str) -> str:
    if '"""' in text:
        raise ModelError('the chat template contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def write_modelfile(out_dir: Path, source: str, render: Render, stop_tokens: list[str], num_ctx: int) -> Path:
    """`Modelfile` in `out_dir`, for `ollama create NAME -f Modelfile` run in that directory."""
    turns = read_turn_format(render)
    lines = [
        "# Ollama Modelfile written by tunesmith export",
        f"FROM {source}",
        f"TEMPLATE {quoted(go_template(turns))}",
    ]
    if turns.default_system:
        lines.append(f"SYSTEM {quoted(turns.default_system)}")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    path = out_dir / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
