"""Shared fixtures: a tiny random-weight Llama that uses SmolLM2's real tokenizer and chat template.

The tiny model makes a training run take seconds on a CPU while exercising the same code as the real model; the
real tokenizer keeps templates and label masks realistic. SmolLM2 itself is used by the tests marked `slow`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

Result = TypeVar("Result")
REPO = Path(__file__).resolve().parents[1]
# LLaMA-Factory's demo data sets, cut down (see its README); tests never read the project's shared data.
DEMO_DATA = REPO / "tests" / "fixtures" / "demo_data"
TEST_FIXTURES = REPO / "tests" / "fixtures"


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunesmith.model.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def wide_tiny_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with layers 64 wide: bitsandbytes quantizes (and 8-bit Adam compresses) only larger blocks."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    target = tmp_path_factory.mktemp("tiny-llama-64")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def contextual_tiny_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with large random weights, so that what it predicts depends on the prompt (with the usual small
    initialisation it gives every prompt the same next token, and comparisons of outputs would prove little)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.5
    target = tmp_path_factory.mktemp("tiny-llama-contextual")
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return target


@pytest.fixture
def identity_data(tmp_path) -> Path:
    """A dataset_dir with LLaMA-Factory's identity.json and alpaca_en_demo.json and their registry."""
    data_dir = tmp_path / "data"
    shutil.copytree(REPO / "data", data_dir)
    return data_dir


def example_for(name: str, finetuning_type: str, folder: Path) -> Path:
    """A copy of the LoRA example examples/`name` for another finetuning_type: its LoRA keys left out, which that
    type would refuse (a key nothing reads is never ignored)."""
    import yaml

    from tunesmith.config.sections import METHOD_ONLY_KEYS

    values = yaml.safe_load((REPO / "examples" / name).read_text(encoding="utf-8"))
    kept = {key: value for key, value in values.items() if key not in METHOD_ONLY_KEYS["lora"]}
    path = folder / f"{finetuning_type}_{name}"
    path.write_text(yaml.safe_dump({**kept, "finetuning_type": finetuning_type}, sort_keys=False), encoding="utf-8")
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def logged_losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def at_once(*calls: Callable[[], Result]) -> list[Result]:
    """What each call returns, the calls run at the same time, for independent `tunesmith` commands run as
    subprocesses: each spends seconds importing libraries on one core, so on two cores two of them take about as long
    as one. The first call runs in this thread (an in-process `main()` sets signal handlers, which only the main
    thread may), the others in a thread each. An exception in a call is raised here, after all of them have ended."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls) - 1)) as pool:
        others = [pool.submit(call) for call in calls[1:]]
        first = calls[0]()
        return [first, *(future.result() for future in others)]
