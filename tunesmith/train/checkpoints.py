"""The output directory: refuse to mix runs, find the checkpoint to resume from.

Every run writes `tunesmith_run.json` (what decides the shape of the trained weights) into its output directory and
each checkpoint. A run that finds checkpoints of a different model, method or shape refuses with a message saying
what differs, instead of failing later with a tensor-size error.

Checkpoints appear whole or not at all: each is written into `tmp-checkpoint-N/` and renamed to `checkpoint-N` once
every file (and the fingerprint) is in (`write_checkpoint`). A run killed while writing one leaves only the
temporary folder, which `resume_from_checkpoint: true` skips, says so, and removes. A full disk ends the run with a
`DiskFullError`; the temporary folder is removed and the earlier checkpoints are untouched.

The output directory's copy also lists the files and folders the run wrote there (`files_written`), so that
`overwrite_output_dir` removes exactly those, the checkpoints and the record itself: a stale final adapter never
survives into the next run, and a person's own files in the directory stay.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from tunesmith.config.sections import RunConfig
from tunesmith.errors import DiskFullError, OutputDirError

RUN_FILE = "tunesmith_run.json"
WRITTEN = "files_written"  # in the output directory's RUN_FILE: the names this tool wrote there
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE = re.compile(r"^tmp-checkpoint-(\d+)$")  # a checkpoint being written, or left by a killed run
TRAINER_STATE = "trainer_state.json"  # Trainer writes it last: a checkpoint-N without it was cut short
# A write that failed for lack of space leaves the file system with less than this free (the write filled it):
# torch.save and safetensors report ENOSPC as RuntimeError / SafetensorError, without an errno.
FULL_DISK_FREE_BYTES = 16 * 2**20


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


def list_checkpoints(output_dir: Path, pattern: re.Pattern = CHECKPOINT) -> list[Path]:
    """The `checkpoint-N` folders (or, with INCOMPLETE, the `tmp-checkpoint-N` ones), by step."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := pattern.match(p.name))]
    return [path for _, path in sorted(found)]


def staging_dir(output_dir: Path, step: int) -> Path:
    """Where checkpoint-`step` is written before it is renamed into place."""
    return output_dir / f"tmp-checkpoint-{step}"


def write_checkpoint(
    output_dir: Path, step: int, write: Callable[[Path], Path], finish: Callable[[Path], None], publish: bool
) -> None:
    """Write checkpoint-`step` whole or not at all.

    `write(staging)` writes the checkpoint's files below the temporary folder `staging` (on every process that holds
    a part of it) and returns the folder it wrote them into; `finish(folder)` runs once all processes have written
    (a barrier), before the rename. The processes that `publish` (the ones that write output_dir) add nothing else:
    they rename that folder to checkpoint-`step`. A full disk raises DiskFullError after removing the partial folder.
    """
    from safetensors import SafetensorError

    check_room_for_checkpoint(output_dir, step)
    staging = staging_dir(output_dir, step)
    try:
        written = write(staging)
        finish(written)
    except (OSError, RuntimeError, SafetensorError) as error:  # open/json and the tokenizer, torch.save, safetensors
        if not disk_is_full(output_dir, error):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        free = shutil.disk_usage(output_dir).free
        if list_checkpoints(output_dir):
            kept, then = "the earlier checkpoints are intact", RESUME
        else:
            kept, then = "it was the run's first, so there is none to resume from", "start the run again"
        raise DiskFullError(
            f"the disk holding {output_dir} is full ({free / 2**20:.0f} MiB free) while writing checkpoint-{step}; "
            f"{kept}. {FREE_SOME_SPACE} and {then}"
        ) from error
    if not publish:
        return
    final = output_dir / f"checkpoint-{step}"
    if final.exists():  # the same step written again (resuming from an earlier checkpoint): the new one wins
        shutil.rmtree(final)
    os.replace(written, final)
    if written != staging:
        with suppress(FileNotFoundError):
            staging.rmdir()


FREE_SOME_SPACE = "Free some space (or lower save_total_limit, or set save_only_model: true for smaller checkpoints)"
RESUME = "continue with resume_from_checkpoint=true"


def check_room_for_checkpoint(output_dir: Path, step: int) -> None:
    """Refuse before writing when the disk cannot hold another checkpoint the size of the newest one.

    Failed writes are recognised too (`disk_is_full`; the tokenizer's Rust writer is made to raise OSError by
    tunesmith/patches.py), but checking first stops the usual case, a disk filling up over a run, before a write.
    """
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return
    needed = sum(path.stat().st_size for path in checkpoints[-1].rglob("*") if path.is_file())
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise DiskFullError(
            f"the disk holding {output_dir} has {free / 2**20:.1f} MiB free, too little for checkpoint-{step} "
            f"({checkpoints[-1].name} took {needed / 2**20:.1f} MiB); the earlier checkpoints are intact. "
            f"{FREE_SOME_SPACE} and {RESUME}"
        )


