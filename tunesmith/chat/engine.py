"""The chat engine: a model (with an optional LoRA adapter) and its tokenizer, streaming replies to a conversation.

Prompts are rendered with `tokenizer.apply_chat_template`, the same path training uses, so a trained output
directory (adapter + tokenizer with its chat template and stop token) chats the way it was trained.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from tunesmith.config import SAVED_CONFIG_FILE
from tunesmith.data.templates import TEMPLATES, install_chat_format, resolve_chat_format
from tunesmith.errors import ConfigError, ModelError
from tunesmith.model.load import load_model, load_tokenizer
from tunesmith.model.precision import choose_precision
from tunesmith.model.resolve import resolve_model

DEFAULT_MODEL = "smollm2-135m-instruct"

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclass(frozen=True)
class GenerationOptions:
    """How a reply is generated; checked when made, so a bad flag fails before a model is loaded."""

    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    top_k: int = 50  # 0 turns top-k filtering off
    repetition_penalty: float = 1.0
    do_sample: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition-penalty must be more than 0 (1 means none), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`; sampling settings only when sampling, so none is silently unused."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "do_sample": not self.greedy,
        }
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


@dataclass
class ChatEngine:
    """A loaded model and tokenizer; `stream` yields the reply to a list of messages as it is generated."""

    model: Any  # a transformers PreTrainedModel, or a peft PeftModel wrapping one
    tokenizer: Any
    model_name: str
    adapter: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(self, messages: list[Message]) -> str:
        """The prompt text for these messages, ending with the assistant header."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

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

    def stream(self, messages: list[Message], options: GenerationOptions) -> Iterator[str]:
        """Yield the reply in pieces as it is generated; closing the iterator (or Ctrl-C) stops generation."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = threading.Event()

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
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

    def reply(self, messages: list[Message], options: GenerationOptions) -> str:
        """The whole reply at once."""
        return "".join(self.stream(messages, options))


def load_chat_engine(
    model: str | None = None,
    adapter: str | None = None,
    template: str | None = None,
    trust_remote_code: bool = False,
) -> ChatEngine:
    """Load `model` (an alias, a directory, a .gguf file or a hub id) and, if given, the LoRA adapter in `adapter`.

    Without `model`, the base model is the one the adapter was trained on, or the default model if there is no
    adapter either. The tokenizer comes from the adapter directory when training saved one there (it carries the
    chat template and stop token used in training), else from the model. `template` names a template to use instead.
    """
    adapter_dir = check_adapter_dir(adapter) if adapter is not None else None
    if model is None:
        model = base_model_of_adapter(adapter_dir) if adapter_dir is not None else DEFAULT_MODEL
    model_dir = resolve_model(model)

    tokenizer_dir = str(adapter_dir) if adapter_dir is not None and has_tokenizer(adapter_dir) else model_dir
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    if template is not None:
        install_chat_format(tokenizer, resolve_chat_format(template, tokenizer))
    elif not tokenizer.chat_template:
        raise ModelError(
            f"the tokenizer in {tokenizer_dir} has no chat template; pass --template with one of "
            + ", ".join(sorted(TEMPLATES))
        )

    precision = choose_precision()  # weights in bfloat16 on a GPU that has it, else float32
    loaded = load_model(model_dir, precision.dtype, trust_remote_code)
    if adapter_dir is not None:
        loaded = apply_adapter(loaded, adapter_dir, model)
    if len(tokenizer) > loaded.get_input_embeddings().num_embeddings:
        raise ModelError(
            f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model only "
            f"{loaded.get_input_embeddings().num_embeddings}; the adapter and model do not belong together"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded.to(device).eval()
    return ChatEngine(loaded, tokenizer, model_name=model, adapter=str(adapter_dir) if adapter_dir else None)


def check_adapter_dir(adapter: str) -> Path:
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ModelError(f"adapter directory {path} does not exist; pass the output_dir of a LoRA training run")
    if not (path / "adapter_config.json").is_file():
        if (path / "config.json").is_file():
            raise ModelError(f"{path} holds a full model, not an adapter; pass it as --model {path}")
        raise ModelError(f"{path} has no adapter_config.json; is it the output_dir of a LoRA training run?")
    return path


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file()


def base_model_of_adapter(adapter_dir: Path) -> str:
    """The model the adapter was trained on: from tunesmith's saved config, else from peft's adapter_config.json."""
    config_file = adapter_dir / SAVED_CONFIG_FILE
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        config = config if isinstance(config, dict) else {}
        # The saved config is flat; one nested by section (model: {model_name_or_path: ...}) is read too.
        section = config.get("model") if isinstance(config.get("model"), dict) else {}
        name = config.get("model_name_or_path") or section.get("model_name_or_path")
        if name:
            return str(name)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if adapter_config.get("base_model_name_or_path"):
        return str(adapter_config["base_model_name_or_path"])
    raise ModelError(
        f"cannot tell which model the adapter in {adapter_dir} was trained on "
        f"(no {SAVED_CONFIG_FILE} and no base_model_name_or_path in adapter_config.json); pass --model"
    )


def apply_adapter(model: Any, adapter_dir: Path, model_name: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, RuntimeError, KeyError) as error:
        # Typically a shape mismatch or missing target layers: the adapter was trained on another model.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        detail = next((line for line in lines if "mismatch" in line), lines[0])  # the first concrete mismatch
        raise ModelError(f"cannot apply the adapter in {adapter_dir} to model {model_name}: {detail}") from None
