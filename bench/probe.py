"""The measurements both benchmark runs take the same way, so that their numbers can be compared.

`measure_training()` wraps `transformers.Trainer` for the duration of a `with` block: it times `Trainer.train`,
counts the tokens of every batch handed to `Trainer.training_step`, and times checkpoint writes. It patches the
class, not an instance, because tunesmith builds its Trainer inside `run_sft`; the plain script uses the same
wrapper so that both runs are counted by the same code. Nothing is patched outside the block.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

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
    final_loss: float | None = None  # loss logged at the last step
    mean_loss: float | None = None  # Trainer's training_loss: mean over all steps
    rss_at_train_start_mib: float = 0.0  # resident memory when Trainer.train() was entered
    peak_rss_mib: float = 0.0  # ru_maxrss of this process, read after training
    peak_rss_hwm_mib: float = 0.0  # VmHWM of this process: the same peak, not inherited across exec

    @property
    def step_seconds(self) -> float:
        """Training time without checkpoint writes: the work both runs do."""
        return self.train_seconds - self.checkpoint_seconds

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> Measurement:
        return cls(**json.loads(Path(path).read_text()))


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


@contextmanager
def measure_training() -> Iterator[Measurement]:
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
        return output

    def training_step(self, model, inputs, *args, **kwargs):
        measurement.padded_tokens += inputs["input_ids"].numel()
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
