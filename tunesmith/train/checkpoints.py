"""The output directory: refuse to mix runs, find the checkpoint to resume from.

Every run writes `tunesmith_run.json` (what decides the shape of the trained weights) into its output directory and
each checkpoint. A run that finds checkpoints of a different model, method or shape refuses with a message saying
what differs, instead of failing later with a tensor-size error.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from tunesmith.config.sections import RunConfig
from tunesmith.errors import OutputDirError

RUN_FILE = "tunesmith_run.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def run_fingerprint(config: RunConfig) -> dict[str, Any]:
    """The settings that must match for a checkpoint to be resumable by this run."""
    method = config.method
    fingerprint: dict[str, Any] = {
        "model_name_or_path": config.model.model_name_or_path,
        "stage": method.stage,
        "finetuning_type": method.finetuning_type,
    }
    if config.model.adapter_name_or_path:  # the adapters a run starts from are part of what it trains
        fingerprint |= {
            "adapter_name_or_path": config.model.adapter_name_or_path,
            "create_new_adapter": method.create_new_adapter,
        }
    if method.finetuning_type == "lora":
        fingerprint |= {
            "lora_rank": method.lora_rank,
            "lora_alpha": method.lora_alpha,
            "lora_target": method.lora_target,
        }
    if method.finetuning_type == "freeze":
        fingerprint |= {
            "freeze_trainable_layers": method.freeze_trainable_layers,
            "freeze_trainable_modules": method.freeze_trainable_modules,
            "freeze_extra_modules": method.freeze_extra_modules,
        }
    return fingerprint


def list_checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found)]


def read_fingerprint(directory: Path) -> dict[str, Any] | None:
    path = directory / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_fingerprint(directory: Path, fingerprint: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RUN_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")


def describe_difference(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = [key for key in {**saved, **wanted} if saved.get(key) != wanted.get(key)]
    return "; ".join(f"{key}: {saved.get(key)!r} there, {wanted.get(key)!r} now" for key in keys)


def prepare_output_dir(
    output_dir: Path, fingerprint: dict[str, Any], resume: str | bool | None, overwrite: bool
) -> str | None:
    """Check the output directory against this run; return the checkpoint to resume from, if any."""
    checkpoints = list_checkpoints(output_dir)
    if resume:
        if resume is True and not checkpoints:
            raise OutputDirError(
                f"resume_from_checkpoint: true, but {output_dir} holds no checkpoint-* folder to resume from"
            )
        checkpoint = checkpoints[-1] if resume is True else Path(str(resume))
        if not (checkpoint / "trainer_state.json").is_file():
            raise OutputDirError(f"resume_from_checkpoint: {checkpoint} is not a checkpoint (no trainer_state.json)")
        saved = read_fingerprint(checkpoint)
        if saved is None:
            raise OutputDirError(f"{checkpoint} was not written by tunesmith ({RUN_FILE} missing); cannot verify it")
        if saved != fingerprint:
            raise OutputDirError(
                f"{checkpoint} belongs to a different run ({describe_difference(saved, fingerprint)}); "
                "resume with the same settings, or use another output_dir"
            )
        return str(checkpoint)

    saved = read_fingerprint(output_dir)
    if not checkpoints and saved is None:
        return None
    if overwrite:
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
        print(f"overwrite_output_dir: removed {len(checkpoints)} old checkpoint(s) from {output_dir}")
        return None
    if saved is None:
        raise OutputDirError(
            f"{output_dir} holds checkpoints not written by tunesmith; choose another output_dir, "
            "or set overwrite_output_dir: true to delete them"
        )
    if saved != fingerprint:
        raise OutputDirError(
            f"{output_dir} holds a different run ({describe_difference(saved, fingerprint)}); "
            "choose another output_dir, or set overwrite_output_dir: true to replace it"
        )
    latest = checkpoints[-1].name if checkpoints else "finished"
    raise OutputDirError(
        f"{output_dir} already holds this run ({latest}); set resume_from_checkpoint: true to continue it, "
        "or overwrite_output_dir: true to start over"
    )
