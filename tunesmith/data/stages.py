"""Examples → token ids and labels, by training stage. The masking itself is decided in `encode.py`.

- pt: the text + EOS (BOS first if the tokenizer adds one), every token supervised, cut into cutoff_len pieces; a
  special token's text in the data (`<|endoftext|>`) is tokenized as plain characters.
- sft: the conversation; assistant turns supervised (or everything with `train_on_prompt`; only the last with
  `mask_history`). `input_ids`, `labels`.
- rm, dpo, orpo, simpo (preference pairs): prompt + chosen and prompt + rejected, each with only the answer
  supervised: `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels`.
- kto: the conversation with only its last answer supervised, and `kto_tag` (true: a desired answer).
Preference and KTO examples longer than cutoff_len keep part of both prompt and answer (`fit_lengths`, LLaMA-Factory's
rule): cutting the end, as sft does, would often cut the whole answer, which is all these stages learn from.
Every stage but pt carries `images`, `videos` and `audios` (absolute paths) for a processor.

Tools: a chat template that ignores `tool_calls` (SmolLM2's writes only each message's role and content) gets the
calls written into the assistant content as JSON (`formats.calls_as_content`); one that ignores `tools` gets the
definitions written into the system message (`formats.tools_in_system`). Otherwise the calls would vanish from the
text and the model would learn to answer a tool-using turn with nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import TemplateError, TemplateSyntaxError

from tunesmith.data.encode import IGNORE_INDEX, Encoded, encode_conversation, render
from tunesmith.data.formats import Conversation, Example, calls_as_content, tools_in_system
from tunesmith.data.multimodal import ModelMedia
from tunesmith.errors import ConfigError, DataError

PAIRWISE_STAGES = ("rm", "dpo", "orpo", "simpo")
STAGES = ("pt", "sft", *PAIRWISE_STAGES, "kto")
Stage = Literal["pt", "sft", "rm", "dpo", "orpo", "simpo", "kto"]

MEDIA_COLUMNS = ("images", "videos", "audios")
BOOKKEEPING = ("truncated", "supervised")  # per-example counts for the summary, removed before training


def stage_for_run(run_stage: str, natural_stage: str) -> str:
    """The data-step stage that reads a dataset for a run of `run_stage`, given what the dataset holds: grpo takes
    the prompts of SFT rows; kto takes kto_tag rows, or preference pairs as they are (the recipe unpairs them)."""
    if run_stage == "grpo":
        return "sft"
    if run_stage == "kto" and natural_stage in PAIRWISE_STAGES:
        return "dpo"
    return run_stage


def reads_text(stage: str) -> bool:
    """Pre-training reads plain text; every other stage reads conversations."""
    return stage == "pt"


@dataclass(frozen=True)
class EncodeSettings:
    """Everything besides the tokenizer and template that shapes the ids: part of the cache key."""

    stage: str
    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False
    calls_in_content: bool = False  # the template ignores `tool_calls`
    tools_in_system: bool = False  # the template ignores `tools`


_PROBE = "tunesmith_probe_function"


def tool_support(tokenizer, chat_template: str) -> tuple[bool, bool]:
    """Whether the template writes an assistant's `tool_calls`, and the `tools` definitions, into the text."""
    call = {"type": "function", "function": {"name": _PROBE, "arguments": "{}"}}
    calling = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    tool = {"type": "function", "function": {"name": _PROBE, "description": "d", "parameters": {"type": "object"}}}
    renders_calls = _renders(lambda: render(tokenizer, chat_template, calling, add_generation_prompt=False))
    renders_tools = _renders(
        lambda: render(tokenizer, chat_template, calling[:1], add_generation_prompt=True, tools=[tool])
    )
    return renders_calls, renders_tools


