"""A conversation → token ids and labels, with the masking decided here and nowhere else.

The whole conversation is rendered once with the chat template and tokenized once, so the ids are exactly what
`tokenizer.apply_chat_template` gives. Which tokens are trained is found in character space: the text each
assistant turn adds (its content and end-of-turn token) is the difference between rendering the conversation up
to that turn and rendering it up to the turn before with the generation prompt. Tokens that start inside such a
span get their id as label; every other token gets -100 unless `train_on_prompt` is set.

With `mask_history` only the last assistant turn is trained: earlier turns are context, rendered as at inference
(reasoning templates drop their thoughts: `preserve_thinking=False`). Otherwise every assistant turn is trained, and
the template is asked to keep earlier thoughts (`preserve_thinking=True`), since a thought is only trained if it stays
in the text.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.formats import Conversation
from tunesmith.errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def supervised_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render(
    tokenizer,
    chat_template: str,
    messages: Conversation,
    add_generation_prompt: bool,
    tools: list[dict] | None = None,
    preserve_thinking: bool = True,
) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        preserve_thinking=preserve_thinking,
    )


def assistant_spans(
    tokenizer,
    chat_template: str,
    messages: Conversation,
    tools: list[dict] | None = None,
    mask_history: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans written by the trained assistant turns."""
    options = {"tools": tools, "preserve_thinking": not mask_history}  # the same for every rendering below
    text = render(tokenizer, chat_template, messages, add_generation_prompt=False, **options)
    trained = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if mask_history:
        trained = trained[-1:]
    spans = []
    for index in trained:
        before = render(tokenizer, chat_template, messages[:index], add_generation_prompt=True, **options)
        through = render(tokenizer, chat_template, messages[: index + 1], add_generation_prompt=False, **options)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                "the chat template renders earlier turns differently once later turns are added, so the "
                "assistant tokens cannot be located; choose a named template with `template:`"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode_conversation(
    tokenizer,
    chat_template: str,
    messages: Conversation,
    cutoff_len: int,
    train_on_prompt: bool = False,
    tools: list[dict] | None = None,
    mask_history: bool = False,
) -> Encoded:
    text, spans = assistant_spans(tokenizer, chat_template, messages, tools, mask_history)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoding["input_ids"]
    labels = []
    span_index = 0
    for token_id, (start, _end) in zip(input_ids, encoding["offset_mapping"], strict=True):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        in_assistant = span_index < len(spans) and spans[span_index][0] <= start
        labels.append(token_id if (in_assistant or train_on_prompt) else IGNORE_INDEX)
    truncated = len(input_ids) > cutoff_len
    return Encoded(input_ids[:cutoff_len], labels[:cutoff_len], truncated)
