"""Supervised fine-tuning, read top to bottom: config → output dir → tokenizer → data → model → method → train → save.

The engine is Transformers' `Trainer`: it brings exact resume state (RNG, optimizer, scheduler), distributed back
ends, mixed precision and loss normalisation over the supervised tokens of the global batch. This recipe adds the
checks and outputs around it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from tunesmith.config import SAVED_CONFIG_FILE, RunConfig, config_to_flat_dict
from tunesmith.data import multimodal
from tunesmith.data.collate import PackedBatches, PadToLongest
from tunesmith.data.dataset import load_data
from tunesmith.data.length_groups import length_grouped_sampler
from tunesmith.data.packing import pack_dataset
from tunesmith.data.templates import use_chat_format
from tunesmith.distributed import deepspeed, fsdp, process_group
from tunesmith.errors import ConfigError
from tunesmith.model.adapters import (
    LORA_SHAPE_KEYS,
    apply_freeze,
    apply_lora,
    check_adapter_saves,
    check_adapter_weights,
    check_adapters_to_train,
    check_targets_cover_all,
    count_parameters,
    let_inputs_carry_gradients,
    linear_layer_names,
    load_adapters,
    resolve_lora_targets,
)
from tunesmith.model.kernels import (
    apply_unsloth_lora,
    check_liger,
    check_unsloth,
    choose_attention,
    load_with_unsloth,
)
from tunesmith.model.load import REWARD_HEAD, load_model, load_processor, load_tokenizer
from tunesmith.model.precision import choose_precision, detect_device, upcast_trainable_parameters
from tunesmith.model.quantize import check_cpu_4bit_shapes, prepare_for_kbit_training, quantization_for
from tunesmith.model.resolve import resolve_model
from tunesmith.patches import apply_fsdp_on_cpu_processes
from tunesmith.train import callbacks
from tunesmith.train.allocator import prepare_cpu_allocator, release_free_memory
from tunesmith.train.checkpoints import (
    directory_names,
    prepare_output_dir,
    record_finished_run,
    run_fingerprint,
    write_fingerprint,
)
from tunesmith.train.threads import match_threads_to_cores
from tunesmith.train.trainer import TunesmithTrainer

TENSORBOARD_LOGGING_DIR = "TENSORBOARD_LOGGING_DIR"  # read by transformers' TensorBoardCallback
PISSA_INIT_DIR = "pissa_init"  # the adapter as initialised, which the final PiSSA adapter is converted against


# (model, tokenizer, tokenized eval rows) → {metric name: value}, logged with the eval loss
ReplyScorer = Callable[[Any, Any, Any], dict[str, float]]


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    global_step: int
    train_loss: float | None
    interrupted: bool


def run_sft(config: RunConfig, score_replies: ReplyScorer | None = None) -> TrainResult:
    """The recipe: output dir → precision → tokenizer → data → model + method → Trainer → train → save.

    `score_replies` (predict_with_generate with an eval split; the command passes evaluate's scorer) is called at
    each evaluation with the model, the tokenizer and the unpacked eval rows, and returns metrics to log.
    """
    from transformers import set_seed

    tune_cpu_process()
    run_dir = prepare_run_dir(config)
    set_seed(config.train.seed)
    precision = announce_precision(config)
    attention = check_before_loading(config, precision)  # a GPU-only key or a bad adapter fails before any loading

    model_dir = resolve_model(config.model.model_name_or_path, config.model.cache_dir)
    processor = load_processor(model_dir, config.model.trust_remote_code)  # None: a text-only model
    tokenizer = load_tokenizer(model_dir, config.model.trust_remote_code)
    chat_template = prepare_chat_format(config, tokenizer, processor)
    media = multimodal.ModelMedia.of(config.model, processor)
    # Data before weights: a bad row should fail in seconds, not after a model download.
    data, eval_rows = prepare_data(config, tokenizer, chat_template, media)

    model, checkpointing = prepare_model(config, model_dir, precision, attention)
    trainer = build_trainer(
        config, model, tokenizer, data, precision, run_dir.fingerprint, checkpointing, run_dir.shared
    )
    if score_replies is not None and eval_rows is not None:
        trainer.score_generated_replies = lambda trained: score_replies(trained, tokenizer, eval_rows)
    if media.takes_images:
        trainer.data_collator = multimodal.MediaBatches(trainer.data_collator, media)  # pixel values join the batch
    print_batch_plan(config, trainer, data.train_rows)
    if {"tensorboard", "all"} & set(config.train.report_to) and trainer.is_world_process_zero():
        events = config.train.logging_dir or run_dir.path / "runs"
        print(f"TensorBoard: tensorboard --logdir {events}")
    write_run_files(run_dir, config, trainer, model)
    return train_and_save(trainer, run_dir, config, tokenizer, processor)


def train_and_save(trainer, run_dir: RunDir, config: RunConfig, tokenizer, processor, after_training=None):
    """Train (or resume); on Ctrl-C keep the checkpoint and stop, else save the outputs. `after_training(trainer)`
    runs between training and saving (rm: the final evaluation)."""
    interrupt = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, callbacks.SaveOnInterrupt))
    result = trainer.train(resume_from_checkpoint=run_dir.resume_from)
    release_free_memory()  # what the allocator kept for the next step
    if interrupt.interrupted:
        run_dir.record_finished_run()
        print(
            f"Stopped at step {trainer.state.global_step}; checkpoint saved in {run_dir.path}. "
            "Continue with resume_from_checkpoint=true."
        )
        return TrainResult(run_dir.path, trainer.state.global_step, None, interrupted=True)

    if config.train.do_eval:
        trainer.evaluate()  # logged to metrics.jsonl like the evaluations during training
    if after_training is not None:
        after_training(trainer)
    save_final_outputs(trainer, tokenizer, processor, config, run_dir.path)
    run_dir.record_finished_run()
    print(f"Done: {trainer.state.global_step} steps, train loss {result.training_loss:.4f}. Output: {run_dir.path}")
    return TrainResult(run_dir.path, trainer.state.global_step, result.training_loss, interrupted=False)


def tune_cpu_process() -> None:
    if not torch.cuda.is_available():
        print(prepare_cpu_allocator())  # resident memory follows the live tensors (train/allocator.py)
        print(match_threads_to_cores())


@dataclass(frozen=True)
class RunDir:
    """The run's output_dir, as this process sees it."""

    path: Path
    fingerprint: dict
    shared: bool  # False: nodes without a shared file system, each keeping what resuming needs in its own
    writes_run_files: bool  # this process writes the fingerprint and resolved config here
    resume_from: str | None
    names_before: set[str]  # what was there before this run, which overwrite_output_dir must keep

    def record_finished_run(self) -> None:
        if self.writes_run_files:  # what overwrite_output_dir removes, and nothing else
            record_finished_run(self.path, self.fingerprint, self.names_before)


def prepare_run_dir(config: RunConfig) -> RunDir:
    """Refuse another run's output_dir, clear it (overwrite_output_dir) or find the checkpoint to resume."""
    path = Path(config.output.output_dir)
    fingerprint = run_fingerprint(config)
    shared = process_group.output_dir_is_shared(path)
    writes_run_files = process_group.writes_run_files(shared)
    resume_from = prepare_output_dir(
        path,
        fingerprint,
        config.train.resume_from_checkpoint,
        config.output.overwrite_output_dir,
        remove=writes_run_files,
    )
    # Every rank checks the directory before this run's files are written into it; a slower rank would otherwise
    # find them and refuse the directory as one that "already holds this run".
    process_group.barrier()
    return RunDir(path, fingerprint, shared, writes_run_files, resume_from, directory_names(path))


def announce_precision(config: RunConfig):
    precision = choose_precision(
        config.train.bf16, config.train.fp16, config.train.pure_bf16, config.method.finetuning_type
    )
    print(f"precision: {precision.description}")
    if precision.note:
        print(f"note: {precision.note}")
    return precision


def check_before_loading(config: RunConfig, precision) -> str:
    """Checks that need no weights; returns the attention implementation to load with."""
    attention = check_speed_paths(config, precision.compute_dtype)
    if config.model.adapter_name_or_path:  # a missing adapter, or a LoRA key it cannot honour
        method = config.method
        explicit = {key: getattr(method, key) for key in LORA_SHAPE_KEYS if key in method.model_fields_set}
        check_adapters_to_train(config.model.adapter_name_or_path, method.create_new_adapter, explicit)
    return attention


def prepare_chat_format(config: RunConfig, tokenizer, processor) -> str:
    """The chat template the data step renders with, installed in the tokenizer that is saved with the run.

    Pre-training reads plain text: a base model's tokenizer without a chat template needs none then."""
    if config.method.stage == "pt" and config.data.template is None and not tokenizer.chat_template:
        return ""
    return use_chat_format(tokenizer, config.data.template, processor).jinja


def prepare_data(config: RunConfig, tokenizer, chat_template: str, media: multimodal.ModelMedia):
    """The tokenized train (and eval) rows of the run's stage, packed when asked; and the eval rows unpacked
    (replies are generated for them one row each), or None without an eval split."""
    if config.data.packs:
        multimodal.refuse_packing(media)
    seed = config.train.seed
    data = load_data(
        config.data,
        tokenizer,
        chat_template,
        stage=config.method.stage,
        seed=seed,
        cache_dir=config.model.cache_dir,
        media=media,
    )
    print(data.summary())
    eval_rows = data.eval
    if config.data.packs:
        cutoff_len = config.data.cutoff_len
        packed_train, stats = pack_dataset(data.train, cutoff_len, seed)
        packed_eval = None if data.eval is None else pack_dataset(data.eval, cutoff_len, seed)[0]
        data = replace(data, train=packed_train, eval=packed_eval)
        print(stats.summary())
    return data, eval_rows


def prepare_model(config: RunConfig, model_dir: str, precision, attention: str, reward_pad_token_id: int | None = None):
    """The model loaded, with the fine-tuning method applied; returns it and the checkpointing mode Trainer uses.

    `reward_pad_token_id` (stage rm): the causal LM's body with a one-output score head, which reads the last token
    that is not this padding token."""
    model_section = config.model
    quantization = quantization_for(
        model_dir,
        model_section.quantization_bit,
        model_section.quantization_type,
        model_section.double_quantization,
        compute_dtype=precision.dtype,  # bfloat16 on a GPU that has it, else float32
        # FSDP shards 4-bit weights only when they are stored in the dtype of the other parameters
        quant_storage=precision.dtype if config.train.fsdp in ("full_shard", "shard_grad_op") else None,
    )
    checkpointing = choose_gradient_checkpointing(config, model_dir)
    if model_section.use_unsloth:
        model = load_with_unsloth(
            model_dir,
            precision.dtype,
            config.data.cutoff_len,
            model_section.quantization_bit,
            model_section.trust_remote_code,
        )
    else:
        model = load_model(
            model_dir,
            precision.dtype,
            model_section.trust_remote_code,
            quantization,
            attention,
            reward_pad_token_id=reward_pad_token_id,
        )
    model = apply_method(model, config, checkpointing)
    if model_section.use_unsloth:
        checkpointing = False  # Unsloth's get_peft_model set up its own; Trainer must not add a second one
    if checkpointing:
        let_inputs_carry_gradients(model)
    if precision.upcast_trainable:
        upcast_trainable_parameters(model)  # float32 master weights for what trains (model/precision.py)
    if config.train.torch_compile:
        compile_in_place(model, config.method.chunked_loss)
    trainable, total = count_parameters(model)
    print(
        f"method: {config.method.finetuning_type}; trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%)"
    )
    return model, checkpointing


def write_run_files(run_dir: RunDir, config: RunConfig, trainer, model) -> None:
    """The fingerprint and resolved config (before training, so a crash leaves them), and PiSSA's initial adapter."""
    if run_dir.writes_run_files:
        if run_dir.resume_from is None:
            (run_dir.path / callbacks.METRICS_FILE).unlink(missing_ok=True)
        # Recorded before they exist, so that overwrite_output_dir finds them even after a crash.
        written = [SAVED_CONFIG_FILE, callbacks.METRICS_FILE, callbacks.LOSS_PLOT, PISSA_INIT_DIR]
        write_fingerprint(run_dir.path, run_dir.fingerprint, written)
        saved_config = yaml.safe_dump(config_to_flat_dict(config), sort_keys=False)
        (run_dir.path / SAVED_CONFIG_FILE).write_text(saved_config)
    if config.method.pissa_init and run_dir.resume_from is None and trainer.is_world_process_zero():
        # The adapter as initialised: the final one is saved relative to it, so it applies to the original base.
        model.save_pretrained(run_dir.path / PISSA_INIT_DIR)


def save_final_outputs(trainer, tokenizer, processor, config: RunConfig, output_dir: Path) -> None:
    """The model or adapter, tokenizer, processor and loss plot, from global rank 0 alone."""
    trainer.args.save_on_each_node = False
    save_outputs(trainer, tokenizer, config, output_dir)
    if processor is not None and trainer.is_world_process_zero():
        processor.tokenizer = tokenizer  # saved with the run's chat template, beside the processor's own files
        processor.save_pretrained(output_dir)
    if config.output.plot_loss and trainer.is_world_process_zero():
        plot = callbacks.plot_loss(output_dir)
        if plot:
            print(f"loss plot: {plot}")


def apply_method(model, config: RunConfig, checkpointing: bool | str = False):
    method = config.method
    # a vision-language model's vision tower and projector, unless set to train: [] for a text model
    frozen = multimodal.frozen_parts(model, config.model.freeze_vision_tower, config.model.freeze_multi_modal_projector)
    # A reward model's new score head always trains: a LoRA adapter saves it whole (modules_to_save).
    head = [REWARD_HEAD] if config.method.stage == "rm" else []
    if method.finetuning_type == "lora":
        if getattr(model, "is_quantized", False):  # QLoRA / 8-bit LoRA, or a GPTQ/AWQ model
            if config.model.quantization_bit == 4:
                check_cpu_4bit_shapes(model)
            model = prepare_for_kbit_training(model)
        if adapters := config.model.adapter_name_or_path:
            keep_last = not method.create_new_adapter  # go on training the last adapter, or merge it too
            if keep_last and method.lora_target == ["all"] and "lora_target" in method.model_fields_set:
                check_targets_cover_all(model, Path(adapters[-1]))
            if keep_last and head:
                check_adapter_saves(Path(adapters[-1]), REWARD_HEAD)
            model = load_adapters(model, adapters, config.model.model_name_or_path, keep_last=keep_last, trainable=True)
            if keep_last:
                return model
        targets = resolve_lora_targets(model, method.lora_target)
        if frozen:
            targets = multimodal.targets_outside(targets, frozen)
        if config.model.use_unsloth:
            alpha = method.lora_alpha or 2 * method.lora_rank
            return apply_unsloth_lora(
                model,
                targets,
                method.lora_rank,
                alpha,
                method.lora_dropout,
                config.train.seed,
                use_rslora=method.use_rslora,
                use_dora=method.use_dora,
                modules_to_save=method.additional_target,
                checkpointing=checkpointing,
            )
        return apply_lora(
            model,
            targets,
            method.lora_rank,
            method.lora_alpha,
            method.lora_dropout,
            use_rslora=method.use_rslora,
            use_dora=method.use_dora,
            pissa_iter=method.pissa_iter if method.pissa_init else None,
            modules_to_save=[*method.additional_target, *head],
            task_type="SEQ_CLS" if head else "CAUSAL_LM",
        )
    if getattr(model, "is_quantized", False):
        raise ConfigError(
            f"this model is stored quantized, so its weights cannot be trained directly; use finetuning_type: lora "
            f"(not {method.finetuning_type}), or the unquantized model"
        )
    if method.finetuning_type == "freeze":
        model = apply_freeze(
            model,
            method.freeze_trainable_layers,
            method.freeze_trainable_modules,
            [*method.freeze_extra_modules, *head],
        )
    multimodal.freeze(model, frozen)
    return model  # full: every parameter trains (a vision-language model's frozen parts aside)


def check_speed_paths(config: RunConfig, dtype: torch.dtype) -> str:
    """Refuse speed keys this machine cannot honour; return the attention kernel to load the model with."""
    if config.model.enable_liger_kernel:
        check_liger()
    if config.model.use_unsloth:
        check_unsloth()
    if config.train.optim.startswith("paged_") and not torch.cuda.is_available():
        print(f"note: {config.train.optim} pages optimizer state between GPU and CPU; on a CPU it runs unpaged")
    if config.model.use_unsloth:
        print("attention: Unsloth's own")
        return "sdpa"  # not used: Unsloth's loader patches attention itself
    attention = choose_attention(config.model.flash_attn, dtype)
    print(f"attention: {attention}")
    return attention


def choose_gradient_checkpointing(config: RunConfig, model_dir: str) -> bool | str:
    """`auto`: on only when the memory estimate says the run would not fit without it (it costs ~1/3 more compute)."""
    setting = config.train.gradient_checkpointing
    if setting == "offload" and not torch.cuda.is_available():
        print("note: gradient_checkpointing: offload keeps activations in CPU RAM, where a CPU run has them already")
    if setting != "auto":
        return setting
    if (config.train.fsdp_config or {}).get("activation_checkpointing"):
        return False  # FSDP checkpoints activations itself; Trainer refuses both
    from tunesmith.estimate.memory import auto_checkpointing

    enabled, reason = auto_checkpointing(config, model_dir, detect_device().type)
    print(f"gradient checkpointing: {reason}")
    return enabled


COMPILE_BACKEND = "inductor"  # tests use "eager": the same graph capture, without generating code


def compile_in_place(model, chunked_loss: bool) -> None:
    """torch.compile, in place: the module keeps its type, so peft, saving and the chunked loss see the same model.

    With the chunked loss the decoder is what runs as one graph; the head and cross-entropy run chunk by chunk.
    """
    from tunesmith.train.loss import causal_lm_parts

    parts = causal_lm_parts(model) if chunked_loss else None
    (parts[0] if parts else model).compile(backend=COMPILE_BACKEND)
    print("torch.compile: the first steps are slow while kernels are generated")


def optimizer_arguments(config: RunConfig, model) -> dict:
    """TrainingArguments for the optimizer: `optim`, or GaLore's projected variant of it over the chosen layers."""
    method, optim = config.method, config.train.optim
    if not method.use_galore:
        return {"optim": optim}
    base = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_8bit": "adamw_8bit"}
    base |= {"adamw_bnb_8bit": "adamw_8bit", "adafactor": "adafactor"}
    if optim not in base:
        raise ConfigError(f"`use_galore` projects adamw_torch, adamw_8bit or adafactor, not optim: {optim}")
    targets = linear_layer_names(model) if method.galore_target == ["all"] else method.galore_target
    return {
        "optim": f"galore_{base[optim]}{'_layerwise' if method.galore_layerwise else ''}",
        "optim_target_modules": targets,
        "optim_args": (
            f"rank={method.galore_rank}, update_proj_gap={method.galore_update_interval}, "
            f"scale={method.galore_scale}, proj_type={method.galore_proj_type}"
        ),
    }


def build_trainer(
    config: RunConfig,
    model,
    tokenizer,
    data,
    precision,
    fingerprint,
    checkpointing: bool | str,
    output_dir_shared: bool = True,
    *,
    trainer_class: type = TunesmithTrainer,
    data_collator=None,
    arguments_class: type | None = None,
    stage_arguments: dict | None = None,
):
    """The Trainer of this run. Another stage (rm) passes its TunesmithTrainer subclass, batches and arguments
    class (a TRL config: TrainingArguments with the stage's own fields, `stage_arguments`)."""
    from transformers import PrinterCallback

    train = config.train
    fsdp_arguments = fsdp.training_arguments(train.fsdp, train.fsdp_offload, train.fsdp_config, model)  # {}: none
    if fsdp_arguments:
        apply_fsdp_on_cpu_processes()  # accelerate 1.15 would drop FSDP on CPU processes and run DDP
    args = training_arguments(
        config,
        model,
        data,
        precision,
        checkpointing,
        output_dir_shared,
        fsdp_arguments,
        arguments_class,
        **(stage_arguments or {}),
    )
    packing = config.data.packs
    if data_collator is None:
        pad_id = tokenizer.pad_token_id
        data_collator = PackedBatches.for_model(pad_id, model) if packing else PadToLongest(pad_id)
    with tensorboard_folder(train.logging_dir):
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=data_collator,
            processing_class=tokenizer,
            callbacks=run_callbacks(config),
            checkpoint_fingerprint=fingerprint,  # in each checkpoint, so that resuming can check it belongs to this run
            # Liger's fused linear cross-entropy already avoids the full logits, inside the model's own forward
            chunked_loss=config.method.chunked_loss and not config.model.enable_liger_kernel,
            loraplus_lr_ratio=config.method.loraplus_lr_ratio,
            loraplus_lr_embedding=config.method.loraplus_lr_embedding,
            offload_activations=checkpointing == "offload",
            # grouped by the rows of one forward pass over all processes: the same order for any process count
            train_sampler=length_grouped_sampler(
                train.group_by_length,
                packing,
                data.train,
                train.per_device_train_batch_size * args.world_size,
                train.seed,
            ),
        )
    trainer.remove_callback(PrinterCallback)
    if fsdp_arguments:
        trainer.add_callback(fsdp.ShardingCheck())  # fails the run unless the model really is sharded
    return trainer


