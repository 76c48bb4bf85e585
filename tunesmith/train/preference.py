"""stage: dpo (every TRL DPO loss), and pref_loss orpo / simpo (TRL's experimental ORPO and CPO trainers).

The rows are our data step's: prompt + chosen and prompt + rejected, tokenized with the run's template, only the
answers supervised. They reach TRL already tokenized, so TRL's own tokenization (another rendering of the template,
an extra EOS) never runs, and the prompt tokens never enter the log-probs:
- DPOTrainer takes `prompt_ids`, `chosen_ids`, `rejected_ids` (its collator's columns). Its `_prepare_dataset`, which
  tokenizes text rows, is the one method overridden: it returns our rows as they are. TRL 1.16 has no public switch
  for pre-tokenized preference rows; `tests/unit/test_stages.py` fails if that method disappears or tokenizes ours.
- ORPO and CPO (SimPO) tokenize through their public `tokenize_row`, which is given our ids in its output format.

The reference model (`reference_for`): LoRA: the model the adapter starts from (TRL switches the adapter off, or
keeps a frozen copy of the adapter this run continues); full/freeze: a second copy, unless
`precompute_ref_log_probs` computes its log-probs once from the model before training; `ref_model` names another.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config import RunConfig
from tunesmith.config.sections import REFERENCE_FREE_LOSSES
from tunesmith.data.dataset import load_data
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.errors import DataError
from tunesmith.model.precision import detect_device
from tunesmith.train.sft import TrainResult
from tunesmith.train.trainer import WholeCheckpoints
from tunesmith.train.trl_stage import (
    Loaded,
    Stage,
    StageData,
    reference_description,
    run_trl_stage,
    without_token_count,
)


def run_dpo(config: RunConfig) -> TrainResult:
    """stage: dpo, orpo or simpo."""
    if config.preference_loss() in REFERENCE_FREE_LOSSES:
        return run_trl_stage(config, Stage(load_pair_rows, build_reference_free_trainer))
    return run_trl_stage(config, Stage(load_dpo_rows, build_dpo_trainer))


# ---- data


def load_pairs(config: RunConfig, tokenizer, chat_template: str):
    """Our data step's preference pairs (stage dpo): chosen/rejected ids with the prompt masked in the labels."""
    return load_data(
        config.data, tokenizer, chat_template, stage="dpo", seed=config.train.seed, cache_dir=config.model.cache_dir
    )


