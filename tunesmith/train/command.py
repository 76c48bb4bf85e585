"""`tunesmith train CONFIG.yaml [key=value ...]`: validate the config, then run the recipe for its stage.

When the run needs more than one process (see `tunesmith.distributed.launch`), this re-launches itself under
torchrun as `-m tunesmith.train` with the same arguments; each launched process joins the process group first.
"""

from __future__ import annotations

import argparse
import json

from tunesmith import console
from tunesmith.config import config_to_flat_dict, load_config
from tunesmith.config.predict import predict_config_after_training
from tunesmith.config.sections import SECTIONS
from tunesmith.distributed import launch, process_group


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (LLaMA-Factory keys work as they are)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that win over the file, e.g. name=Tunesmith")
    parser.add_argument("--help-keys", action="store_true", help="list every config key with its default and meaning")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    if args.help_keys:
        print_keys()
        return 0
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no file, only overrides
        config_path, overrides = None, [config_path, *overrides]
    config = load_config(config_path, overrides)
    for library in libraries_in_use(config):
        console.show_library_warnings(library)
    if getattr(args, "as_program", False) and not args.print_config:
        use_fast_cpu_allocator()  # before the launch, so that torchrun's processes inherit it
    plan = None if args.print_config else launch.plan_launch(config.train)
    if plan is not None:  # the launched processes print the config and train
        train_args = [a for a in (config_path, *overrides) if a is not None] + (["--verbose"] if args.verbose else [])
        return launch.run_torchrun(plan.torchrun_command(train_args))
    in_torchrun = launch.launched_by_torchrun() and not args.print_config
    if in_torchrun:
        process_group.join(config.train.ddp_timeout)  # before any output: ranks other than 0 keep quiet from here
    print_config(config)
    if args.print_config:
        return 0
    predict_config = predict_config_after_training(config) if config.output.do_predict else None

    if config.method.stage == "sft":
        from tunesmith.train.sft import run_sft

        result = run_sft(config, reply_scorer(config))  # the scorer comes from evaluate/, a layer run_sft cannot see
    else:
        result = recipe_for(config.method.stage)(config)
    if predict_config is not None and not result.interrupted:
        from tunesmith.evaluate.predict import run_predict

        process_group.barrier()  # the trained model is saved before any process loads it
        results = run_predict(predict_config)  # under torchrun: each process its share, rank 0 writes them
        if results:
            print(json.dumps(results, indent=2))
    if in_torchrun:
        process_group.leave()
    return 130 if result.interrupted else 0


def reply_scorer(config):
    """predict_with_generate with an eval split: each evaluation also scores generated replies (evaluate/)."""
    if not (config.output.predict_with_generate and (config.data.val_size or config.data.eval_dataset)):
        return None
    from tunesmith.evaluate.metrics import require_metric_libraries
    from tunesmith.evaluate.predict import EvalSplitScorer

    require_metric_libraries()
    return EvalSplitScorer(config.generation, config.train.per_device_eval_batch_size, config.train.seed)


def recipe_for(stage: str):
    """The recipe function of a stage other than sft (config in, TrainResult out). orpo and simpo are dpo with that
    pref_loss; ppo is refused by the config (TRL 1.x has none)."""
    from tunesmith.train import grpo, kto, preference, pt, rm  # TRL itself loads only when a trainer is built

    recipes = {
        "pt": pt.run_pt,
        "rm": rm.run_rm,
        "dpo": preference.run_dpo,
        "orpo": preference.run_dpo,
        "simpo": preference.run_dpo,
        "kto": kto.run_kto,
        "grpo": grpo.run_grpo,
    }
    return recipes[stage]


def libraries_in_use(config) -> list[str]:
    """The libraries of `console.QUIET_LOGGERS` that this run uses, whose warnings therefore matter."""
    used = []
    if config.model.quantization_bit is not None or "8bit" in config.train.optim or "paged" in config.train.optim:
        used.append("bitsandbytes")
    if config.train.deepspeed:
        used.append("DeepSpeed")
    return used


def use_fast_cpu_allocator() -> None:
    """On a CPU, run again with tcmalloc or jemalloc preloaded where installed (train/allocator.py)."""
    import torch

    from tunesmith.train.allocator import reexec_with_fast_allocator

    if not torch.cuda.is_available():
        reexec_with_fast_allocator()


def print_config(config) -> None:
    values = config_to_flat_dict(config)
    defaults = config_to_flat_dict(type(config).model_validate({"data": {"dataset": ["x"]}}))
    changed = {key: value for key, value in values.items() if value != defaults.get(key) or key == "dataset"}
    print("config: " + ", ".join(f"{key}={value}" for key, value in changed.items()))


def print_keys() -> None:
    for section_name, section in SECTIONS.items():
        print(f"[{section_name}]")
        for key, field in section.model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            meaning = f"(not supported yet) {extra['planned']}" if "planned" in extra else field.description or ""
            default = field.default_factory() if field.default_factory else field.default
            print(f"  {key} = {default!r}  {meaning}")
