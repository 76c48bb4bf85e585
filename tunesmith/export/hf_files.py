"""The files around the weights: config.json, generation_config.json and the tokenizer with its chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ModelError

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
PROBE_REPLY = "TUNESMITH_PROBE_REPLY"


def read_model_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))


def config_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def choose_dtype(infer_dtype: str, config: dict[str, Any]) -> tuple[torch.dtype, str]:
    """The dtype to write and why: auto keeps the model's, except float32, which becomes bfloat16 (LLaMA-Factory)."""
    if infer_dtype != "auto":
        return getattr(torch, infer_dtype), f"infer_dtype: {infer_dtype}"
    model_dtype = config_dtype(config)
    if model_dtype == torch.float32:
        return torch.bfloat16, "infer_dtype: auto, the model is float32, so bfloat16 as LLaMA-Factory does"
    return model_dtype, f"infer_dtype: auto keeps the model's {DTYPE_NAMES.get(model_dtype, model_dtype)}"


def write_model_config(config: dict[str, Any], dtype: torch.dtype, untied: bool, out_dir: Path) -> None:
    config = dict(config)
    config.pop("quantization_config", None)  # the weights written are plain
    config.pop("torch_dtype", None)
    config["dtype"] = DTYPE_NAMES[dtype]
    if untied:
        config["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_export_tokenizer(tokenizer_dir: Path, template: str | None, trust_remote_code: bool):
    """The tokenizer the run trained with; a named `template` replaces its chat template."""
    from tunesmith.data.templates import install_chat_format, resolve_chat_format
    from tunesmith.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir), trust_remote_code)
    if template is not None:
        install_chat_format(tokenizer, resolve_chat_format(template, tokenizer))
    if not tokenizer.chat_template:
        raise ModelError(
            f"the tokenizer in {tokenizer_dir} has no chat template; set `template:` to the one the run trained with"
        )
    return tokenizer


def end_of_turn_tokens(tokenizer) -> list[str]:
    """Tokens that end a reply: the EOS token and the special token the chat template writes after a reply."""
    tokens = [tokenizer.eos_token] if tokenizer.eos_token else []
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE_REPLY}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    after_reply = rendered.split(PROBE_REPLY, 1)[1] if PROBE_REPLY in rendered else ""
    special = sorted(
        {str(token) for token in [*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()]},
        key=len,
        reverse=True,
    )
    position = 0
    while position < len(after_reply):
        found = next((token for token in special if after_reply.startswith(token, position)), None)
        if found is not None:
            if found not in tokens:
                tokens.append(found)
            break
        if not after_reply[position].isspace():
            break  # plain text after the reply: the template ends turns with EOS only
        position += 1
    return tokens


def write_generation_config(model_dir: Path, config: dict[str, Any], tokenizer, out_dir: Path) -> list[int]:
    """generation_config.json whose eos_token_id lists every end-of-turn token, so every runtime stops."""
    source = model_dir / "generation_config.json"
    generation = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
    eos_ids: list[int] = []
    for value in (generation.get("eos_token_id"), config.get("eos_token_id")):
        eos_ids.extend(value if isinstance(value, list) else [] if value is None else [value])
    eos_ids.extend(tokenizer.convert_tokens_to_ids(token) for token in end_of_turn_tokens(tokenizer))
    eos_ids = list(dict.fromkeys(int(token_id) for token_id in eos_ids))
    generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    for key, token_id in (("bos_token_id", tokenizer.bos_token_id), ("pad_token_id", tokenizer.pad_token_id)):
        if token_id is not None:
            generation.setdefault(key, token_id)
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return eos_ids
