"""`response_format: {"type": "json_object"}`: generation constrained so that the answer is always a JSON object.

`JsonPrefix` is a small incremental JSON parser: it takes text a piece at a time and says whether the text so far can
still be the start of one JSON object (a valid prefix), whether the object is complete, and the shortest text that
would complete it. At each step of a JSON row the batcher walks the tokens in the order it would sample them (logits,
plus Gumbel noise when sampling, which samples from the same distribution restricted to the allowed tokens) and takes
the first token whose text keeps a valid prefix and leaves enough of the token limit to close the object. The row
ends as soon as the object is complete. So the answer parses with `json.loads` unless a stop string cuts it, or the
token limit is too small to hold even `{}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

WHITESPACE = " \t\n\r"
DIGITS = "0123456789"
HEX = "0123456789abcdefABCDEF"
ESCAPES = '"\\/bfnrt'
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
MAX_SPACES = 32  # whitespace between tokens: enough for indented output, not a model's endless run of newlines


@dataclass(frozen=True, slots=True)
class JsonPrefix:
    """Where the parser is: `mode`, the open containers (`{` and `[`), whether the open string is a key, and the
    rest of a literal being spelled (`rue` after `t`) or the hex digits still due in a `\\u` escape, and how many
    whitespace characters in a row were just taken. The object starts at the first character."""

    mode: str = "start"
    stack: str = ""
    key: bool = False
    pending: str = ""
    spaces: int = 0

    @property
    def done(self) -> bool:
        return self.mode == "done"

    def feed(self, text: str) -> JsonPrefix | None:
        """The state after `text`, or None if `text` makes it something no JSON object starts with."""
        state: JsonPrefix | None = self
        for char in text:
            state = state._step(char)
            if state is None:
                return None
        return state

    def completion(self) -> str:
        """The shortest text that completes the object from here."""
        text, state = "", self
        while not state.done:
            char = state._closing_char()
            text += char
            state = state._step(char)
        return text

    def _after_value(self, stack: str) -> JsonPrefix:
        return JsonPrefix("after", stack) if stack else JsonPrefix("done")

    def _step(self, char: str) -> JsonPrefix | None:
        mode, stack = self.mode, self.stack
        if mode == "string":
            if char == '"':
                return JsonPrefix("colon", stack) if self.key else self._after_value(stack)
            if char == "\\":
                return JsonPrefix("escape", stack, self.key)
            return None if ord(char) < 0x20 else self
        if mode == "escape":
            if char == "u":
                return JsonPrefix("unicode", stack, self.key, "xxxx")
            return JsonPrefix("string", stack, self.key) if char in ESCAPES else None
        if mode == "unicode":
            if char not in HEX:
                return None
            left = self.pending[1:]
            return JsonPrefix("unicode", stack, self.key, left) if left else JsonPrefix("string", stack, self.key)
        if mode == "literal":
            if char != self.pending[0]:
                return None
            left = self.pending[1:]
            return JsonPrefix("literal", stack, pending=left) if left else self._after_value(stack)
        if mode in NUMBER_MODES:
            following = NUMBER_MODES[mode](char)
            if following is not None:
                return JsonPrefix(following, stack)
            if mode not in NUMBER_ENDS:
                return None
            return JsonPrefix("after", stack)._step(char)  # the number ended; the char belongs to what follows
        if char in WHITESPACE:
            if mode in ("done", "start") or self.spaces >= MAX_SPACES:
                return None
            return JsonPrefix(mode, stack, self.key, self.pending, self.spaces + 1)
        if mode == "start":
            return JsonPrefix("object_first", "{") if char == "{" else None
        if mode in ("object_first", "object_key"):
            if char == '"':
                return JsonPrefix("string", stack, key=True)
            return self._after_value(stack[:-1]) if char == "}" and mode == "object_first" else None
        if mode == "colon":
            return JsonPrefix("value", stack) if char == ":" else None
        if mode == "array_first" and char == "]":
            return self._after_value(stack[:-1])
        if mode in ("value", "array_first"):
            return self._start_value(char)
        if mode == "after":
            top = stack[-1]
            if char == ",":
                return JsonPrefix("object_key" if top == "{" else "value", stack)
            if char == {"{": "}", "[": "]"}[top]:
                return self._after_value(stack[:-1])
        return None

    def _start_value(self, char: str) -> JsonPrefix | None:
        stack = self.stack
        if char == "{":
            return JsonPrefix("object_first", stack + "{")
        if char == "[":
            return JsonPrefix("array_first", stack + "[")
        if char == '"':
            return JsonPrefix("string", stack)
        if char in LITERALS:
            return JsonPrefix("literal", stack, pending=LITERALS[char])
        if char == "-":
            return JsonPrefix("number_sign", stack)
        if char in DIGITS:
            return JsonPrefix("number_zero" if char == "0" else "number_int", stack)
        return None

    def _closing_char(self) -> str:
        mode = self.mode
        if mode in ("literal", "unicode"):
            return self.pending[0] if mode == "literal" else "0"
        closer = {"{": "}", "[": "]"}[self.stack[-1]] if self.stack else ""
        fixed = {"start": "{", "object_key": '"', "colon": ":", "value": "0", "string": '"', "escape": "n"}
        if mode in fixed:
            return fixed[mode]
        if mode in NUMBER_MODES:
            return closer if mode in NUMBER_ENDS else "0"
        return closer  # object_first, array_first, after


def _digit_or(char: str, digit: str | None, **others: str) -> str | None:
    if char in DIGITS:
        return digit
    return next((mode for chars, mode in others.items() if char in NUMBER_CHARS[chars]), None)


NUMBER_CHARS = {"dot": ".", "exp": "eE", "sign": "+-"}
# Each number mode: the mode a char leads to (None: the char does not continue the number).
NUMBER_MODES = {
    "number_sign": lambda c: "number_zero" if c == "0" else ("number_int" if c in DIGITS else None),
    "number_zero": lambda c: _digit_or(c, None, dot="number_dot", exp="number_exp"),
    "number_int": lambda c: _digit_or(c, "number_int", dot="number_dot", exp="number_exp"),
    "number_dot": lambda c: _digit_or(c, "number_frac"),
    "number_frac": lambda c: _digit_or(c, "number_frac", exp="number_exp"),
    "number_exp": lambda c: _digit_or(c, "number_exp_digits", sign="number_exp_sign"),
    "number_exp_sign": lambda c: _digit_or(c, "number_exp_digits"),
    "number_exp_digits": lambda c: _digit_or(c, "number_exp_digits"),
}
NUMBER_ENDS = {"number_zero", "number_int", "number_frac", "number_exp_digits"}  # a complete number may end here


class TokenTexts:
    """The text each token adds when it follows other text (a SentencePiece token's leading space included); None
    for special tokens (an end-of-turn token ends the answer, whatever its text) and for tokens that add nothing or
    only part of a character: a JSON row never takes them."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool):
        vocabulary = len(tokenizer)
        anchor = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a"))[-1:] or [0]
        prefix = tokenizer.decode(anchor, skip_special_tokens=skip_special_tokens)
        pairs = [[*anchor, token] for token in range(vocabulary)]
        decoded = tokenizer.batch_decode(pairs, skip_special_tokens=skip_special_tokens)
        special = set(tokenizer.all_special_ids)
        self.texts: list[str | None] = []
        for token, text in enumerate(decoded):
            added = text[len(prefix) :] if text.startswith(prefix) and token not in special else None
            self.texts.append(added if added and "\ufffd" not in added else None)


def choose_json_token(
    state: JsonPrefix,
    scores: torch.Tensor,
    texts: TokenTexts,
    tokens_left: int,
    generator: torch.Generator | None,
    sample: bool,
) -> int | None:
    """The first token, in the order of `scores` (Gumbel-perturbed when sampling), that keeps the answer a JSON
    prefix and leaves room, in the `tokens_left - 1` tokens after it, for the shortest completion (a token of one
    character per completion character). None when no token does."""
    if sample:
        uniform = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(1e-20, 1.0)
        scores = scores - torch.log(-torch.log(uniform))
    order = torch.argsort(scores, descending=True)
    start = 0
    while start < order.numel():
        for token in order[start : start + 512].tolist():
            text = texts.texts[token] if token < len(texts.texts) else None
            if text is None:
                continue
            following = state.feed(text)
            if following is not None and len(following.completion()) <= tokens_left - 1:
                return token
        start += 512
    return None