def prompt_length(labels: list[int]) -> int:
    """Tokens before the first supervised one."""
    return next((index for index, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def split_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a conversation whose last answer alone is supervised."""
    start = prompt_length(labels)
    if any(label == IGNORE_INDEX for label in labels[start:]):
        raise DataError("an answer has unsupervised tokens inside it; this is a bug in the data step")
    return input_ids[:start], input_ids[start:]


def no_media(row: dict[str, Any]) -> None:
    if any(row.get(name) for name in ("images", "videos", "audios")):
        raise DataError("a row has images, videos or audio; preference stages train text-only models so far")


def to_dpo_row(row: dict[str, Any]) -> dict[str, Any]:
    no_media(row)
    prompt, chosen = split_answer(row["chosen_input_ids"], row["chosen_labels"])
    rejected_prompt, rejected = split_answer(row["rejected_input_ids"], row["rejected_labels"])
    if prompt != rejected_prompt:
        raise DataError("a pair's chosen and rejected prompts differ after tokenization; this is a bug")
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


DPO_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def reshape(dataset, convert, columns: tuple[str, ...]):
    if dataset is None:
        return None
    mapped = dataset.map(convert, remove_columns=[c for c in dataset.column_names if c not in columns])
    return mapped.select_columns(list(columns))


def load_dpo_rows(config: RunConfig, tokenizer, chat_template: str) -> StageData:
    data = load_pairs(config, tokenizer, chat_template)
    train, evaluation = reshape(data.train, to_dpo_row, DPO_COLUMNS), reshape(data.eval, to_dpo_row, DPO_COLUMNS)
    return StageData(train, evaluation, data.summary())


def to_cpo_row(row: dict[str, Any]) -> dict[str, Any]:
    """ORPO/CPO's `tokenize_row` output: prompt, chosen and rejected ids with attention masks; labels -100 on the
    prompt (exactly our labels)."""
    no_media(row)
    prompt, _ = split_answer(row["chosen_input_ids"], row["chosen_labels"])
    return {
        "prompt_input_ids": prompt,
        "prompt_attention_mask": [1] * len(prompt),
        "chosen_input_ids": row["chosen_input_ids"],
        "chosen_attention_mask": [1] * len(row["chosen_input_ids"]),
        "chosen_labels": row["chosen_labels"],
        "rejected_input_ids": row["rejected_input_ids"],
        "rejected_attention_mask": [1] * len(row["rejected_input_ids"]),
        "rejected_labels": row["rejected_labels"],
    }


def load_pair_rows(config: RunConfig, tokenizer, chat_template: str) -> StageData:
    """Rows for ORPO/CPO: our pairs as they are (their trainers turn each row into `to_cpo_row` via tokenize_row)."""
    data = load_pairs(config, tokenizer, chat_template)
    keep = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "images", "videos", "audios")

    def select(dataset):
        return None if dataset is None else dataset.select_columns([c for c in keep if c in dataset.column_names])

    return StageData(select(data.train), select(data.eval), data.summary())


# ---- the reference model


def decide_precompute(config: RunConfig, model_dir: str) -> bool:
    """precompute_ref_log_probs: true/false as set; auto: when a second copy would not fit by the memory estimate."""
    setting = config.preference.precompute_ref_log_probs
    if setting != "auto":
        return setting
    if config.method.finetuning_type == "lora" and not config.preference.ref_model:
        print("precompute_ref_log_probs: off (auto): LoRA's reference is the base model, no second copy is loaded")
        return False
    from tunesmith.estimate.memory import auto_precompute

    enabled, reason = auto_precompute(config, model_dir, detect_device().type)
    print(f"precompute_ref_log_probs: {reason}")
    return enabled


def reference_for(loaded: Loaded, precompute: bool):
    """The reference model to hand TRL, or None where TRL takes it from the policy (LoRA, or precomputed)."""
    config = loaded.config
    print(reference_description(config, precompute))
    preference = config.preference
    if preference.ref_model:
        return load_frozen_model(
            preference.ref_model,
            preference.ref_model_adapters,
            preference.ref_model_quantization_bit,
            config,
            loaded.precision,
            loaded.attention,
        )
    if config.method.finetuning_type == "lora" or precompute:
        return None
    return load_frozen_model(config.model.model_name_or_path, None, None, config, loaded.precision, loaded.attention)


def load_frozen_model(name: str, adapters: list[str] | None, bits: int | None, config: RunConfig, precision, attention):
    from tunesmith.model.adapters import load_adapters
    from tunesmith.model.load import load_model
    from tunesmith.model.quantize import quantization_for
    from tunesmith.model.resolve import resolve_model

    model_dir = resolve_model(name, config.model.cache_dir)
    quantization = quantization_for(model_dir, bits, "nf4", True, compute_dtype=precision.dtype)
    model = load_model(model_dir, precision.dtype, config.model.trust_remote_code, quantization, attention)
    if adapters:
        model = load_adapters(model, adapters, name, keep_last=False, trainable=False)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


# ---- the batch


def split_into_passes(config: RunConfig, arguments: dict) -> dict:
    """The TrainingArguments values with each per-device batch run as passes of `pairs_per_forward` pairs.

    TRL's pairwise losses are means over the pairs of a batch and Trainer divides each pass's loss by the passes
    before the optimizer step, so b pairs in b/k passes of k give the gradient of one pass of b: the same sampler
    order, optimizer steps, schedule and logged means, with the activations (and padding: a pass is padded to its
    own longest row) of k pairs instead of b."""
    per_device = config.train.per_device_train_batch_size
    pairs = config.preference.pairs_in_one_forward(per_device, detect_device().type)
    setting = config.preference.pairs_per_forward
    print(
        f"pairs_per_forward: {pairs}{' (auto)' if setting == 'auto' else ''}: each batch of {per_device} pair(s) runs "
        f"as {per_device // pairs} forward/backward pass(es) before the optimizer step, the same gradient"
    )
    if pairs == per_device:
        return arguments
    return arguments | {
        "per_device_train_batch_size": pairs,
        "gradient_accumulation_steps": arguments["gradient_accumulation_steps"] * (per_device // pairs),
    }


# ---- trainers


def tokenized_dpo_trainer_class():
    from trl import DPOTrainer

    class TokenizedDPOTrainer(WholeCheckpoints, DPOTrainer):
        """DPOTrainer on rows our data step tokenized (see the module docstring)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return TokenizedDPOTrainer


def dpo_losses(config: RunConfig) -> tuple[list[str], list[float]]:
    """pref_loss, plus TRL's `sft` term weighted pref_ftx."""
    preference = config.preference
    if preference.pref_ftx:
        return [preference.pref_loss, "sft"], [1.0, preference.pref_ftx]
    return [preference.pref_loss], [1.0]


def build_dpo_trainer(loaded: Loaded):
    from trl import DPOConfig

    config = loaded.config
    preference = config.preference
    precompute = decide_precompute(config, loaded.model_dir)
    loss_type, loss_weights = dpo_losses(config)
    args = DPOConfig(
        **split_into_passes(config, loaded.arguments),
        beta=preference.pref_beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        label_smoothing=preference.dpo_label_smoothing,
        ld_alpha=preference.ld_alpha,
        max_length=config.data.cutoff_len,
        precompute_ref_log_probs=precompute,
    )
    return tokenized_dpo_trainer_class()(
        model=loaded.model,
        ref_model=reference_for(loaded, precompute),
        args=args,
        train_dataset=loaded.data.train,
        eval_dataset=loaded.data.eval,
        processing_class=loaded.tokenizer,
        callbacks=loaded.callbacks,
    )


def build_reference_free_trainer(loaded: Loaded):
    """ORPO (beta = its lambda) or SimPO (CPO with loss_type simpo; pref_ftx is CPO's behaviour-cloning weight)."""
    config = loaded.config
    preference = config.preference
    common = {"beta": preference.pref_beta, "max_length": config.data.cutoff_len}
    if config.preference_loss() == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer_class, args = ORPOTrainer, ORPOConfig(**split_into_passes(config, loaded.arguments), **common)
        print("loss: ORPO (TRL's experimental ORPOTrainer); no reference model")
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        trainer_class = CPOTrainer
        args = CPOConfig(
            **split_into_passes(config, loaded.arguments),
            **common,
            loss_type="simpo",
            simpo_gamma=preference.simpo_gamma,
            cpo_alpha=preference.pref_ftx,
        )
        print("loss: SimPO (TRL's experimental CPOTrainer, loss_type simpo); no reference model")

    watch = without_token_count(args, loaded.callbacks)

    class TokenizedTrainer(WholeCheckpoints, trainer_class):
        """Its public `tokenize_row` hands back our ids in its format instead of tokenizing text."""

        def tokenize_row(self, feature, model=None):
            return to_cpo_row(feature)

    return TokenizedTrainer(
        model=loaded.model,
        args=args,
        train_dataset=loaded.data.train,
        eval_dataset=loaded.data.eval,
        processing_class=loaded.tokenizer,
        callbacks=watch,
    )
