"""stage: grpo: online RL with TRL's GRPOTrainer (TRL 1.x has no PPO).

Prompts are the prompt rows of any SFT dataset: each conversation up to its last answer, rendered by our data step
with the run's template and the generation prompt, given to TRL as text. The last answer goes along as the column
`answer`, which reward functions receive as a keyword argument.

Rewards: `reward_model`, a model trained by stage: rm (a full model directory, or a LoRA adapter directory whose
adapter_config.json names its base: loaded as AutoModelForSequenceClassification with one label, the adapter merged),
and/or `reward_funcs`, Python functions named as file.py:function, called as
`fn(prompts=[...], completions=[...], answer=[...], **trl_kwargs)` and returning one float per completion.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.data.dataset import load_sft_data
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.errors import ConfigError
from tunesmith.train.preference import no_media
from tunesmith.train.sft import TrainResult
from tunesmith.train.trainer import WholeCheckpoints
from tunesmith.train.trl_stage import Loaded, Stage, StageData, run_trl_stage, without_token_count


def run_grpo(config: RunConfig) -> TrainResult:
    reward_functions(config.preference.reward_funcs)  # a missing file or function fails before anything loads
    return run_trl_stage(config, Stage(load_prompts, build_grpo_trainer))


def last_answer_start(labels: list[int]) -> int:
    """Where the last supervised span (the conversation's last answer) begins."""
    end = max(index for index, label in enumerate(labels) if label != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def load_prompts(config: RunConfig, tokenizer, chat_template: str) -> StageData:
    data = load_sft_data(config.data, tokenizer, chat_template, config.train.seed, cache_dir=config.model.cache_dir)
    # TRL tokenizes the prompt text with the tokenizer's special tokens added: drop those we rendered ourselves
    added = tokenizer.decode(tokenizer("")["input_ids"], skip_special_tokens=False)

    def to_prompt(row: dict[str, Any]) -> dict[str, Any]:
        no_media(row)
        start = last_answer_start(row["labels"])
        prompt = tokenizer.decode(row["input_ids"][:start], skip_special_tokens=False)
        if added and prompt.startswith(added):
            prompt = prompt[len(added) :]
        answer = tokenizer.decode(row["input_ids"][start:], skip_special_tokens=True)
        return {"prompt": prompt, "answer": answer}

    def reshape(dataset):
        return None if dataset is None else dataset.map(to_prompt, remove_columns=dataset.column_names)

    return StageData(reshape(data.train), reshape(data.eval), f"{data.summary()}; grpo: prompts of the SFT rows")


def reward_functions(specs: list[str]) -> list:
    """Each file.py:function, imported."""
    functions = []
    for spec in specs:
        path, _, name = spec.rpartition(":")
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"reward_funcs: {spec}: no file {file}")
        module_spec = importlib.util.spec_from_file_location(f"tunesmith_reward_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        function = getattr(module, name, None)
        if not callable(function):
            raise ConfigError(f"reward_funcs: {spec}: {file} has no function {name}")
        functions.append(function)
    return functions


def load_reward_model(path: str, config: RunConfig, precision):
    """A stage: rm output: a full AutoModelForSequenceClassification directory, or a LoRA adapter on its base."""
    from transformers import AutoModelForSequenceClassification

    from tunesmith.model.load import load_tokenizer
    from tunesmith.model.resolve import resolve_model

    trust = config.model.trust_remote_code
    adapter_config = Path(path).expanduser() / "adapter_config.json"
    if adapter_config.is_file():
        directory = adapter_config.parent
        from peft import PeftModel

        base = json.loads(adapter_config.read_text(encoding="utf-8"))["base_model_name_or_path"]
        base_dir = resolve_model(base, config.model.cache_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=1, dtype=precision.dtype, trust_remote_code=trust
        )
        model = PeftModel.from_pretrained(model, directory).merge_and_unload()
        print(f"reward model: {base} with the LoRA adapter {path}")
        if not (directory / "tokenizer_config.json").is_file():  # an adapter saved without its tokenizer
            directory = Path(base_dir)
    else:
        directory = Path(resolve_model(path, config.model.cache_dir))
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=1, dtype=precision.dtype, trust_remote_code=trust
        )
        print(f"reward model: {path}")
    tokenizer = load_tokenizer(str(directory), trust)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def build_grpo_trainer(loaded: Loaded):
    from trl import GRPOConfig, GRPOTrainer

    config = loaded.config
    preference = config.preference
    rewards, tokenizers = [], []
    if preference.reward_model:
        reward_model, reward_tokenizer = load_reward_model(preference.reward_model, config, loaded.precision)
        rewards.append(reward_model)
        tokenizers.append(reward_tokenizer)
    for function in reward_functions(preference.reward_funcs):
        rewards.append(function)
        tokenizers.append(None)
    args = GRPOConfig(
        **loaded.arguments,
        num_generations=preference.num_generations,
        max_completion_length=config.generation.max_new_tokens,
    )
    watch = without_token_count(args, loaded.callbacks)

    class GRPOStageTrainer(WholeCheckpoints, GRPOTrainer):
        """GRPOTrainer with whole checkpoints."""

    return GRPOStageTrainer(
        model=loaded.model,
        reward_funcs=rewards,
        args=args,
        train_dataset=loaded.data.train,
        eval_dataset=loaded.data.eval,
        processing_class=loaded.tokenizer,
        reward_processing_classes=tokenizers,
        callbacks=watch,
    )