@contextmanager
def tensorboard_folder(logging_dir: str | None):
    """`logging_dir`: Trainer's TensorBoard callback, created with the Trainer, takes its folder from this variable
    (transformers 5 dropped the `logging_dir` argument)."""
    if logging_dir is None:
        yield
        return
    before = os.environ.get(TENSORBOARD_LOGGING_DIR)
    os.environ[TENSORBOARD_LOGGING_DIR] = logging_dir
    try:
        yield
    finally:
        if before is None:
            del os.environ[TENSORBOARD_LOGGING_DIR]
        else:
            os.environ[TENSORBOARD_LOGGING_DIR] = before


def run_callbacks(config: RunConfig) -> list:
    """What every stage's run shows and keeps: progress, tokens/s, metrics.jsonl, NaN guard, Ctrl-C."""
    return [
        callbacks.TokensPerSecond(),
        callbacks.ProgressBar(),
        callbacks.MetricsFile(Path(config.output.output_dir)),
        callbacks.NonFiniteLossGuard(),
        callbacks.SaveOnInterrupt(),
    ]


def training_arguments(
    config: RunConfig,
    model,
    data,
    precision,
    checkpointing: bool | str,
    output_dir_shared: bool,
    fsdp_arguments: dict,
    arguments_class: type | None = None,
    **stage_arguments,
):
    """Trainer's arguments for this run: every key that Trainer itself implements is passed through here.

    `arguments_class`: a TrainingArguments subclass (a TRL config), given every field whose default differs from
    TrainingArguments' explicitly here, plus `stage_arguments`."""
    from transformers import TrainingArguments

    values = training_argument_values(config, model, data, precision, checkpointing, output_dir_shared, fsdp_arguments)
    return (arguments_class or TrainingArguments)(**values, **stage_arguments)


