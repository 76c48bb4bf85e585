"""The recipe of the stages trained through TRL's trainers (dpo, orpo, simpo, kto, grpo), read top to bottom.

It is sft.py's recipe with two steps handed to the stage: its data (our data step's ids, reshaped into the columns
the TRL trainer takes) and its trainer. Output dir, precision, tokenizer and template, model and method (LoRA,
QLoRA, full, freeze), the callbacks (metrics.jsonl, Ctrl-C, NaN guard, fingerprints), resume and saving are the
SFT recipe's own steps, called from here.

TRL's configs default differently from `TrainingArguments` (gradient checkpointing and bf16 on, learning rate 1e-6,
logging every 10 steps, max_length 1024): every such field is passed explicitly from our config.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.data.templates import use_chat_format
from tunesmith.distributed import fsdp
from tunesmith.errors import NotSupportedYet
from tunesmith.model.load import load_processor, load_tokenizer
from tunesmith.model.resolve import resolve_model
from tunesmith.train import callbacks
from tunesmith.train.sft import (
    TrainResult,
    announce_precision,
    check_before_loading,
    prepare_model,
    prepare_run_dir,
    print_batch_plan,
    run_callbacks,
    tensorboard_folder,
    train_and_save,
    training_argument_values,
    tune_cpu_process,
    write_run_files,
)
from tunesmith.train.trainer import WholeCheckpoints

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO/CPO live in trl.experimental; we pin the TRL we test


@dataclass(frozen=True)
class StageData:
    """The train (and eval) rows in the columns the stage's TRL trainer takes."""

    train: Any
    eval: Any | None
    summary: str

    @property
    def train_rows(self) -> int:
        return len(self.train)


@dataclass(frozen=True)
class Loaded:
    """What the stage's trainer is built from."""

    config: RunConfig
    model_dir: str
    tokenizer: Any
    model: Any
    data: StageData
    precision: Any
    attention: str
    arguments: dict  # TrainingArguments values, for the stage's TRL config
    callbacks: list


@dataclass(frozen=True)
class Stage:
    """A stage: its rows from the data step, and its trainer."""

    load_data: Callable[[RunConfig, Any, str], StageData]
    build_trainer: Callable[[Loaded], Any]


def run_trl_stage(config: RunConfig, stage: Stage) -> TrainResult:
    """output dir → precision → tokenizer → data → model + method → the stage's TRL trainer → train → save."""
    from transformers import PrinterCallback, set_seed

    tune_cpu_process()
    run_dir = prepare_run_dir(config)
    set_seed(config.train.seed)
    precision = announce_precision(config)
    attention = check_before_loading(config, precision)

    model_dir = resolve_model(config.model.model_name_or_path, config.model.cache_dir)
    if load_processor(model_dir, config.model.trust_remote_code) is not None:
        raise NotSupportedYet(f"stage: {config.method.stage} trains text-only models so far; this one takes images")
    tokenizer = load_tokenizer(model_dir, config.model.trust_remote_code)
    chat_format = use_chat_format(tokenizer, config.data.template, None)
    data = stage.load_data(config, tokenizer, chat_format.jinja)  # data before weights: bad rows fail in seconds
    print(data.summary)

    model, checkpointing = prepare_model(config, model_dir, precision, attention)
    arguments = stage_arguments(config, model, data, precision, checkpointing, run_dir.shared)
    watch = run_callbacks(config)
    loaded = Loaded(config, model_dir, tokenizer, model, data, precision, attention, arguments, watch)
    with tensorboard_folder(config.train.logging_dir):  # Trainer's TensorBoard callback is made with the trainer
        trainer = stage.build_trainer(loaded)
    if not isinstance(trainer, WholeCheckpoints):
        raise TypeError(f"{type(trainer).__name__} must take the WholeCheckpoints mixin")  # our bug: a stage's trainer
    trainer.checkpoint_fingerprint = run_dir.fingerprint  # in each checkpoint, so resuming can check it is this run's
    trainer.remove_callback(PrinterCallback)
    if arguments.get("fsdp"):
        trainer.add_callback(fsdp.ShardingCheck())  # fails the run unless the model really is sharded
    print_batch_plan(config, trainer, data.train_rows)
    write_run_files(run_dir, config, trainer, model)
    return train_and_save(trainer, run_dir, config, tokenizer, None, after_training=drop_reference_adapter)


def stage_arguments(config: RunConfig, model, data: StageData, precision, checkpointing, shared: bool) -> dict:
    """Our TrainingArguments values plus the TRL fields whose defaults differ from ours, set explicitly."""
    from tunesmith.patches import apply_fsdp_on_cpu_processes

    train = config.train
    fsdp_arguments = fsdp.training_arguments(train.fsdp, train.fsdp_offload, train.fsdp_config, model)
    if fsdp_arguments:
        apply_fsdp_on_cpu_processes()
    values = training_argument_values(config, model, data, precision, checkpointing, shared, fsdp_arguments)
    values.pop("activation_checkpointing")  # TRL's configs name it gradient_checkpointing (default: on)
    values.pop("activation_checkpointing_kwargs")
    return values | {
        "gradient_checkpointing": bool(checkpointing),
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "disable_dropout": False,  # lora_dropout and the model's own dropout stay as configured
    }


def without_token_count(args, watch: list) -> list:
    """Trainers whose batches have no `input_ids` column (ORPO, CPO, GRPO): Trainer cannot count their tokens, so
    the count is off and tokens/s is not logged rather than logged as 0."""
    args.include_num_input_tokens_seen = "no"
    return [callback for callback in watch if not isinstance(callback, callbacks.TokensPerSecond)]


def drop_reference_adapter(trainer) -> None:
    """TRL keeps the reference as a frozen copy of the adapter ("ref"); the output holds only the trained one."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def reference_description(config: RunConfig, precompute: bool) -> str:
    """Which model the preference losses compare against, in one line for the log."""
    model, method, preference = config.model, config.method, config.preference
    if preference.ref_model:
        adapters = f" with {', '.join(preference.ref_model_adapters)} merged" if preference.ref_model_adapters else ""
        return f"reference: {preference.ref_model}{adapters} (ref_model)"
    if method.finetuning_type == "lora":
        if model.adapter_name_or_path and not method.create_new_adapter:
            return (
                f"reference: the adapter this run continues ({model.adapter_name_or_path[-1]}), as a frozen copy; "
                "not the bare base model"
            )
        if model.adapter_name_or_path:
            return f"reference: the base with {', '.join(model.adapter_name_or_path)} merged (the new adapter off)"
        return "reference: the base model (the new adapter's starting point)"
    if precompute:
        return "reference: the model before training; its log-probs computed once, no second copy kept"
    return "reference: a second, frozen copy of the model (precompute_ref_log_probs: true avoids it)"
