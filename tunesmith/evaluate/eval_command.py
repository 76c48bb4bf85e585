"""`tunesmith eval [CONFIG.yaml] [key=value ...] [flags]`: MMLU, C-Eval or CMMLU accuracy of a model or adapter.

Takes the YAML of LLaMA-Factory's old `llamafactory-cli eval` (`task`, `task_dir`, `lang`, `n_shot`, `batch_size`,
`save_dir`, `seed`, plus `subjects` and `limit`; see config/benchmark.py) and the model keys; the flags are short
spellings of those keys and win over both. `--harness TASKS` runs lm-evaluation-harness tasks on the same loaded
model instead (evaluate/harness.py).
"""

from __future__ import annotations

import argparse

from tunesmith.config.benchmark import load_benchmark_config
from tunesmith.evaluate.benchmark import run_benchmark

# flag → the config key it sets, and its help
FLAGS: dict[str, tuple[str, str]] = {
    "model": ("model_name_or_path", "base model (alias, directory, .gguf file or hub id) or a merged model"),
    "adapter": ("adapter_name_or_path", "LoRA adapter directories (output_dir of a training run), comma-separated"),
    "template": ("template", "a named chat template, or `empty` for a plain-text prompt (base models)"),
    "task": ("task", "mmlu, ceval or cmmlu (or mmlu_test, ceval_validation, cmmlu_test)"),
    "task-dir": ("task_dir", "folder holding mmlu/, ceval/, cmmlu/ (default: the subjects shipped with tunesmith)"),
    "lang": ("lang", "en or zh (default: the benchmark's language)"),
    "n-shot": ("n_shot", "solved dev examples before each question (default 5)"),
    "batch-size": ("batch_size", "questions per forward pass (default 4)"),
    "save-dir": ("save_dir", "write results.json here"),
    "seed": ("seed", "draw the dev examples at random with this seed (default: the first n_shot)"),
    "subjects": ("subjects", "comma-separated subjects (default: all)"),
    "limit": ("limit", "at most this many questions per subject"),
    "harness": ("harness", "lm-evaluation-harness tasks, comma-separated, run on this model (extra: harness)"),
    "include-path": ("include_path", "with --harness: a folder of your own harness task YAMLs"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="eval YAML (LLaMA-Factory's old eval configs work)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that win over the file, e.g. n_shot=0")
    for flag, (key, help_text) in FLAGS.items():
        spellings = dict.fromkeys([f"--{flag}", f"--{flag.replace('-', '_')}", f"--{key}"])
        parser.add_argument(*spellings, dest=key, metavar=key.upper(), help=help_text)


def run(args: argparse.Namespace) -> int:
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no file, only overrides
        config_path, overrides = None, [config_path, *overrides]
    flags = {key: getattr(args, key) for key, _ in FLAGS.values() if getattr(args, key) is not None}
    config = load_benchmark_config(config_path, overrides, flags)
    if config.benchmark.harness:
        from tunesmith.evaluate.harness import run_harness

        run_harness(config)
    else:
        run_benchmark(config)
    return 0