def disk_is_full(path: Path, error: BaseException) -> bool:
    """Whether a failed write failed for lack of space: its errno says so, or (torch.save and safetensors carry no
    errno) the file system has next to nothing left, which a write that filled it leaves behind."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return shutil.disk_usage(path).free < FULL_DISK_FREE_BYTES


def read_fingerprint(directory: Path) -> dict[str, Any] | None:
    record = _read_record(directory)
    return None if record is None else {key: value for key, value in record.items() if key != WRITTEN}


def read_written(directory: Path) -> list[str]:
    """The names (files and folders directly in `directory`) that runs of this tool recorded writing there."""
    record = _read_record(directory) or {}
    return list(record.get(WRITTEN, []))


def _read_record(directory: Path) -> dict[str, Any] | None:
    path = directory / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_fingerprint(directory: Path, fingerprint: dict[str, Any], written: Iterable[str] = ()) -> None:
    """Write the fingerprint; with `written`, add those names to the ones already recorded as this tool's."""
    directory.mkdir(parents=True, exist_ok=True)
    record = dict(fingerprint)
    names = set(written)
    if names:
        record[WRITTEN] = sorted(names | set(read_written(directory)) | {RUN_FILE})
    (directory / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def record_finished_run(output_dir: Path, fingerprint: dict[str, Any], names_before: set[str]) -> None:
    """At the end of a run: what it added to output_dir joins the record, and names recorded ahead that were never
    written (or were removed since) leave it."""
    names_now = directory_names(output_dir)
    written = (set(read_written(output_dir)) | (names_now - names_before)) & names_now
    record = {**fingerprint, WRITTEN: sorted(written | {RUN_FILE})}
    (output_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def directory_names(directory: Path) -> set[str]:
    """The names directly in `directory` (none when it does not exist): compared before and after a run."""
    return {path.name for path in directory.iterdir()} if directory.is_dir() else set()


def remove_earlier_run(output_dir: Path, checkpoints: list[Path]) -> None:
    """`overwrite_output_dir`: delete the checkpoints and every name an earlier run recorded writing; keep the rest."""
    recorded = [name for name in read_written(output_dir) if name == Path(name).name and name not in ("", ".", "..")]
    others = [output_dir / name for name in recorded if name not in {path.name for path in checkpoints}]
    if (output_dir / RUN_FILE).is_file() and RUN_FILE not in recorded:
        others.append(output_dir / RUN_FILE)  # written by a run that stopped before recording its files
    for path in [*checkpoints, *others]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    removed = sum(path.name != RUN_FILE for path in others)
    print(
        f"overwrite_output_dir: removed {len(checkpoints)} old checkpoint(s) and {removed} other file(s) of the "
        f"earlier run from {output_dir}"
    )


def latest_complete_checkpoint(
    output_dir: Path, checkpoints: list[Path], incomplete: list[Path], say: bool = True
) -> Path:
    """`resume_from_checkpoint: true`: the newest whole checkpoint. What a stopped run left half-written is skipped
    and (`say`: by one process) said: `tmp-checkpoint-N`, or a `checkpoint-N` without trainer_state.json (Trainer
    writes it last; such a folder comes from a version or tool that writes in place)."""
    cut_short = [path for path in checkpoints if not (path / TRAINER_STATE).is_file()]
    complete = [path for path in checkpoints if path not in cut_short]
    skipped = sorted(incomplete + cut_short, key=lambda path: int(path.name.rsplit("-", 1)[1]))
    if skipped and say:
        resuming = f"resuming from {complete[-1].name}" if complete else "nothing complete to resume from"
        print(
            f"resume_from_checkpoint: skipping {', '.join(path.name for path in skipped)}: left incomplete by a run "
            f"that stopped while writing it; {resuming}"
        )
    if not complete:
        raise OutputDirError(
            f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-* folder to resume from"
        )
    return complete[-1]


def describe_difference(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = [key for key in {**saved, **wanted} if saved.get(key) != wanted.get(key)]
    return "; ".join(f"{key}: {saved.get(key)!r} there, {wanted.get(key)!r} now" for key in keys)


def prepare_output_dir(
    output_dir: Path, fingerprint: dict[str, Any], resume: str | bool | None, overwrite: bool, remove: bool = True
) -> str | None:
    """Check the output directory against this run; return the checkpoint to resume from, if any.

    With `overwrite` the earlier run's files are deleted, by the one process that writes this directory
    (`remove`); the others only learn that there is nothing to resume.
    """
    checkpoints = list_checkpoints(output_dir)
    incomplete = list_checkpoints(output_dir, INCOMPLETE)
    if resume:
        if resume is True:
            checkpoint = latest_complete_checkpoint(output_dir, checkpoints, incomplete, say=remove)
        else:
            checkpoint = Path(str(resume))
        if remove:
            for path in incomplete:  # temporary folders, never a person's; this run writes its own
                shutil.rmtree(path)
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
    if not checkpoints and not incomplete and saved is None:
        return None
    if overwrite:
        if remove:
            remove_earlier_run(output_dir, checkpoints + incomplete)
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
    latest = (checkpoints or incomplete)[-1].name if checkpoints or incomplete else "finished"
    raise OutputDirError(
        f"{output_dir} already holds this run ({latest}); set resume_from_checkpoint: true to continue it, "
        "or overwrite_output_dir: true to start over"
    )
