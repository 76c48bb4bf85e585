"""The predict config: LLaMA-Factory's predict YAML (`do_predict` + `predict_with_generate`) as `tunesmith predict`
takes it.

The model, template and generation keys are the inference config's (config/inference.py); the keys below say what to
predict on and where to write. A key of LLaMA-Factory's predict YAML that means nothing here is refused with the
reason, never ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.config.inference import InferenceConfig, _flat, build_inference_config
from tunesmith.config.load import describe_validation_error, parse_overrides, read_yaml
from tunesmith.config.sections import DataSection, RunConfig, Section, _split_list
from tunesmith.errors import ConfigError, NotSupportedYet


class PredictSection(Section):
    eval_dataset: list[str] = Field(
        default_factory=list, description="Datasets to predict on: names in dataset_dir/dataset_info.json or paths."
    )
    dataset: list[str] = Field(default_factory=list, description="The same as eval_dataset (give one of the two).")
    dataset_dir: str = DataSection.model_fields["dataset_dir"]
    max_samples: int | None = Field(None, gt=0, description="Predict at most this many rows of each dataset.")
    name: str | None = DataSection.model_fields["name"]
    author: str | None = DataSection.model_fields["author"]
    column_map: dict[str, str] | None = DataSection.model_fields["column_map"]
    val_size: float = Field(
        0.0,
        ge=0,
        description="Predict only the rows a training run on these datasets with this val_size and seed held out "
        "(its eval split): scores on rows the adapter never saw. The same rows as long as training dropped none "
        "(its data summary says how many).",
    )
    cutoff_len: int = Field(
        2048, gt=0, description="Longest prompt in tokens; a longer one keeps its last cutoff_len tokens."
    )
    per_device_eval_batch_size: int = Field(8, gt=0, description="Rows generated together in one batch.")
    output_dir: str = Field(..., description="Where generated_predictions.jsonl and predict_results.json go.")
    overwrite_output_dir: bool = Field(
        False, description="Start over (default: resume from the rows already predicted in output_dir)."
    )
    seed: int = Field(42, description="Seed for sampled generation (do_sample: true).")
    stage: Literal["sft"] = Field("sft", description="Predict generates replies to prompts: stage sft.")
    do_predict: bool = Field(True, description="LLaMA-Factory's switch; `tunesmith predict` always predicts.")
    predict_with_generate: bool = Field(True, description="Must be true: predictions are generated.")

    _split = field_validator("eval_dataset", "dataset", mode="before")(_split_list)
    _column_map = field_validator("column_map", mode="before")(DataSection._column_map_from_text.__func__)

    @model_validator(mode="after")
    def _one_dataset_list(self) -> PredictSection:
        if self.eval_dataset and self.dataset:
            raise ValueError("give the rows to predict in eval_dataset or in dataset, not both")
        if not (self.eval_dataset or self.dataset):
            raise ValueError("no data to predict on: set eval_dataset (or dataset) to dataset names or file paths")
        if not self.do_predict:
            raise ValueError("`do_predict: false`: the predict command predicts; remove the key")
        if not self.predict_with_generate:
            raise ValueError("`predict_with_generate: false`: predictions are generated; set it to true")
        return self

    @property
    def datasets(self) -> list[str]:
        return self.eval_dataset or self.dataset


class PredictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inference: InferenceConfig
    predict: PredictSection


# LLaMA-Factory predict keys with no meaning here, with the reason.
NOT_FOR_PREDICT: dict[str, str] = {
    "preprocessing_num_workers": "prompts are tokenized as they are generated, not in worker processes",
    "dataloader_num_workers": "prompts are tokenized as they are generated, not by a data loader",
    "overwrite_cache": "predict keeps no tokenized cache",
    "report_to": "predict writes its results to output_dir, not to a tracker",
    "ddp_timeout": "under torchrun, predict's processes wait up to 3 hours for the slowest share, a fixed bound",
}


def build_predict_config(values: Mapping[str, Any]) -> PredictConfig:
    predict_values: dict[str, Any] = {}
    inference_values: dict[str, Any] = {}
    for key, value in values.items():
        if key in NOT_FOR_PREDICT:
            raise ConfigError(f"`{key}` is not used by predict ({NOT_FOR_PREDICT[key]}); remove it")
        (predict_values if key in PredictSection.model_fields else inference_values)[key] = value
    inference = build_inference_config(inference_values)
    try:
        predict = PredictSection(**predict_values)
    except ValidationError as error:
        raise ConfigError(
            describe_validation_error(error, dict.fromkeys(PredictSection.model_fields, "predict"))
        ) from None
    return PredictConfig(inference=inference, predict=predict)


def load_predict_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> PredictConfig:
    """A YAML file (optional), then `key=value` overrides; validated before any model loads."""
    values = _flat(read_yaml(path)) if path is not None else {}
    values.update(_flat(parse_overrides(overrides)))
    return build_predict_config(values)


# Model keys a trained model is loaded with again for predict (the others only concern training).
RELOADED_MODEL_KEYS = ("cache_dir", "trust_remote_code", "quantization_bit", "quantization_type", "double_quantization")


def predict_config_after_training(run: RunConfig) -> PredictConfig:
    """`do_predict: true` in a train config: predict eval_dataset with the model just trained in output_dir.

    A LoRA run's adapter goes on its base model (quantized as in training); a full or freeze run's output_dir is the
    model. Predictions and scores are written to output_dir, as LLaMA-Factory writes them. Called before training,
    so that a config that cannot predict fails before any weight loads.
    """
    if run.data.eval_dataset:
        rows = {"eval_dataset": run.data.eval_dataset}
    elif run.data.val_size:  # the rows training held out: the same datasets, val_size and seed
        if len(run.data.dataset) > 1 and run.data.mix_strategy != "concat":
            raise ConfigError(
                f"`do_predict: true` with val_size and mix_strategy: {run.data.mix_strategy}: predict finds the "
                "held-out rows of concatenated datasets only; use eval_dataset, or mix_strategy: concat"
            )
        rows = {"eval_dataset": run.data.dataset, "val_size": run.data.val_size}
    else:
        raise ConfigError("`do_predict: true` predicts the rows of eval_dataset or those val_size holds out; set one")
    if run.model.adapter_name_or_path:
        raise NotSupportedYet(
            "`do_predict: true` with adapter_name_or_path: the trained adapter sits on top of the given ones; run "
            "`tunesmith predict` with adapter_name_or_path listing them and the output_dir"
        )
    values: dict[str, Any] = {key: getattr(run.model, key) for key in RELOADED_MODEL_KEYS}
    if run.method.finetuning_type == "lora":
        values.update(model_name_or_path=run.model.model_name_or_path, adapter_name_or_path=run.output.output_dir)
    else:
        values.update(model_name_or_path=run.output.output_dir, finetuning_type=run.method.finetuning_type)
    if run.data.template is not None:
        values["template"] = run.data.template
    if run.data.default_system is not None:
        values["default_system"] = run.data.default_system
    values.update({key: getattr(run.generation, key) for key in run.generation.model_fields_set})
    values.update(
        **rows,
        dataset_dir=run.data.dataset_dir,
        max_samples=run.data.max_samples,
        cutoff_len=run.data.cutoff_len,
        name=run.data.name,
        author=run.data.author,
        column_map=run.data.column_map,
        per_device_eval_batch_size=run.train.per_device_eval_batch_size,
        output_dir=run.output.output_dir,
        overwrite_output_dir=True,  # predictions of the model just trained, never an earlier run's
        seed=run.train.seed,
    )
    return build_predict_config(values)
