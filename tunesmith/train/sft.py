"""Supervised fine-tuning, read top to bottom: config → output dir → tokenizer → data → model → method → train → save.

The engine is Transformers' `Trainer`: it brings exact resume state (RNG, optimizer, scheduler), distributed back
ends, mixed precision and loss normalisation over the supervised tokens of the global batch. This recipe adds the
checks and outputs around it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from tunesmith.config import SAVED_CONFIG_FILE, RunConfig, config_to_flat_dict
from tunesmith.data.collate import PackedBatches, PadToLongest
from tunesmith.data.dataset import load_sft_data
from tunesmith.data.packing import pack_dataset
from tunesmith.errors import ConfigError
from tunesmith.model.adapters import (
    apply_freeze,
    apply_lora,
    check_adapter_weights,
    count_parameters,
    resolve_lora_targets,
)
from tunesmith.model.load import choose_precision, load_chat_tokenizer, load_model
from tunesmith.model.quantize import check_cpu_4bit_shapes, prepare_for_kbit_training, quantization_for
from tunesmith.model.resolve import resolve_model
from tunesmith.train import callbacks
from tunesmith.train.checkpoints import prepare_output_dir, run_fingerprint, write_fingerprint


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    global_step: int
    train_loss: float | None
    interrupted: bool


def run_sft(config: RunConfig) -> TrainResult:
    from transformers import set_seed

    output_dir = Path(config.output.output_dir)
    fingerprint = run_fingerprint(config)
    resume_from = prepare_output_dir(
        output_dir, fingerprint, config.train.resume_from_checkpoint, config.output.overwrite_output_dir
    )
    set_seed(config.train.seed)
    precision = choose_precision(config.train.bf16, config.train.fp16)
    if precision.note:
        print(f"note: {precision.note}")

    model_dir = resolve_model(config.model.model_name_or_path, config.model.cache_dir)
    tokenizer, chat_format = load_chat_tokenizer(model_dir, config.data.template, config.model.trust_remote_code)

    # Data before weights: a bad row should fail in seconds, not after a model download.
    data = load_sft_data(
        config.data,
        tokenizer,
        chat_format.jinja,
        config.train.seed,
        cache_dir=config.model.cache_dir,
    )
    print(data.summary())
    if config.data.packs:
        cutoff_len, seed = config.data.cutoff_len, config.train.seed
        packed_train, stats = pack_dataset(data.train, cutoff_len, seed)
        packed_eval = None if data.eval is None else pack_dataset(data.eval, cutoff_len, seed)[0]
        data = replace(data, train=packed_train, eval=packed_eval)
        print(stats.summary())

    model_section = config.model
    quantization = quantization_for(
        model_dir,
        model_section.quantization_bit,
        model_section.quantization_type,
        model_section.double_quantization,
        compute_dtype=precision.dtype,  # bfloat16 on a GPU that has it, else float32
    )
    model = load_model(model_dir, precision.dtype, model_section.trust_remote_code, quantization)
    model = apply_method(model, config)
    trainable, total = count_parameters(model)
    print(
        f"method: {config.method.finetuning_type}; trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%)"
    )

    trainer = build_trainer(config, model, tokenizer, data, precision, fingerprint)
    print_batch_plan(config, trainer, data.train_rows)
    if resume_from is None:
        (output_dir / callbacks.METRICS_FILE).unlink(missing_ok=True)
    write_fingerprint(output_dir, fingerprint)
    (output_dir / SAVED_CONFIG_FILE).write_text(yaml.safe_dump(config_to_flat_dict(config), sort_keys=False))

    interrupt = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, callbacks.SaveOnInterrupt))
    result = trainer.train(resume_from_checkpoint=resume_from)
    if interrupt.interrupted:
        print(
            f"Stopped at step {trainer.state.global_step}; checkpoint saved in {output_dir}. "
            "Continue with resume_from_checkpoint=true."
        )
        return TrainResult(output_dir, trainer.state.global_step, None, interrupted=True)

    save_outputs(trainer, tokenizer, config, output_dir)
    if config.output.plot_loss and trainer.is_world_process_zero():
        plot = callbacks.plot_loss(output_dir)
        if plot:
            print(f"loss plot: {plot}")
    print(f"Done: {trainer.state.global_step} steps, train loss {result.training_loss:.4f}. Output: {output_dir}")
    return TrainResult(output_dir, trainer.state.global_step, result.training_loss, interrupted=False)


def apply_method(model, config: RunConfig):
    method = config.method
    if method.finetuning_type == "lora":
        if getattr(model, "is_quantized", False):  # QLoRA / 8-bit LoRA, or a GPTQ/AWQ model
            if config.model.quantization_bit == 4:
                check_cpu_4bit_shapes(model)
            model = prepare_for_kbit_training(model)
        targets = resolve_lora_targets(model, method.lora_target)
        return apply_lora(
            model,
            targets,
            method.lora_rank,
            method.lora_alpha,
            method.lora_dropout,
            use_rslora=method.use_rslora,
            use_dora=method.use_dora,
        )
    if getattr(model, "is_quantized", False):
        raise ConfigError(
            f"this model is stored quantized, so its weights cannot be trained directly; use finetuning_type: lora "
            f"(not {method.finetuning_type}), or the unquantized model"
        )
    if method.finetuning_type == "freeze":
        return apply_freeze(
            model, method.freeze_trainable_layers, method.freeze_trainable_modules, method.freeze_extra_modules
        )
    return model  # full: every parameter trains


def build_trainer(config: RunConfig, model, tokenizer, data, precision, fingerprint):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    train = config.train
    evaluate = data.eval is not None
    packing = config.data.packs
    eval_strategy = train.eval_strategy or ("steps" if evaluate else "no")
    args = TrainingArguments(
        output_dir=config.output.output_dir,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        lr_scheduler_type=train.lr_scheduler_type,
        # transformers 5 dropped warmup_ratio; a float below 1 in warmup_steps means the same.
        warmup_steps=train.warmup_ratio if train.warmup_ratio else train.warmup_steps,
        optim=train.optim,
        seed=train.seed,
        data_seed=train.seed,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=train.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach NonFiniteLossGuard, not be hidden
        eval_strategy=eval_strategy if evaluate else "no",
        eval_steps=train.eval_steps or train.save_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        save_only_model=train.save_only_model,
        report_to=[] if train.report_to == ["none"] else train.report_to,
        dataloader_num_workers=train.dataloader_num_workers,
        ddp_timeout=train.ddp_timeout,
        # several CPU processes (a group joined before the recipe runs) talk over gloo
        ddp_backend="gloo" if torch.distributed.is_initialized() and not torch.cuda.is_available() else None,
        deepspeed=train.deepspeed,  # a JSON path, checked in TrainSection; "auto" values come from these arguments
        # A packed batch has a 4D mask (or none), which Trainer cannot count real tokens from: count every position.
        include_num_input_tokens_seen="all" if packing else "non_padding",
        remove_unused_columns=False,
        disable_tqdm=True,  # our ProgressBar replaces the default bar and the printed log dicts
    )
    from tunesmith.train.loss import ChunkedLossTrainer

    trainer_class = ChunkedLossTrainer if config.method.chunked_loss else Trainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=(
            PackedBatches.for_model(tokenizer.pad_token_id, model) if packing else PadToLongest(tokenizer.pad_token_id)
        ),
        processing_class=tokenizer,
        callbacks=[
            callbacks.TokensPerSecond(),
            callbacks.ProgressBar(),
            callbacks.MetricsFile(Path(config.output.output_dir)),
            callbacks.NonFiniteLossGuard(),
            callbacks.SaveOnInterrupt(),
            callbacks.FingerprintCheckpoints(fingerprint),
        ],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def print_batch_plan(config: RunConfig, trainer, rows: int | None) -> None:
    world = trainer.args.world_size
    per_device = config.train.per_device_train_batch_size
    accumulation = config.train.gradient_accumulation_steps
    global_batch = per_device * accumulation * world
    print(
        f"batch: {per_device} per device x {accumulation} accumulation x {world} process(es) = {global_batch} rows "
        f"per step; {rows if rows is not None else 'streamed'} training rows; device {trainer.args.device}"
    )


def save_outputs(trainer, tokenizer, config: RunConfig, output_dir: Path) -> None:
    """The adapter (or full model), the tokenizer with its chat template, and the resolved config."""
    trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(output_dir)
    if config.method.finetuning_type == "lora":
        from safetensors.torch import load_file

        check_adapter_weights(load_file(output_dir / "adapter_model.safetensors"))
