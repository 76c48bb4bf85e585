"""`tunesmith eval --harness TASKS`: lm-evaluation-harness tasks on the model tunesmith loads.

The model is loaded as every tunesmith command loads it (chat/engine.py: a base model, a base model with its LoRA
adapters, or a merged export) and handed to the harness as an object through its `HFLM` wrapper, with its tokenizer,
so the harness scores exactly that model and downloads nothing of its own. Task names are the harness's; a user's
own task YAMLs (for example MMLU on local files, `dataset_path: json`) are registered with `include_path`.

The harness runs its tasks in plain text unless the config names a chat template: `template: empty` (or no
template key with a base model) is the harness's default protocol; any other template applies the tokenizer's chat
template (`apply_chat_template`), as our own benchmarks do.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from tunesmith.chat.engine import load_chat_engine
from tunesmith.config.benchmark import BenchmarkConfig
from tunesmith.errors import ConfigError, NotSupportedYet, OutputDirError
from tunesmith.evaluate.benchmark import PLAIN_TEMPLATES

EXTRA = "harness"
RESULTS_FILE = "harness_results.json"


def require_harness() -> None:
    """One clear line when lm-evaluation-harness is missing (checked before any model loads)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise NotSupportedYet(
            f"--harness runs lm-evaluation-harness, which is not installed: pip install 'tunesmith[{EXTRA}]'"
        )


def run_harness(config: BenchmarkConfig) -> dict[str, Any]:
    """Run the harness tasks on the loaded model; returns {task: {metric: value}} and writes it to save_dir."""
    require_harness()
    settings, inference = config.benchmark, config.inference
    save_dir = Path(settings.save_dir) if settings.save_dir else None
    if save_dir is not None and (save_dir / RESULTS_FILE).exists():
        raise OutputDirError(f"{save_dir / RESULTS_FILE} exists; choose another save_dir or remove it")
    if settings.include_path is not None and not Path(settings.include_path).is_dir():
        raise ConfigError(f"`include_path`: {settings.include_path} is not a folder of harness task YAMLs")

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=settings.include_path)
    unknown = [name for name in settings.harness if name not in task_manager.all_tasks]
    if unknown:  # before the model loads
        where = f" or in {settings.include_path}" if settings.include_path else " (add your own with include_path)"
        raise ConfigError(f"`harness`: {', '.join(unknown)} is not a task of lm-evaluation-harness{where}")

    template = inference.prompt.template
    chat = template not in PLAIN_TEMPLATES
    engine = load_chat_engine(inference.model, "empty" if not chat else template, inference.engine.infer_dtype)
    model = HFLM(pretrained=engine.model, tokenizer=engine.tokenizer, batch_size=settings.batch_size)
    output = simple_evaluate(
        model=model,
        tasks=settings.harness,
        num_fewshot=settings.n_shot,
        limit=settings.limit,
        task_manager=task_manager,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        bootstrap_iters=0,  # no standard errors: they would cost more than the evaluation of a small model
        log_samples=False,
    )
    results = {task: scores_of(values) for task, values in output["results"].items()}
    for task, scores in results.items():
        print(f"harness: {task}: " + ", ".join(f"{name} {value:.4f}" for name, value in scores.items()))
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def scores_of(values: dict[str, Any]) -> dict[str, float]:
    """The harness's `acc,none` → `acc`; standard errors (not computed) and the alias are left out."""
    return {
        key.partition(",")[0]: value
        for key, value in values.items()
        if isinstance(value, int | float) and "_stderr" not in key and key != "sample_len"
    }
