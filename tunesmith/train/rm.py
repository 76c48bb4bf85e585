"""Reward modelling (`stage: rm`): a scalar reward head on a causal LM, trained on chosen/rejected pairs.

The model is transformers' `AutoModelForSequenceClassification` with one output: the causal LM's body and a new
linear `score` head, read at the last token that is not padding (model/load.py). LoRA trains the head whole
(peft `modules_to_save`, task SEQ_CLS), so the adapter alone scores with plain transformers + peft; full and
freeze train it with the rest. The loss is TRL's `RewardTrainer`'s, -log σ(r_chosen - r_rejected), on the pairs
the data step encoded with the run's chat template (data/stages.py): prompt + chosen and prompt + rejected, both
cut to cutoff_len, never dropped for length. Everything around it (output dir, precision, method, Trainer
arguments, LoRA+, activation offload, length-grouped batches, callbacks, saving) is sft's.

With an eval set (and eval_strategy not `no`), the eval pairs are scored before the first step and after the
last: `eval_accuracy` (share of pairs whose chosen answer scores higher) and `eval_margin` (mean r_chosen -
r_rejected) go to metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import replace

from trl import RewardConfig, RewardTrainer

from tunesmith.config import RunConfig
from tunesmith.data import multimodal
from tunesmith.model.load import load_processor, load_tokenizer
from tunesmith.model.resolve import resolve_model
from tunesmith.train.sft import (
    TrainResult,
    announce_precision,
    build_trainer,
    check_before_loading,
    prepare_chat_format,
    prepare_data,
    prepare_model,
    prepare_run_dir,
    print_batch_plan,
    train_and_save,
    tune_cpu_process,
    write_run_files,
)
from tunesmith.train.trainer import TunesmithTrainer


class RewardModelTrainer(TunesmithTrainer, RewardTrainer):
    """TRL's `RewardTrainer` (pairwise loss, reward metrics) with tunesmith's Trainer changes (LoRA+, activation
    offload, the length-grouped sampler); the chunked loss never applies: a reward batch has no labels."""


def run_rm(config: RunConfig) -> TrainResult:
    """The recipe: output dir → precision → tokenizer → pairs → reward model + method → Trainer → train → save."""
    from transformers import set_seed

    if config.method.stage != "rm":
        raise ValueError(f"run_rm runs stage rm, not {config.method.stage}")  # a dispatch bug, not a user's mistake
    tune_cpu_process()
    run_dir = prepare_run_dir(config)
    set_seed(config.train.seed)  # also the new head's initial weights
    precision = announce_precision(config)
    attention = check_before_loading(config, precision)

    model_dir = resolve_model(config.model.model_name_or_path, config.model.cache_dir)
    processor = load_processor(model_dir, config.model.trust_remote_code)  # a vision-language model is refused
    tokenizer = load_tokenizer(model_dir, config.model.trust_remote_code)
    chat_template = prepare_chat_format(config, tokenizer, processor)
    media = multimodal.ModelMedia.of(config.model, processor)
    data, _ = prepare_data(config, tokenizer, chat_template, media)
    data = replace(data, train=as_reward_pairs(data.train), eval=as_reward_pairs(data.eval))

    model, checkpointing = prepare_model(
        config, model_dir, precision, attention, reward_pad_token_id=tokenizer.pad_token_id
    )
    trainer = build_trainer(
        config,
        model,
        tokenizer,
        data,
        precision,
        run_dir.fingerprint,
        checkpointing,
        run_dir.shared,
        trainer_class=RewardModelTrainer,
        data_collator=reward_batches(tokenizer),
        arguments_class=RewardConfig,
        stage_arguments={
            "max_length": None,  # pairs are already cut to cutoff_len; TRL would drop longer ones
            "disable_dropout": False,  # lora_dropout (and the model's own dropout) stay as configured
            # the accuracy the training starts from (eval_strategy: no turns every evaluation off)
            "eval_on_start": data.eval is not None and config.train.eval_strategy != "no",
        },
    )
    print_batch_plan(config, trainer, data.train_rows)
    write_run_files(run_dir, config, trainer, model)
    return train_and_save(trainer, run_dir, config, tokenizer, processor, after_training=report_reward_accuracy)


def as_reward_pairs(dataset):
    """The data step's pair columns → the pre-tokenized columns TRL's reward trainer reads, `chosen_ids` and
    `rejected_ids`: each the whole conversation (the labels, which marked the answer, are not used)."""
    if dataset is None:
        return None
    dataset = dataset.select_columns(["chosen_input_ids", "rejected_input_ids"])
    return dataset.rename_columns({"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"})


def reward_batches(tokenizer):
    """N chosen rows then N rejected rows, right-padded with the pad token the score head skips."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)


def report_reward_accuracy(trainer) -> None:
    """Score the eval pairs after the last step (unless an evaluation just did) and print accuracy and margin."""
    if trainer.eval_dataset is None or trainer.args.eval_strategy == "no":
        return
    history = trainer.state.log_history
    last = next((entry for entry in reversed(history) if "eval_accuracy" in entry), None)
    if last is None or last["step"] != trainer.state.global_step:
        last = trainer.evaluate() | {"step": trainer.state.global_step}
    first = next(entry for entry in history if "eval_accuracy" in entry)
    if trainer.is_world_process_zero():
        pairs = f"{len(trainer.eval_dataset)} " if hasattr(trainer.eval_dataset, "__len__") else ""
        print(
            f"reward model on {pairs}eval pairs: accuracy {first['eval_accuracy']:.3f} → "
            f"{last['eval_accuracy']:.3f}, mean margin {first['eval_margin']:.3f} → {last['eval_margin']:.3f}"
        )
