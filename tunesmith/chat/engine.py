"""The chat engine: a model (with optional LoRA adapters) and its tokenizer, streaming replies to a conversation.

Prompts are rendered with `tokenizer.apply_chat_template`, the same path training uses, so a trained output
directory (adapter + tokenizer with its chat template and stop token) chats the way it was trained. Adapters are
applied as training applies them (model/adapters.py): all but the last merged, the last kept as a peft adapter.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import SAVED_CONFIG_FILE
from tunesmith.config.inference import GenerationSection
from tunesmith.config.sections import ModelSection
from tunesmith.data.templates import TEMPLATES, install_chat_format, resolve_chat_format
from tunesmith.errors import ModelError
from tunesmith.model.adapters import check_adapter_dir, load_adapters, recorded_base_model
from tunesmith.model.kernels import choose_attention
from tunesmith.model.load import is_reward_model, load_model, load_tokenizer
from tunesmith.model.precision import choose_precision
from tunesmith.model.quantize import check_cpu_4bit_shapes, quantization_for
from tunesmith.model.resolve import resolve_model

DEFAULT_MODEL = "smollm2-135m-instruct"

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ChatEngine:
    """A loaded model and tokenizer; `stream` yields the reply to a list of messages as it is generated."""

    model: Any  # a transformers PreTrainedModel, or a peft PeftModel wrapping one
    tokenizer: Any
    model_name: str
    adapters: list[str] = field(default_factory=list)
    template_options: dict[str, Any] = field(default_factory=dict)  # e.g. enable_thinking, for templates that read it

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for these messages (and tool definitions, if any), ending with the assistant header."""
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False, **self.template_options
        )

    def encode(self, messages: list[Message]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` (batch of one) on the model's device."""
        # The rendered text already holds any BOS the template wants; adding special tokens would double it.
        encoded = self.tokenizer(self.render(messages), add_special_tokens=False, return_tensors="pt")
        return {name: encoded[name].to(self.device) for name in ("input_ids", "attention_mask")}

    def stop_token_ids(self) -> list[int]:
        """The tokenizer's end-of-turn token first (the trained stop token), then the model's own, if different."""
        ids = [self.tokenizer.eos_token_id]
        model_eos = self.model.generation_config.eos_token_id
        for token_id in model_eos if isinstance(model_eos, list) else [model_eos]:
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    def stream(self, messages: list[Message], options: GenerationSection) -> Iterator[str]:
        """Yield the reply in pieces as it is generated; closing the iterator (or Ctrl-C) stops generation."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = threading.Event()

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=options.skip_special_tokens
        )
        kwargs = {
            **self.encode(messages),
            **options.generate_kwargs(),
            "eos_token_id": self.stop_token_ids(),
            "pad_token_id": self.tokenizer.pad_token_id,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([StopWhenAsked()]),
        }
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as error:  # re-raised in the caller's thread below
                failure.append(error)
                streamer.end()  # without the end signal the caller would wait on the queue forever

        # generate() runs in a thread because the streamer hands text over through a queue as tokens arrive.
        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        try:
            for text in streamer:
                if text:
                    yield text
        finally:
            stop.set()
            thread.join()
        if failure:
            raise failure[0]

    def reply(self, messages: list[Message], options: GenerationSection) -> str:
        """The whole reply at once."""
        return "".join(self.stream(messages, options))


def load_chat_engine(
    model: ModelSection,
    template: str | None = None,
    infer_dtype: str = "auto",
    enable_thinking: bool | None = None,
    reward: bool = False,
) -> ChatEngine:
    """Load the model of `model` (an alias, a directory, a .gguf file or a hub id) with its adapters, if any.

    Without model_name_or_path, the base model is the one the first adapter was trained on, or the default model
    if there is no adapter either. The tokenizer comes from the last adapter's directory when training saved one
    there (it carries the chat template and stop token used in training), else from the model. `template` names
    a template to use instead. A reward model (trained by stage rm) cannot generate and is refused, unless
    `reward` asks for one (`tunesmith score`): then it loads with its score head, and a generating model is refused.
    """
    adapter_dirs = [check_adapter_dir(adapter) for adapter in model.adapter_name_or_path or []]
    name = model.model_name_or_path
    if "model_name_or_path" not in model.model_fields_set:
        name = base_model_of_adapter(adapter_dirs[0]) if adapter_dirs else DEFAULT_MODEL
    model_dir = resolve_model(name, model.cache_dir)
    check_model_kind(model_dir, adapter_dirs, reward)

    tokenizer_dir = str(adapter_dirs[-1]) if adapter_dirs and has_tokenizer(adapter_dirs[-1]) else model_dir
    tokenizer = load_tokenizer(tokenizer_dir, model.trust_remote_code)
    if template is not None:
        install_chat_format(tokenizer, resolve_chat_format(template, tokenizer))
    elif not tokenizer.chat_template:
        raise ModelError(
            f"the tokenizer in {tokenizer_dir} has no chat template; set template (--template) to one of "
            + ", ".join(sorted(TEMPLATES))
        )

    # auto: bfloat16 on a GPU that has it, else float32
    dtype = DTYPES[infer_dtype] if infer_dtype != "auto" else choose_precision().dtype
    quantization = quantization_for(
        model_dir, model.quantization_bit, model.quantization_type, model.double_quantization, compute_dtype=dtype
    )
    attention = choose_attention(model.flash_attn, dtype)
    pad_id = tokenizer.pad_token_id if reward else None
    loaded = load_model(model_dir, dtype, model.trust_remote_code, quantization, attention, reward_pad_token_id=pad_id)
    if model.quantization_bit == 4:
        check_cpu_4bit_shapes(loaded)
    if adapter_dirs:
        loaded = load_adapters(loaded, adapter_dirs, name, keep_last=True)
    if len(tokenizer) > loaded.get_input_embeddings().num_embeddings:
        raise ModelError(
            f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model only "
            f"{loaded.get_input_embeddings().num_embeddings}; the adapter and model do not belong together"
        )
    if not getattr(loaded, "is_quantized", False):  # quantized weights were placed while loading
        loaded.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    loaded.eval()
    options = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return ChatEngine(
        loaded, tokenizer, model_name=name, adapters=[str(d) for d in adapter_dirs], template_options=options
    )


def check_model_kind(model_dir: str, adapter_dirs: list[Path], reward: bool) -> None:
    """A reward model only scores (tunesmith score); a generating model only chats."""
    weights = str(adapter_dirs[-1]) if adapter_dirs else model_dir
    if is_reward_model(model_dir, adapter_dirs) and not reward:
        raise ModelError(
            f"{weights} is a reward model (trained with stage rm): it gives a conversation a score and cannot write "
            "replies; score conversations with `tunesmith score`, or chat with a model trained by stage sft"
        )
    if reward and not is_reward_model(model_dir, adapter_dirs):
        raise ModelError(
            f"{weights} is not a reward model: it has no score head (train one with stage rm, and give its "
            "output_dir as adapter_name_or_path, or as model_name_or_path for a full fine-tune)"
        )


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file()


def base_model_of_adapter(adapter_dir: Path) -> str:
    """The model the adapter was trained on, as its saved config or adapter_config.json names it."""
    recorded = recorded_base_model(adapter_dir)
    if recorded is None:
        raise ModelError(
            f"cannot tell which model the adapter in {adapter_dir} was trained on "
            f"(no {SAVED_CONFIG_FILE} and no base_model_name_or_path in adapter_config.json); "
            "set model_name_or_path (--model)"
        )
    return recorded