def _renders(rendering) -> bool:
    """A template that raises a template error on the probe (`raise_exception` refusing tool calls, or an undefined
    field of our call format) cannot render it, and gets the fallback. One that does not compile is broken, and
    any other exception is a bug: neither may quietly rewrite the tool data."""
    try:
        return _PROBE in rendering()
    except TemplateSyntaxError as error:
        raise ConfigError(f"the chat template does not compile: {error.message} (line {error.lineno})") from None
    except TemplateError:
        return False


def features(stage: str, bookkeeping: bool = True):
    """The columns (and their types) of a tokenized dataset of this stage, the same for every dataset mixed in."""
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    columns: dict[str, Any]
    if stage == "pt":
        columns = {"input_ids": ids, "labels": ids}
    elif stage in PAIRWISE_STAGES:
        columns = {name: ids for name in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
    elif stage == "kto":
        columns = {"input_ids": ids, "labels": ids, "kto_tag": Value("bool")}
    else:
        columns = {"input_ids": ids, "labels": ids}
    if stage != "pt":
        columns |= {name: List(Value("string")) for name in MEDIA_COLUMNS}
    if bookkeeping:
        columns |= {"truncated": Value("bool"), "supervised": Value("int32")}
    return Features(columns)


class Encoder:
    """A batch of examples (JSON, one column `example`) → the stage's columns; used with `datasets.map(batched=True)`.

    One example can give several rows (pre-training pieces), so the batch is built row by row.
    """

    def __init__(
        self, tokenizer, chat_template: str, settings: EncodeSettings, media: ModelMedia | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.settings = settings
        self.media = media or ModelMedia("of this run")  # which media the model takes (multimodal.py)
        self.media.check_stage(settings.stage)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        columns: dict[str, list[Any]] = defaultdict(list)
        for text in batch["example"]:
            for row in self.encode(Example.from_json(text)):
                for name, value in row.items():
                    columns[name].append(value)
        return {name: columns.get(name, []) for name in features(self.settings.stage)}

    def encode(self, example: Example) -> list[dict[str, Any]]:
        stage = self.settings.stage
        try:
            if stage == "pt":
                return self._pretraining(example)
            self.media.check(example, stage)
            if self.media.takes_images and stage == "sft":  # the model's template takes typed parts, every row
                return [self._with_images(example)]
            media = {name: getattr(example, name) for name in MEDIA_COLUMNS}
            if stage in PAIRWISE_STAGES:
                return [self._pair(example) | media]
            if stage == "kto":
                return [self._feedback(example) | media]
            return [self._conversation(example.messages, example.tools, last_only=self.settings.mask_history) | media]
        except TemplateError as error:
            raise DataError(f"{example.where}: the chat template cannot render this conversation ({error})") from None
        except DataError as error:
            raise DataError(f"{example.where}: {error}") from None

    def _pretraining(self, example: Example) -> list[dict[str, Any]]:
        tokenizer, cutoff = self.tokenizer, self.settings.cutoff_len
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token to end each text with")
        # a special token's text in the data is text: only the EOS added here ends a document
        ids = tokenizer(example.text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        ids = [*ids, tokenizer.eos_token_id]
        pieces = [ids[start : start + cutoff] for start in range(0, len(ids), cutoff)]
        pieces = [piece for piece in pieces if len(piece) > 1]  # one token has no next token to predict
        return [
            {"input_ids": piece, "labels": piece, "truncated": index == 0 and len(pieces) > 1, "supervised": len(piece)}
            for index, piece in enumerate(pieces)
        ]

    def _conversation(self, messages: Conversation, tools, last_only: bool) -> dict[str, Any]:
        settings = self.settings
        messages, tools = self._with_tools(messages, tools)
        encoded = encode_conversation(
            self.tokenizer,
            self.chat_template,
            messages,
            settings.cutoff_len,
            settings.train_on_prompt,
            tools,
            last_only,
        )
        return _columns(encoded)

    def _with_images(self, example: Example) -> dict[str, Any]:
        settings = self.settings
        messages, tools = self._with_tools(example.messages, example.tools)
        return self.media.encode_sft(
            self.tokenizer,
            self.chat_template,
            example,
            messages,
            tools,
            settings.cutoff_len,
            settings.train_on_prompt,
            settings.mask_history,
        )

    def _answered(self, messages: Conversation, tools) -> Encoded:
        """The whole conversation, only its last answer supervised, not yet cut to cutoff_len."""
        messages, tools = self._with_tools(messages, tools)
        return encode_conversation(self.tokenizer, self.chat_template, messages, _NO_LIMIT, False, tools, True)

    def _feedback(self, example: Example) -> dict[str, Any]:
        encoded = self._answered(example.messages, example.tools)
        prompt = _prompt_length(encoded)
        keep = fit_lengths(prompt, len(encoded.input_ids) - prompt, self.settings.cutoff_len)
        return _columns(_cut(encoded, *keep)) | {"kto_tag": example.kto_tag}

    def _pair(self, example: Example) -> dict[str, Any]:
        chosen = self._answered([*example.messages, example.chosen], example.tools)
        rejected = self._answered([*example.messages, example.rejected], example.tools)
        prompt = max(_prompt_length(chosen), _prompt_length(rejected))
        answer = max(len(e.input_ids) - _prompt_length(e) for e in (chosen, rejected))
        keep = fit_lengths(prompt, answer, self.settings.cutoff_len)  # the same prompt cut for both answers
        chosen, rejected = _cut(chosen, *keep), _cut(rejected, *keep)
        return {
            "chosen_input_ids": chosen.input_ids,
            "chosen_labels": chosen.labels,
            "rejected_input_ids": rejected.input_ids,
            "rejected_labels": rejected.labels,
            "truncated": chosen.truncated or rejected.truncated,
            "supervised": min(chosen.supervised_tokens, rejected.supervised_tokens),
        }

    def _with_tools(self, messages: Conversation, tools):
        if self.settings.calls_in_content:
            messages = calls_as_content(messages)
        if tools and self.settings.tools_in_system:
            messages, tools = tools_in_system(messages, tools), None
        return messages, tools


_NO_LIMIT = 1 << 62


def fit_lengths(prompt: int, answer: int, cutoff_len: int) -> tuple[int, int]:
    """How many prompt and answer tokens to keep so that both fit in cutoff_len (LLaMA-Factory's `infer_seqlen`).

    A short answer is kept whole and the prompt cut; else a short prompt is kept whole and the answer cut; else both
    are cut in proportion to their lengths.
    """
    if answer * 2 < cutoff_len:
        answer_room = cutoff_len
    elif prompt * 2 < cutoff_len:
        answer_room = cutoff_len - prompt
    else:
        answer_room = int(cutoff_len * answer / (prompt + answer))
    kept_answer = min(answer_room, answer)
    return min(max(cutoff_len - kept_answer, 0), prompt), kept_answer


def _prompt_length(encoded: Encoded) -> int:
    """Tokens before the first supervised one: the prompt of a conversation whose last answer alone is trained."""
    return next((index for index, label in enumerate(encoded.labels) if label != IGNORE_INDEX), len(encoded.labels))


def _cut(encoded: Encoded, kept_prompt: int, kept_answer: int) -> Encoded:
    """The first `kept_prompt` prompt tokens followed by the first `kept_answer` answer tokens."""
    prompt = _prompt_length(encoded)
    keep = [*range(min(prompt, kept_prompt)), *range(prompt, min(prompt + kept_answer, len(encoded.input_ids)))]
    truncated = len(keep) < len(encoded.input_ids)
    return Encoded([encoded.input_ids[i] for i in keep], [encoded.labels[i] for i in keep], truncated)


def _columns(encoded: Encoded) -> dict[str, Any]:
    return {
        "input_ids": encoded.input_ids,
        "labels": encoded.labels,
        "truncated": encoded.truncated,
        "supervised": encoded.supervised_tokens,
    }
