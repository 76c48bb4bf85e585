"""Transformers' `Trainer` with tunesmith's changes: four switched by a config key, and whole checkpoints.

- `chunked_loss`: the training loss comes from `loss.chunked_causal_lm_loss` (no `[batch, seq, vocab]` logits),
  also under DDP and DeepSpeed, where the wrapper's own forward must run for its gradient hooks.
- `loraplus_lr_ratio`: LoRA+, B matrices in their own parameter group with a larger learning rate (peft's
  `create_loraplus_optimizer` builds the groups; Trainer's optimizer class and arguments are kept).
- `gradient_checkpointing: offload`: tensors saved for backward (with checkpointing: the layer inputs) are kept in
  CPU RAM during the step (`torch.autograd.graph.save_on_cpu`) and copied back when backward needs them.
- `group_by_length` (on by default): the train set is read in `data.length_groups` order, seeded per epoch.
- `predict_with_generate` with an eval split: each evaluation also generates a reply for every eval row and adds
  the scores (`eval_bleu-4`, `eval_rouge-*`) to the eval metrics, so they are logged with the eval loss.
- Checkpoints are written under `tmp-checkpoint-N/` with the run's fingerprint and renamed to `checkpoint-N` when
  every process has written its part (`checkpoints.write_checkpoint`), so a kill at any moment leaves either a
  whole checkpoint or none. This is the `WholeCheckpoints` mixin, which TRL's stage trainers take as well; it
  overrides two private Trainer methods (see tunesmith/patches.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from tunesmith.patches import apply_tokenizer_save_raises_os_errors
from tunesmith.train import loss
from tunesmith.train.checkpoints import write_checkpoint, write_fingerprint


class WholeCheckpoints:
    """Trainer mixin: each checkpoint is written under `tmp-checkpoint-N/` and renamed to `checkpoint-N` once every
    process has written its part, with the run's fingerprint in it (see tunesmith/patches.py). Set
    `checkpoint_fingerprint` on the trainer; TunesmithTrainer and the TRL stage trainers take it."""

    checkpoint_fingerprint: dict[str, Any] | None = None
    _checkpoint_staging: str | None = None  # while a checkpoint is written: the folder it goes into

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written into a temporary folder and renamed into place once complete."""
        if trial is not None:  # hyperparameter search writes per-trial folders of its own
            return super()._save_checkpoint(model, trial)
        step = self.state.global_step

        def write(staging: Path) -> Path:
            self._checkpoint_staging = str(staging)  # Trainer writes `<_get_output_dir()>/checkpoint-N`
            try:
                super(WholeCheckpoints, self)._save_checkpoint(model, trial)
            finally:
                self._checkpoint_staging = None
            return staging / f"{PREFIX_CHECKPOINT_DIR}-{step}"

        def finish(folder: Path) -> None:
            self.accelerator.wait_for_everyone()  # every process's part (RNG states, shards) is in
            if self.args.should_save and self.checkpoint_fingerprint is not None:
                write_fingerprint(folder, self.checkpoint_fingerprint)

        output_dir = Path(self.args.output_dir)
        apply_tokenizer_save_raises_os_errors()  # a full disk while the tokenizer is written: DiskFullError too
        write_checkpoint(output_dir, step, write, finish, publish=self.args.should_save)
        if self.args.should_save:  # Trainer rotated inside the temporary folder; the real ones rotate here
            rotate_checkpoints(str(output_dir), self.args.save_total_limit, self.state.best_model_checkpoint)

    def _get_output_dir(self, trial) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)


class TunesmithTrainer(WholeCheckpoints, Trainer):
    def __init__(
        self,
        *args: Any,
        chunked_loss: bool = True,
        loraplus_lr_ratio: float | None = None,
        loraplus_lr_embedding: float = 1e-6,
        offload_activations: bool = False,
        train_sampler: Sampler[int] | None = None,
        score_generated_replies: Callable[[Any], dict[str, float]] | None = None,
        checkpoint_fingerprint: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.score_generated_replies = score_generated_replies  # model → {metric: value}; None: loss only
        self.checkpoint_fingerprint = checkpoint_fingerprint  # written into each checkpoint before it is renamed
        self.train_sampler = train_sampler  # None: Trainer's own (random) order
        self.chunked_loss = chunked_loss
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_lr_embedding = loraplus_lr_embedding
        self.offload_activations = offload_activations
        self._chunked_fallback_noted = False

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.score_generated_replies is not None:  # added before Trainer logs the metrics: one line with the loss
            scores = self.score_generated_replies(self.model)
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in scores.items()})
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.chunked_loss or return_outputs or "labels" not in inputs:  # eval outputs need the logits
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inner = self.accelerator.unwrap_model(model)
        if self.label_smoother is not None or self.compute_loss_func is not None or loss.causal_lm_parts(inner) is None:
            if not self._chunked_fallback_noted and self.is_world_process_zero():
                print("note: chunked_loss is not used with this model or setting; the model computes the loss itself")
            self._chunked_fallback_noted = True
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Trainer hands num_items_in_batch to the model only when the model takes it; mirror that exactly.
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        # The wrapper's forward runs (DDP/DeepSpeed hooks); accelerate's mixed-precision autocast, which the
        # swapped-out forward carried, is applied here instead.
        with self.accelerator.autocast(), _forward_computes_chunked_loss(inner, items):
            value = model(**inputs).loss
        # Same scaling as Trainer.compute_loss: the gradient all-reduce averages over processes, so the sum over
        # the global batch's tokens needs the process count put back.
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
            value = value * (self.accelerator.num_processes // self.get_tp_size())
        return value

    def _get_train_sampler(self, train_dataset=None):
        if self.train_sampler is not None and (train_dataset is None or train_dataset is self.train_dataset):
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        learning_rate = optimizer_kwargs.pop("lr")
        self.optimizer = create_loraplus_optimizer(
            self.model if model is None else model,
            optimizer_cls,
            lr=learning_rate,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_lr_embedding=self.loraplus_lr_embedding,
            loraplus_weight_decay=self.args.weight_decay,
            **optimizer_kwargs,
        )
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        pin = torch.cuda.is_available()  # pinned host memory makes the copies asynchronous
        offload = torch.autograd.graph.save_on_cpu(pin_memory=pin) if self.offload_activations else nullcontext()
        with offload:
            return super().training_step(model, inputs, num_items_in_batch)


@contextmanager
def _forward_computes_chunked_loss(inner: torch.nn.Module, num_items_in_batch):
    """For one call, `inner`'s forward returns the chunked loss instead of logits.

    A DDP or DeepSpeed engine must run its own forward (it prepares the gradient all-reduce and, under ZeRO-3,
    gathers parameters through hooks on the submodules), and that forward calls `inner(...)`. Swapping `inner`'s
    bound forward for the length of the call lets the engine run as usual while the loss skips the full logits.
    """

    def chunked_forward(**model_inputs: torch.Tensor) -> CausalLMOutput:
        return CausalLMOutput(loss=loss.chunked_causal_lm_loss(inner, model_inputs, num_items_in_batch))

    own_forward = vars(inner).get("forward")  # accelerate may have set one (its autocast wrapper)
    inner.forward = chunked_forward
    try:
        yield
    finally:
        if own_forward is None:
            del inner.forward  # back to the class's forward
        else:
            inner.forward = own_forward
