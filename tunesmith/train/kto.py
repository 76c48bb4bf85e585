"""stage: kto, through TRL's KTOTrainer, on rows our data step tokenized.

Rows: `kto_tag` datasets (a conversation whose last answer is desirable or not), or preference pairs unpaired (the
chosen answer desirable, the rejected one not). All datasets of a run must be one kind or the other.

KTO estimates its KL term from mismatched (prompt, answer) pairs of the same batch: TRL reads rows in order
(`train_sampling_strategy: sequential`), so the rows are shuffled here, seeded, and each batch's answers are rotated
by one into `KL_completion_ids`, as TRL's own preparation does. Like DPOTrainer, KTOTrainer's `_prepare_dataset` (which
tokenizes text rows) is the one method overridden, returning our rows as they are.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config import RunConfig
from tunesmith.data.dataset import load_data
from tunesmith.data.files import read_rows
from tunesmith.data.registry import resolve_datasets
from tunesmith.data.stages import PAIRWISE_STAGES
from tunesmith.errors import ConfigError
from tunesmith.train.preference import decide_precompute, no_media, reference_for, split_answer
from tunesmith.train.sft import TrainResult
from tunesmith.train.trainer import WholeCheckpoints
from tunesmith.train.trl_stage import Loaded, Stage, StageData, run_trl_stage

KTO_COLUMNS = ("prompt_ids", "completion_ids", "label")


def run_kto(config: RunConfig) -> TrainResult:
    return run_trl_stage(config, Stage(load_kto_rows, build_kto_trainer))


def rows_are_pairs(config: RunConfig) -> bool:
    """Whether the run's datasets hold preference pairs (unpaired for KTO) rather than kto_tag rows."""
    specs = resolve_datasets(config.data.dataset + config.data.eval_dataset, config.data.dataset_dir)
    kinds = {spec.name: holds(spec) for spec in specs}
    pairs = {name for name, stage in kinds.items() if stage in PAIRWISE_STAGES}
    if pairs and len(pairs) < len(kinds):
        raise ConfigError(
            f"stage: kto reads either kto_tag rows or preference pairs (unpaired), not both in one run: "
            f"{', '.join(sorted(pairs))} hold pairs, {', '.join(sorted(set(kinds) - pairs))} do not"
        )
    return bool(pairs)


def holds(spec) -> str:
    """The stage a dataset's rows are for; a file given by path: from the columns of its first row."""
    if not spec.from_path:
        return spec.natural_stage
    first = next(read_rows(spec.files[0]), None)
    return "dpo" if first is not None and {"chosen", "rejected"} <= set(first.data) else "kto"


def unpaired(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Each pair → its chosen answer (desirable) and its rejected one (undesirable), with the shared prompt."""
    rows: dict[str, list[Any]] = {name: [] for name in KTO_COLUMNS}
    for index in range(len(batch["chosen_input_ids"])):
        row = {name: values[index] for name, values in batch.items()}
        no_media(row)
        for side, label in (("chosen", True), ("rejected", False)):
            prompt, answer = split_answer(row[f"{side}_input_ids"], row[f"{side}_labels"])
            rows["prompt_ids"].append(prompt)
            rows["completion_ids"].append(answer)
            rows["label"].append(label)
    return rows


def to_kto_row(row: dict[str, Any]) -> dict[str, Any]:
    no_media(row)
    prompt, answer = split_answer(row["input_ids"], row["labels"])
    return {"prompt_ids": prompt, "completion_ids": answer, "label": bool(row["kto_tag"])}


def with_kl_answers(dataset, batch_size: int, seed: int):
    """Shuffled (TRL reads KTO rows in order), then each batch's answers rotated by one as the KL term's answers."""

    def rotate(batch):
        answers = batch["completion_ids"]
        return {"KL_completion_ids": [answers[-1], *answers[:-1]]}

    return dataset.shuffle(seed=seed).flatten_indices().map(rotate, batched=True, batch_size=batch_size)


def load_kto_rows(config: RunConfig, tokenizer, chat_template: str) -> StageData:
    pairs = rows_are_pairs(config)
    data = load_data(
        config.data,
        tokenizer,
        chat_template,
        stage="dpo" if pairs else "kto",
        seed=config.train.seed,
        cache_dir=config.model.cache_dir,
    )

    def reshape(dataset, batch_size: int):
        if dataset is None:
            return None
        if pairs:
            dataset = dataset.map(unpaired, batched=True, remove_columns=dataset.column_names)
        else:
            dataset = dataset.map(to_kto_row, remove_columns=dataset.column_names)
        return with_kl_answers(dataset, batch_size, config.train.seed)

    train = reshape(data.train, config.train.per_device_train_batch_size)
    evaluation = reshape(data.eval, config.train.per_device_eval_batch_size)
    desirable = sum(train["label"])
    summary = f"{data.summary()}; kto: {desirable} desirable, {len(train) - desirable} undesirable answers"
    if pairs:
        summary += " (preference pairs unpaired)"
    return StageData(train, evaluation, summary)


def build_kto_trainer(loaded: Loaded):
    from trl import KTOConfig, KTOTrainer

    class TokenizedKTOTrainer(WholeCheckpoints, KTOTrainer):
        """KTOTrainer on rows our data step tokenized (see the module docstring)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    config = loaded.config
    preference = config.preference
    precompute = decide_precompute(config, loaded.model_dir)
    args = KTOConfig(
        **loaded.arguments,
        beta=preference.pref_beta,
        desirable_weight=preference.kto_chosen_weight,
        undesirable_weight=preference.kto_rejected_weight,
        max_length=config.data.cutoff_len,
        precompute_ref_log_probs=precompute,
    )
    return TokenizedKTOTrainer(
        model=loaded.model,
        ref_model=reference_for(loaded, precompute),
        args=args,
        train_dataset=loaded.data.train,
        eval_dataset=loaded.data.eval,
        processing_class=loaded.tokenizer,
        callbacks=loaded.callbacks,
    )