def training_argument_values(
    config: RunConfig, model, data, precision, checkpointing: bool | str, output_dir_shared: bool, fsdp_arguments: dict
) -> dict:
    """The values of `training_arguments`, which TRL's configs (subclasses of TrainingArguments) take as well."""
    train = config.train
    evaluate = data.eval is not None
    packing = config.data.packs
    eval_strategy = train.eval_strategy or ("steps" if evaluate else "no")
    return dict(
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
        **optimizer_arguments(config, model),
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
        # nodes without a shared file system each keep whole checkpoints (DeepSpeed's: use_node_local_storage)
        save_on_each_node=not output_dir_shared,
        report_to=[] if train.report_to == ["none"] else train.report_to,
        run_name=train.run_name,
        dataloader_num_workers=train.dataloader_num_workers,
        ddp_timeout=train.ddp_timeout,
        # several CPU processes (a group joined before the recipe runs) talk over gloo
        ddp_backend="gloo" if torch.distributed.is_initialized() and not torch.cuda.is_available() else None,
        deepspeed=train.deepspeed,  # a JSON path, checked in TrainSection; "auto" values come from these arguments
        **fsdp_arguments,
        # A packed batch has a 4D mask (or none), which Trainer cannot count real tokens from: count every position.
        include_num_input_tokens_seen="all" if packing else "non_padding",
        remove_unused_columns=False,
        # reentrant checkpointing saves each layer's input through autograd's hooks, where offload can move it
        activation_checkpointing=bool(checkpointing),
        activation_checkpointing_kwargs={"use_reentrant": checkpointing == "offload"},
        torch_empty_cache_steps=train.torch_empty_cache_steps,
        neftune_noise_alpha=config.method.neftune_noise_alpha,
        use_liger_kernel=config.model.enable_liger_kernel,
        disable_tqdm=True,  # our ProgressBar replaces the default bar and the printed log dicts
    )


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
    fsdp.use_full_state_dict(trainer)  # whole weights, even if FSDP checkpoints were sharded
    trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return
    fsdp.drop_tied_copies(trainer, output_dir)  # a tied weight once, as transformers saves it
    if config.method.pissa_init:
        # Trained PiSSA factors apply to the residual base; as the difference to their initial values (rank 2r)
        # they apply to the original base model, which is what chat, merge and peft users load.
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
            output_dir, path_initial_model_for_weight_conversion=str(output_dir / PISSA_INIT_DIR)
        )
    tokenizer.save_pretrained(output_dir)
    if config.method.finetuning_type == "lora":
        from safetensors.torch import load_file

        adapter = load_file(output_dir / "adapter_model.safetensors")
        check_adapter_weights(adapter)
        if deepspeed.stage(config.train.deepspeed) == 3:
            deepspeed.check_gathered_adapter(adapter, trainer.model)
    else:  # ZeRO-0/1/2 save a tied lm_head as a second copy of the embedding
        deepspeed.remove_tied_copies(output_dir, getattr(trainer.model, "all_tied_weights_keys", None) or {})
