"""The eval config: LLaMA-Factory's old `llamafactory-cli eval` YAML (MMLU, C-Eval, CMMLU) as `tunesmith eval` takes it.

The model and template keys are the inference config's (config/inference.py). Benchmarks score the next-token
logits of A/B/C/D, so the generation keys mean nothing here and are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.config.inference import GenerationSection, InferenceConfig, _flat, build_inference_config
from tunesmith.config.load import describe_validation_error, parse_overrides, read_yaml
from tunesmith.config.sections import Section, _split_list
from tunesmith.errors import ConfigError

# benchmark → its default split, the splits that have answers, and the prompt language it is written in
BENCHMARK_SPLITS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "mmlu": ("test", ("test", "val"), "en"),
    "ceval": ("val", ("val",), "zh"),  # C-Eval's test answers are not public
    "cmmlu": ("test", ("test",), "zh"),
}
SPLIT_NAMES = {"test": "test", "val": "val", "validation": "val"}


class BenchmarkSection(Section):
    task: str = Field(
        "mmlu",
        description="mmlu, ceval or cmmlu, optionally with the split as LLaMA-Factory wrote it: mmlu_test, "
        "ceval_validation, cmmlu_test.",
    )
    task_dir: str | None = Field(
        None,
        description="Folder holding mmlu/, ceval/, cmmlu/ (each the zip or its unpacked files, and mapping.json); "
        "default: the subset of subjects shipped with tunesmith.",
    )
    lang: Literal["en", "zh"] | None = Field(
        None, description="Prompt language; default: en for mmlu, zh for ceval and cmmlu."
    )
    n_shot: int = Field(5, ge=0, description="Solved examples from the dev split before each question.")
    batch_size: int = Field(4, gt=0, description="Questions scored in one forward pass.")
    save_dir: str | None = Field(None, description="Write results.json here (it must not hold one already).")
    seed: int | None = Field(
        None, description="Draw the n_shot dev examples at random with this seed (default: the first n_shot)."
    )
    subjects: list[str] = Field(default_factory=list, description="Only these subjects (default: all).")
    limit: int | None = Field(None, gt=0, description="At most this many questions per subject (harness: per task).")
    harness: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness task names to run on the model instead of task (needs the harness extra).",
    )
    include_path: str | None = Field(
        None, description="With harness: a folder of the user's own harness task YAMLs, registered before the names."
    )

    _split = field_validator("subjects", "harness", mode="before")(_split_list)

    @model_validator(mode="after")
    def _harness_keys(self) -> BenchmarkSection:
        if self.harness:
            # the harness task defines its own data, split, prompt language and shot order
            ours = sorted({"task", "task_dir", "lang", "seed", "subjects"} & self.model_fields_set)
            if ours:
                raise ValueError(
                    f"{', '.join(ours)} choose tunesmith's own benchmarks, which harness replaces; remove them or "
                    "harness"
                )
        elif self.include_path is not None:
            raise ValueError("include_path registers harness tasks; set harness to the task names to run")
        return self

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        benchmark, split = parse_task(value)
        valid = BENCHMARK_SPLITS[benchmark][1] if benchmark in BENCHMARK_SPLITS else ()
        if benchmark not in BENCHMARK_SPLITS or split not in valid:
            raise ValueError(
                "expected mmlu, ceval or cmmlu, or one with a split that has answers: mmlu_test, mmlu_validation, "
                "ceval_validation, cmmlu_test"
            )
        return value

    @property
    def benchmark(self) -> str:
        return parse_task(self.task)[0]

    @property
    def split(self) -> str:
        return parse_task(self.task)[1]

    @property
    def language(self) -> str:
        return self.lang or BENCHMARK_SPLITS[self.benchmark][2]


def parse_task(task: str) -> tuple[str, str]:
    """`mmlu_test` → (mmlu, test); `ceval_validation` → (ceval, val); `cmmlu` → (cmmlu, its default split)."""
    name, _, split = task.partition("_")
    if not split:
        return name, BENCHMARK_SPLITS[name][0] if name in BENCHMARK_SPLITS else ""
    return name, SPLIT_NAMES.get(split, split)


class BenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inference: InferenceConfig
    benchmark: BenchmarkSection


def build_benchmark_config(values: Mapping[str, Any]) -> BenchmarkConfig:
    benchmark_values: dict[str, Any] = {}
    inference_values: dict[str, Any] = {}
    for key, value in values.items():
        if key in GenerationSection.model_fields:
            raise ConfigError(f"`{key}` is a generation key; eval scores the next-token logits of A/B/C/D: remove it")
        (benchmark_values if key in BenchmarkSection.model_fields else inference_values)[key] = value
    inference = build_inference_config(inference_values)
    try:
        benchmark = BenchmarkSection(**benchmark_values)
    except ValidationError as error:
        keys = dict.fromkeys(BenchmarkSection.model_fields, "benchmark")
        raise ConfigError(describe_validation_error(error, keys)) from None
    return BenchmarkConfig(inference=inference, benchmark=benchmark)


def load_benchmark_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), flags: Mapping[str, Any] | None = None
) -> BenchmarkConfig:
    """A YAML file (optional), then `key=value` overrides, then command-line flags; validated before loading."""
    values = _flat(read_yaml(path)) if path is not None else {}
    values.update(_flat(parse_overrides(overrides)))
    values.update(flags or {})
    return build_benchmark_config(values)
