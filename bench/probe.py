"""The measurements both benchmark runs take the same way, so that their numbers can be compared.

`measure_training()` wraps `transformers.Trainer` for the duration of a `with` block: it times `Trainer.train`,
counts the tokens of every batch handed to `Trainer.training_step`, and times checkpoint writes. It patches the
class, not an instance, because tunesmith builds its Trainer inside `run_sft`; the plain script uses the same
wrapper so that both runs are counted by the same code. Nothing is patched outside the block. Given rows, it then
scores the trained model on them with `same_rows_loss`, one function for every run, so final losses compare.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100


@dataclass
class Measurement:
    """What one process did in `Trainer.train()`; times in seconds, memory in MiB."""

    steps: int = 0
    train_seconds: float = 0.0  # wall time of Trainer.train(), checkpoint writes included
    checkpoint_seconds: float = 0.0  # part of train_seconds spent in Trainer._save_checkpoint
    trainer_runtime: float = 0.0  # the Trainer's own train_runtime metric, for reference
    padded_tokens: int = 0  # every position of every batch, padding included
    tokens: int = 0  # attention_mask == 1: the tokens that are real text
    supervised_tokens: int = 0  # labels != -100: the tokens the loss is taken on
    longest_batch: int = 0  # positions per row of the longest batch: the sequence length memory peaked at
    final_loss: float | None = None  # loss logged at the last step
    mean_loss: float | None = None  # Trainer's training_loss: mean over all steps
    rss_at_train_start_mib: float = 0.0  # resident memory when Trainer.train() was entered
    peak_rss_mib: float = 0.0  # ru_maxrss of this process, read after training
    peak_rss_hwm_mib: float = 0.0  # VmHWM of this process: the same peak, not inherited across exec
    same_rows_loss: float | None = None  # after training: mean loss over the supervised tokens of fixed rows
    same_rows_seconds: float = 0.0  # wall time of that scoring (not part of training)

    @property
    def step_seconds(self) -> float:
        """Training time without checkpoint writes: the work both runs do."""
        return self.train_seconds - self.checkpoint_seconds

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> Measurement:
        return cls(**json.loads(Path(path).read_text()))


def read_rows(path: str | Path, count: int) -> list[dict[str, Any]]:
    """The first `count` rows of a JSON list file (alpaca_en_demo.json, identity.json)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))[:count]


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB; 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux. It survives exec, so a parent's peak can show up in its child's: the
    # orchestrator stays small (no torch) so that this reads the child's own peak.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_messages(row: dict[str, Any], name: str = "", author: str = "") -> list[dict[str, str]]:
    """An alpaca row (identity.json, alpaca_en_demo.json): instruction (+ input) → user, output → assistant."""

    def fill(text: str) -> str:
        return text.replace("{{name}}", name).replace("{{author}}", author)

    prompt = f"{row['instruction']}\n{row['input']}" if row.get("input") else row["instruction"]
    return [{"role": "user", "content": fill(prompt)}, {"role": "assistant", "content": fill(row["output"])}]


def same_rows_loss(model, tokenizer, rows: list[dict[str, Any]], max_length: int) -> float:
    """Mean loss per supervised (answer) token over `rows`, one row at a time: the same number for every run.

    Each row is rendered with the tokenizer's chat template, truncated to `max_length`, and only the tokens the
    assistant turn adds are scored; the model's own loss gives the mean per row, weighted back to a sum here.
    """
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for row in rows:
            messages = build_messages(row)
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
            prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            labels = [IGNORE_INDEX] * min(prompt_len, len(ids)) + ids[prompt_len:]
            supervised = sum(1 for label in labels[1:] if label != IGNORE_INDEX)  # the first label is never scored
            if supervised == 0:
                continue
            batch = {"input_ids": torch.tensor([ids], device=device), "labels": torch.tensor([labels], device=device)}
            total += float(model(**batch).loss) * supervised
            count += supervised
    model.train(was_training)
    return total / max(count, 1)


@contextmanager
def measure_training(eval_rows: list[dict[str, Any]] | None = None, max_length: int = 512) -> Iterator[Measurement]:
    """Time and count `Trainer.train()`; with `eval_rows`, score the trained model on them afterwards (untimed)."""
    from transformers import Trainer

    measurement = Measurement()
    original_train = Trainer.train
    original_step = Trainer.training_step
    original_save = Trainer._save_checkpoint

    def train(self, *args, **kwargs):
        measurement.rss_at_train_start_mib = _status_mib("VmRSS")
        start = time.perf_counter()
        output = original_train(self, *args, **kwargs)
        measurement.train_seconds += time.perf_counter() - start
        measurement.steps = self.state.global_step
        measurement.trainer_runtime = output.metrics.get("train_runtime", 0.0)
        measurement.mean_loss = output.training_loss
        losses = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
        measurement.final_loss = losses[-1] if losses else None
        if eval_rows:
            scoring_start = time.perf_counter()
            # without the mixed-precision wrapper accelerate put on the forward: every run scores in float32
            model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
            measurement.same_rows_loss = same_rows_loss(model, self.processing_class, eval_rows, max_length)
            measurement.same_rows_seconds = time.perf_counter() - scoring_start
        return output

    def training_step(self, model, inputs, *args, **kwargs):
        measurement.padded_tokens += inputs["input_ids"].numel()
        measurement.longest_batch = max(measurement.longest_batch, inputs["input_ids"].shape[-1])
        mask = inputs.get("attention_mask")
        measurement.tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        measurement.supervised_tokens += int((inputs["labels"] != IGNORE_INDEX).sum())
        return original_step(self, model, inputs, *args, **kwargs)

    def save_checkpoint(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original_save(self, *args, **kwargs)
        finally:
            measurement.checkpoint_seconds += time.perf_counter() - start

    Trainer.train, Trainer.training_step, Trainer._save_checkpoint = train, training_step, save_checkpoint
    try:
        yield measurement
    finally:
        Trainer.train, Trainer.training_step, Trainer._save_checkpoint = original_train, original_step, original_save
        measurement.peak_rss_mib = peak_rss_mib()
        measurement.peak_rss_hwm_mib = _status_mib("VmHWM")
