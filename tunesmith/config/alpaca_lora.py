"""Alpaca-LoRA's `finetune.py` flags → tunesmith keys, with finetune.py's own defaults and fixed settings.

`tunesmith train --base_model M --data_path D.json --batch_size 128 --micro_batch_size 4 ...` trains as
`python finetune.py` with the same flags would: the base model in 8 bits, LoRA on q_proj,v_proj, its alpaca prompt
template, the prompt trained too (train_on_inputs defaults to true there), gradient accumulation of
batch_size / micro_batch_size, 100 warm-up steps, a log every 10 steps, a checkpoint (and an eval, with a validation
set) every 200 steps, at most 3 kept. Where tunesmith cannot do the same, a note says what it does instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError

# finetune.py's flags with its defaults (tloen/alpaca-lora, finetune.py `train()`), plus --load_in_8bit, which
# finetune.py hard-codes to true.
DEFAULTS: dict[str, Any] = {
    "base_model": None,
    "data_path": "yahma/alpaca-cleaned",
    "output_dir": "./lora-alpaca",
    "batch_size": 128,
    "micro_batch_size": 4,
    "num_epochs": 3,
    "learning_rate": 3e-4,
    "cutoff_len": 256,
    "val_set_size": 2000,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "v_proj"],
    "train_on_inputs": True,
    "add_eos_token": False,
    "group_by_length": False,
    "wandb_project": "",
    "wandb_run_name": "",
    "wandb_watch": "",
    "wandb_log_model": "",
    "resume_from_checkpoint": None,
    "prompt_template_name": "alpaca",
    "load_in_8bit": True,
}
BOOLEAN_FLAGS = ("train_on_inputs", "add_eos_token", "group_by_length", "load_in_8bit")
# The environment variables finetune.py sets from the wandb flags; wandb and transformers' callback read them.
WANDB_ENVIRONMENT = {
    "wandb_project": "WANDB_PROJECT",
    "wandb_run_name": "WANDB_NAME",
    "wandb_watch": "WANDB_WATCH",
    "wandb_log_model": "WANDB_LOG_MODEL",
}


def finetune_settings(given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The flags given (name → value) → (tunesmith keys, environment for wandb, notes on what differs)."""
    flags = {**DEFAULTS, **given}
    if not flags["base_model"]:
        raise ConfigError("--base_model is required (finetune.py's first flag): a model folder, hub id or alias")
    if not str(flags["data_path"]).endswith((".json", ".jsonl")):  # finetune.py reads any other path from the hub
        raise ConfigError(
            f"--data_path {flags['data_path']}: a hub dataset (finetune.py loads every path not ending in .json or "
            ".jsonl from the hub); download it as a JSON file and pass --data_path FILE.json"
        )
    batch, micro = int(flags["batch_size"]), int(flags["micro_batch_size"])
    if batch % micro:
        raise ConfigError(f"--batch_size {batch} is not a multiple of --micro_batch_size {micro}")
    validates = bool(flags["val_set_size"])
    settings: dict[str, Any] = {
        "model_name_or_path": str(flags["base_model"]),
        "quantization_bit": 8 if flags["load_in_8bit"] else None,
        "finetuning_type": "lora",
        "lora_rank": flags["lora_r"],
        "lora_alpha": flags["lora_alpha"],
        "lora_dropout": flags["lora_dropout"],
        "lora_target": list(flags["lora_target_modules"]),
        "dataset": [str(flags["data_path"])],
        "prompt_template_name": flags["prompt_template_name"],
        "train_on_prompt": bool(flags["train_on_inputs"]),
        "cutoff_len": flags["cutoff_len"],
        "val_size": flags["val_set_size"],
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": batch // micro,
        "num_train_epochs": flags["num_epochs"],
        "learning_rate": flags["learning_rate"],
        "warmup_steps": 100,
        "optim": "adamw_torch",
        "group_by_length": bool(flags["group_by_length"]),
        "logging_steps": 10,
        "eval_strategy": "steps" if validates else "no",
        "save_steps": 200,
        "save_total_limit": 3,
        "output_dir": str(flags["output_dir"]),
    }
    if validates:
        settings["eval_steps"] = 200
    settings.update(resume_settings(flags["resume_from_checkpoint"]))
    environment = {WANDB_ENVIRONMENT[flag]: str(flags[flag]) for flag in WANDB_ENVIRONMENT if flags[flag]}
    if flags["wandb_project"]:
        settings["report_to"] = ["wandb"]
    notes = [
        "finetune.py trains in fp16; tunesmith takes bf16 where the device has it (bf16: false for float32)",
        "finetune.py's load_best_model_at_end is not built: the final adapter is the last step's",
    ]
    if not flags["add_eos_token"]:
        notes.append(
            "finetune.py's default add_eos_token=False leaves EOS out of training; tunesmith always trains the EOS "
            "that ends each answer (the model learns to stop)"
        )
    return {key: value for key, value in settings.items() if value is not None}, environment, notes


def resume_settings(checkpoint: Any) -> dict[str, Any]:
    """finetune.py's resume_from_checkpoint: a full Trainer checkpoint resumes; an adapter alone trains further."""
    if not checkpoint:
        return {}
    path = Path(str(checkpoint))
    if (path / "trainer_state.json").is_file():
        return {"resume_from_checkpoint": str(path)}
    if any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        return {"adapter_name_or_path": [str(path)]}
    raise ConfigError(f"--resume_from_checkpoint {checkpoint}: neither a Trainer checkpoint nor a LoRA adapter")
