"""What a person watching a run sees and keeps: a progress bar, metrics.jsonl, the loss plot, guards.

All are Transformers `TrainerCallback`s; only the main process writes or prints.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from tunesmith.errors import TunesmithError

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "training_loss.png"


class ProgressBar(TrainerCallback):
    """One bar over all optimizer steps, showing loss, learning rate and tokens/s; tqdm gives the ETA."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="Training", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        postfix = {}
        if "loss" in logs:
            postfix["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            postfix["lr"] = f"{logs['learning_rate']:.2e}"
        if "tokens_per_second" in logs:
            postfix["tok/s"] = f"{logs['tokens_per_second']:.0f}"
        if "eval_loss" in logs:
            postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
        if postfix:
            self.bar.set_postfix(postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TokensPerSecond(TrainerCallback):
    """Adds `tokens_per_second` to each training log entry: non-padding tokens through the model (with packing,
    every position of the packed rows, which are at most a few percent padding); on a GPU also `peak_memory_gib`,
    the most memory this process's tensors have held so far."""

    def __init__(self) -> None:
        self.last_tokens = 0
        self.last_time = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_tokens, self.last_time = state.num_input_tokens_seen, time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen - self.last_tokens
        logs["tokens_per_second"] = tokens / max(now - self.last_time, 1e-9)
        if torch.cuda.is_available():
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.last_tokens, self.last_time = state.num_input_tokens_seen, now


class MetricsFile(TrainerCallback):
    """Appends every log entry (train and eval) as one JSON line to output_dir/metrics.jsonl."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / METRICS_FILE

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")


class NonFiniteLossGuard(TrainerCallback):
    """Stops the run on a NaN or infinite loss instead of training on garbage."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TunesmithError(
                f"the training loss became {loss} at step {state.global_step}; lower learning_rate "
                "(or use bf16 instead of fp16). Checkpoints written before this step are intact."
            )


class SaveOnInterrupt(TrainerCallback):
    """Ctrl-C finishes the current step, writes a checkpoint and stops; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.interrupted = False
        self.previous_handler: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous_handler = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print("\nInterrupted: saving a checkpoint after this step (Ctrl-C again to stop without saving) ...")

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_interrupted():
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True

    def _any_rank_interrupted(self) -> bool:
        """Ranks may see Ctrl-C at different steps; all stop at the same one, or the next collective would hang."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.interrupted
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(self.interrupted)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_end(self, args, state, control, **kwargs):
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)


def plot_loss(output_dir: Path) -> Path | None:
    """Draw training (and eval) loss against the step from metrics.jsonl into training_loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = output_dir / METRICS_FILE
    if not metrics_path.is_file():
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evaluation = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(*zip(*train, strict=True), label="train loss")
    if evaluation:
        axes.plot(*zip(*evaluation, strict=True), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"Training loss: {output_dir.name}")
    axes.grid(alpha=0.3)
    axes.legend()
    path = output_dir / LOSS_PLOT
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
