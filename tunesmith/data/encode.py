"""A conversation → token ids and labels, with the masking decided here and nowhere else.

The conversation is rendered with the chat template (`tokenizer.apply_chat_template`'s text). Which text each trained
assistant turn adds (its content and end-of-turn marker) is found by rendering: it is the difference between
rendering the conversation up to that turn and rendering it up to the turn before with the generation prompt.

The ids follow one rule (DESIGN.md, "The prompt/answer boundary"): a trained turn is its prompt's ids exactly as
inference tokenizes `apply_chat_template(..., add_generation_prompt=True)`, followed by the ids of the answer's text
tokenized by itself, every one of them supervised. So the text is cut at each trained answer's start and end and
each piece is tokenized alone. Tokenizing the whole text at once would let BPE merge the generation prompt's last
`\\n` with an answer's leading spaces into one prompt token: the answer's first character would never be trained,
and the merged token never occurs at inference, where the model must write that space itself.

Special tokens come from the template, never from the data: a row that types `<|im_end|>` is tokenized as those
characters (`split_special_tokens`), so it cannot end a turn or move the label mask. Each special token in the
row's strings is swapped for a private-use character while rendering, so the template's own markers are the only
special tokens in the rendered text; the swapped text is tokenized with special tokens split.

A tokenizer that tokenizes text in pieces as it tokenizes the whole (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM2)
needs nothing more. A SentencePiece tokenizer puts a space before the first piece of every text it is given (Llama 2,
Mistral v0.1-0.3), so a piece that continues the text (an answer) is tokenized after an anchor: a character that no
vocabulary knows, so that no merge joins it to what follows, dropped with the space given to it. Whether such a
tokenizer also gives that space to the text after each special token differs (a legacy normalizer does, Metaspace
"first" does not); a stretch of swapped data text between two markers is tokenized alone or after the anchor,
whichever reproduces the ids the whole piece has for the stretch.

With `mask_history` only the last assistant turn is trained: earlier turns are context, rendered as at inference
(reasoning templates drop their thoughts: `preserve_thinking=False`). Otherwise every assistant turn is trained, and
the template is asked to keep earlier thoughts (`preserve_thinking=True`), since a thought is only trained if it stays
in the text.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

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
    pieces = TextPieces(tokenizer)
    messages, tools = pieces.escape((messages, tools))
    text, spans = assistant_spans(tokenizer, chat_template, messages, tools, mask_history)
    cuts = [0, *(start for start, _end in spans if start > 0), len(text)]  # each trained answer starts a piece
    input_ids: list[int] = []
    labels: list[int] = []
    span_index = 0
    for piece_start, piece_end in itertools.pairwise(cuts):
        for token_id, offset in pieces.tokens(text[piece_start:piece_end], continuing=piece_start > 0):
            start = piece_start + offset
            while span_index < len(spans) and start >= spans[span_index][1]:
                span_index += 1
            in_assistant = span_index < len(spans) and spans[span_index][0] <= start
            input_ids.append(token_id)
            labels.append(token_id if (in_assistant or train_on_prompt) else IGNORE_INDEX)
    truncated = len(input_ids) > cutoff_len
    return Encoded(input_ids[:cutoff_len], labels[:cutoff_len], truncated)


# --- the data's text, tokenized as text -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerInfo:
    special_ids: frozenset[int]
    tokenizes_in_pieces: bool  # "a\n" and "b" tokenized apart give the ids of "a\nb"


def tokenizer_info(tokenizer) -> TokenizerInfo:
    return _tokenizer_info(tokenizer, len(tokenizer))  # the length: a token added since is seen


@functools.lru_cache(maxsize=8)
def _tokenizer_info(tokenizer, _size: int) -> TokenizerInfo:
    special_ids = frozenset(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    whole = _plain_ids(tokenizer, "a\nb")
    tokenizes_in_pieces = whole == _plain_ids(tokenizer, "a\n") + _plain_ids(tokenizer, "b")
    return TokenizerInfo(special_ids, tokenizes_in_pieces)


def _plain_ids(tokenizer, text: str, split_special_tokens: bool = False) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]


# Supplementary Private Use Area-B: characters no tokenizer gives a meaning to, standing in for a special token's text.
_PRIVATE_USE = range(0x10FFFD, 0x100000, -1)
# A private-use character of another plane: unknown to every vocabulary, so no merge joins it to the text after it.
_ANCHOR = chr(0xFFFFD)


class TextPieces:
    """Tokenizes rendered text in which the data's special-token texts stand as private-use characters.

    `escape` swaps each special token typed in the data's strings for a private-use character (one per distinct
    text, none that the data already holds); `tokens` tokenizes a piece of the rendering: the template's markers as
    special tokens, the swapped texts as plain characters.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokenizer_info = tokenizer_info(tokenizer)
        self.literal: dict[str, str] = {}  # private-use character → the special token's text it stands for

    def escape(self, value: Any) -> Any:
        """Messages and tool definitions with special-token texts swapped out of every string but the roles."""
        strings = _strings(value)
        if not strings:
            return value
        encodings = self.tokenizer(strings, add_special_tokens=False, return_offsets_mapping=True)
        found: dict[str, list[tuple[int, int]]] = {}
        for text, ids, offsets in zip(strings, encodings["input_ids"], encodings["offset_mapping"], strict=True):
            places = [
                span for token, span in zip(ids, offsets, strict=True) if token in self.tokenizer_info.special_ids
            ]
            if places:
                found[text] = places
        if not found:
            return value
        taken = set("".join(strings)) | set(self.literal)
        free = (chr(code) for code in _PRIVATE_USE if chr(code) not in taken)
        stand_in: dict[str, str] = {}
        escaped: dict[str, str] = {}
        for text, places in found.items():
            parts, start = [], 0
            for begin, end in places:
                literal = text[begin:end]
                if literal not in stand_in:
                    stand_in[literal] = next(free)
                    self.literal[stand_in[literal]] = literal
                parts += [text[start:begin], stand_in[literal]]
                start = end
            escaped[text] = "".join([*parts, text[start:]])
        return _replace_strings(value, escaped)

    def tokens(self, piece: str, continuing: bool = False) -> list[tuple[int, int]]:
        """Each token of a piece of the rendering with the offset in the piece where it starts.

        A piece `continuing` the text (an answer's) is tokenized as text that follows other text: a SentencePiece
        tokenizer does not put its space before it. (A tokenizer that tokenizes in pieces needs no telling.)
        """
        continuing = continuing and not self.tokenizer_info.tokenizes_in_pieces
        tokens = self._anchored(piece, continuing, split_special_tokens=False)
        if not any(character in piece for character in self.literal):
            return [(token, begin) for token, begin, _end in tokens]
        # the template's markers are the only special tokens left in the piece; between them, the data's text
        result: list[tuple[int, int]] = []
        start = 0
        stretch: list[tuple[int, int]] = []  # the tokens since the last marker, as the whole piece has them
        for token, begin, end in tokens:
            # a marker; not an unknown-token id standing for a swapped character
            if token in self.tokenizer_info.special_ids and piece[begin:end] not in self.literal:
                result += [*self._text_tokens(piece, start, begin, stretch), (token, begin)]
                start, stretch = end, []
            else:
                stretch.append((token, begin))
        return result + self._text_tokens(piece, start, len(piece), stretch)

    def _text_tokens(self, piece: str, start: int, end: int, in_piece: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """piece[start:end] with the swapped texts restored, tokenized as plain text; offsets in the piece.

        `in_piece` is how the whole piece tokenized the stretch: it tells whether the tokenizer treats a stretch
        after a marker as a text of its own (SentencePiece's space before it or not) or as a continuation.
        """
        escaped = piece[start:end]
        if not any(character in self.literal for character in escaped):
            return in_piece
        in_piece_ids = [token for token, _begin in in_piece]
        continuing = next(
            (
                mode
                for mode in (False, True)
                if [token for token, _b, _e in self._anchored(escaped, mode, split_special_tokens=True)] == in_piece_ids
            ),
            None,
        )
        if continuing is None:
            raise RuntimeError(f"cannot reproduce how {type(self.tokenizer).__name__} tokenizes {escaped!r}")
        parts, origin = [], []
        for position in range(start, end):
            restored = self.literal.get(piece[position], piece[position])
            parts.append(restored)
            origin += [position] * len(restored)
        last = len(origin) - 1
        restored_tokens = self._anchored("".join(parts), continuing, split_special_tokens=True)
        return [(token, origin[min(begin, last)]) for token, begin, _end in restored_tokens]

    def _anchored(self, text: str, continuing: bool, split_special_tokens: bool) -> list[tuple[int, int, int]]:
        """The tokens of a text with their spans in it: alone, or after an anchor that never merges (dropped)."""
        anchor = _ANCHOR if continuing else ""
        encoding = self.tokenizer(
            anchor + text,
            add_special_tokens=False,
            split_special_tokens=split_special_tokens,
            return_offsets_mapping=True,
        )
        return [
            (token, begin - len(anchor), end - len(anchor))
            for token, (begin, end) in zip(*_ids_and_offsets(encoding), strict=True)
            if begin >= len(anchor)
        ]


def _ids_and_offsets(encoding) -> tuple[list[int], list[tuple[int, int]]]:
    return encoding["input_ids"], encoding["offset_mapping"]


def _strings(value: Any) -> list[str]:
    """Every string in messages or tool definitions except a message's role."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [text for item in value for text in _strings(item)]
    if isinstance(value, dict):
        return [text for key, item in value.items() if key != "role" for text in _strings(item)]
    return []


def _replace_strings(value: Any, replacements: dict[str, str]) -> Any:
    if isinstance(value, str):
        return replacements.get(value, value)
    if isinstance(value, list | tuple):
        return type(value)(_replace_strings(item, replacements) for item in value)
    if isinstance(value, dict):
        return {key: item if key == "role" else _replace_strings(item, replacements) for key, item in value.items()}
    return value
