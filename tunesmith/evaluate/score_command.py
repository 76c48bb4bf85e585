"""`tunesmith score [CONFIG.yaml] [key=value ...] (--file CONVERSATION | --messages JSON)`: print the reward that a
model trained by `stage: rm` gives a conversation.

The model is named with chat's inference keys and flags (config/inference.py): `adapter_name_or_path` (a LoRA run's
output_dir, on its base model) or `model_name_or_path` (a full run's), `template`, `infer_dtype`,
`quantization_bit`, `default_system`. Generation keys are refused: nothing is generated.

The conversation is `{"role", "content"}` messages ending with the assistant's answer, as a JSON list, or an
object with `messages`; a file (YAML or JSON) may also hold a list of such objects: one reward per line, in order.
Each is encoded as stage rm encoded its pairs (data/encode.py: the prompt as inference tokenizes it, the answer
tokenized by itself), so a conversation scores as it would have in training. Rewards go to stdout, notes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from tunesmith.chat.command import add_inference_arguments, inference_config
from tunesmith.chat.engine import ChatEngine, load_chat_engine
from tunesmith.data.encode import encode_conversation
from tunesmith.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_inference_arguments(parser)
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--file", metavar="PATH", help="YAML or JSON: a conversation, or a list of them")
    given.add_argument("--messages", metavar="JSON", help='the conversation, e.g. [{"role": "user", ...}, ...]')


def run(args: argparse.Namespace) -> int:
    config = inference_config(args)
    unused = sorted(config.generation.model_fields_set) + (
        ["enable_thinking"] if config.prompt.enable_thinking is not None else []
    )
    if unused:
        raise ConfigError(f"`{unused[0]}` shapes generated replies; score generates nothing: remove it")
    conversations = read_conversations(args.file, args.messages)
    if config.prompt.default_system:
        conversations = [with_system(messages, config.prompt.default_system) for messages in conversations]

    engine = load_chat_engine(config.model, config.prompt.template, config.engine.infer_dtype, reward=True)
    adapters = f" + adapter {', '.join(engine.adapters)}" if engine.adapters else ""
    print(f"tunesmith score: reward model {engine.model_name}{adapters}", file=sys.stderr)
    for messages in conversations:
        print(f"{reward(engine, messages):.6f}")
    return 0


def reward(engine: ChatEngine, messages: list[dict[str, str]]) -> float:
    """The score head's output for the whole conversation (its last token that is not padding)."""
    tokenizer = engine.tokenizer
    encoded = encode_conversation(tokenizer, tokenizer.chat_template, messages, cutoff_len=1 << 62, mask_history=True)
    input_ids = torch.tensor([encoded.input_ids], device=engine.device)
    with torch.no_grad():
        return engine.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, 0].item()


def read_conversations(path: str | None, messages: str | None) -> list[list[dict[str, str]]]:
    if messages is not None:
        where = "--messages"
        try:
            content: Any = json.loads(messages)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--messages is not JSON ({error}); give a list of role/content objects") from None
    else:
        where = str(path)
        try:
            content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # JSON is YAML too
        except OSError as error:
            raise ConfigError(f"--file: cannot read {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise DataError(f"{path} is neither YAML nor JSON: {error}") from None
    if isinstance(content, list) and content and all(isinstance(item, dict) and "messages" in item for item in content):
        return [conversation(item["messages"], f"{where}[{index}]") for index, item in enumerate(content)]
    if isinstance(content, dict) and "messages" in content:
        content = content["messages"]
    return [conversation(content, where)]


def conversation(content: Any, where: str) -> list[dict[str, str]]:
    """Checked messages: role/content strings, a known role, ending with the assistant's answer to score."""
    if not isinstance(content, list) or not content:
        raise DataError(
            f"{where}: expected a non-empty list of {{role, content}} messages, got {type(content).__name__}"
        )
    for index, message in enumerate(content):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise DataError(f"{where}: message {index} must be an object with exactly `role` and `content`")
        if message["role"] not in ROLES or not isinstance(message["content"], str):
            raise DataError(
                f"{where}: message {index}: role {message['role']!r} must be one of {', '.join(ROLES)}, with "
                "text content"
            )
    if content[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer, which the reward scores")
    return content


def with_system(messages: list[dict[str, str]], system: str) -> list[dict[str, str]]:
    """`default_system` starts a conversation that has no system message of its own."""
    return messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}, *messages]
