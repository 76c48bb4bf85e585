"""`tunesmith run RECIPE --config FILE [key=value ...]`: torchtune's `tune run`, for its fine-tuning recipes.

The recipe name says what torchtune would do with the config: LoRA or full fine-tuning, on one device or sharded
with FSDP over `--nproc_per_node` processes. The config itself is read as any torchtune config is
(config/torchtune.py), and the run is `tunesmith train`'s. A recipe that is not fine-tuning is refused with the
tunesmith command that does its job.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunesmith.config.load import read_values
from tunesmith.config.recipes import recipe_names
from tunesmith.errors import ConfigError
from tunesmith.train import command as train_command

# torchtune recipe → (finetuning_type it trains, whether it shards over processes)
RECIPES = {
    "lora_finetune_single_device": ("lora", False),
    "lora_finetune_distributed": ("lora", True),
    "full_finetune_single_device": ("full", False),
    "full_finetune_distributed": ("full", True),
}
# torchtune recipes that do something else → what to type instead
OTHER_RECIPES = {
    "generate": "tunesmith chat --adapter OUTPUT_DIR --prompt TEXT",
    "eleuther_eval": "tunesmith eval (MMLU, C-Eval, CMMLU)",
    "quantize": "tunesmith export (merge, then GGUF with its quantization)",
    "lora_dpo_single_device": "DPO training is not built yet",
    "lora_dpo_distributed": "DPO training is not built yet",
    "ppo_full_finetune_single_device": "PPO is not built",
    "knowledge_distillation_single_device": "knowledge distillation is not built",
    "knowledge_distillation_distributed": "knowledge distillation is not built",
    "qat_distributed": "quantization-aware training is not built",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_launch_flag(parser)  # tune run takes it before the recipe's name
    parser.add_argument("recipe", help=f"a torchtune recipe: {', '.join(RECIPES)}")
    parser.add_argument(
        "arguments",
        nargs=argparse.REMAINDER,
        metavar="--config FILE [key=value ...]",
        help="a torchtune recipe config (YAML with _component_ keys), then dotted overrides as tune run takes them "
        "(optimizer.lr=1e-4, ~dataset.split); --print-config prints the resolved config and exits",
    )


def add_launch_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc_per_node", "--nproc-per-node", type=int, help="processes, for *_distributed")


def recipe_arguments(arguments: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """What follows the recipe's name, in any order, as tune run reads it: --config, the flags, key=value pairs."""
    parser = argparse.ArgumentParser(prog="tunesmith run RECIPE", add_help=False)
    parser.add_argument("--config", required=True)
    add_launch_flag(parser)
    parser.add_argument("--print-config", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    flags, overrides = parser.parse_known_args(arguments)
    for override in overrides:
        if "=" not in override and not override.startswith("~"):
            raise ConfigError(f"tunesmith run: {override!r} is neither a flag nor key=value (nor ~key)")
    return flags, overrides


def run(args: argparse.Namespace) -> int:
    flags, overrides = recipe_arguments(args.arguments)
    overrides += recipe_settings(args.recipe, flags.nproc_per_node or args.nproc_per_node)
    config = Path(flags.config)
    if not config.is_file():
        raise ConfigError(
            f"--config {flags.config}: no such file; tunesmith does not ship torchtune's configs: copy it (`tune cp "
            f"{flags.config} my.yaml`, or from torchtune's recipes/configs/) and pass the file, or run one of "
            f"tunesmith's recipes: {', '.join(recipe_names())} (tunesmith ls)"
        )
    finetuning_type = read_values(config, overrides).get("finetuning_type", "lora")
    wanted = RECIPES[args.recipe][0]
    if finetuning_type != wanted:
        raise ConfigError(
            f"recipe {args.recipe} trains {wanted}, but the config's model component is for {finetuning_type} "
            f"training; use {args.recipe.replace(wanted, finetuning_type)} or change the model component"
        )
    settings = {"config": str(config), "overrides": overrides, "print_config": flags.print_config}
    verbose = getattr(args, "verbose", False) or flags.verbose
    train_args = argparse.Namespace(**{**vars(args), **settings, "verbose": verbose})
    return train_command.run(train_command.with_defaults(train_args))


def recipe_settings(recipe: str, nproc_per_node: int | None) -> list[str]:
    """The tunesmith keys the recipe name stands for."""
    if recipe in OTHER_RECIPES:
        raise ConfigError(f"torchtune recipe {recipe}: {OTHER_RECIPES[recipe]}")
    if recipe not in RECIPES:
        raise ConfigError(f"unknown torchtune recipe {recipe!r}; tunesmith runs {', '.join(RECIPES)}")
    distributed = RECIPES[recipe][1]
    if not distributed:
        if nproc_per_node not in (None, 1):
            raise ConfigError(f"recipe {recipe} runs on one device; use the _distributed recipe for several")
        return ["nproc_per_node=1"]
    settings = ["fsdp=full_shard"]  # torchtune's distributed recipes shard with FSDP2
    return settings + ([f"nproc_per_node={nproc_per_node}"] if nproc_per_node else [])
