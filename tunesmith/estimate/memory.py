"""The peak memory of a training run, predicted from the model's config.json and the run's config alone.

Nothing here loads weights or data. The prediction is the sum of physical terms, each one a tensor (or set of
tensors) that training holds at its peak, in bytes:

- **runtime**: what the process holds before any model: on a CPU the resident memory of Python + torch +
  transformers + peft + datasets + the tokenizer and Trainer (`CPU_RUNTIME_BYTES`, measured with a tiny model); on
  a GPU the CUDA context and kernels (`CUDA_CONTEXT_BYTES`).
- **weights**: every parameter in the dtype model/precision.py keeps it in: float32 on a CPU, and for full
  fine-tuning on a GPU (master weights); bfloat16 for a frozen base on a GPU, and with pure_bf16. Under 16-bit
  autocast with float32 weights, a 16-bit copy of the linear weights is alive during the step. Quantized linear
  layers (not the output head):
  4-bit NF4/FP4 is 0.5 byte per weight plus one absmax per 64-weight block (1 byte with double quantization, else
  4); 8-bit is 1 byte per weight plus a float32 scale per output row. In a quantized run peft keeps every other
  parameter (embeddings, norms) in float32. LoRA adds rank x (in + out) float32 parameters per adapted linear
  layer (`lora_target: all` = every linear layer but the head); DoRA adds a magnitude per output feature. The
  model's layers come from tunesmith.estimate.shape; a mixture-of-experts model keeps every expert's weights (fused
  3-D tensors that bitsandbytes does not quantize: float32 in a quantized run, like the norms).
- **gradients**: one per trainable parameter, in its dtype (DDP adds a bucket copy when several processes run).
- **optimizer**: adamw_torch / _fused / paged_adamw_32bit: two states per trainable parameter in its dtype;
  adamw_8bit / adamw_bnb_8bit / paged_adamw_8bit: two 1-byte states (+ a float32 absmax per 2048 values);
  adafactor: factored second moment (rows + columns of each matrix); sgd: none. DeepSpeed keeps a float32 master
  copy of 16-bit trainable weights as well. ZeRO stage 1 shards optimizer state (and master weights) over the
  processes, stage 2 gradients too, stage 3 the weights too (FSDP full_shard = stage 3, shard_grad_op = stage 2);
  offload moves the optimizer (and with stage 3 the weights) into CPU RAM.
- **activations**: the tensors autograd saves in the forward pass, per token of a [batch, cutoff_len] batch and
  per decoder layer, counted tensor by tensor for a Llama-style layer (measured against saved-tensor hooks):
  each RMSNorm saves its float32 input, its 1/rms and its output (and the normalised input when norm weights
  train); attention saves q, k, v and its output (k and v repeated to every query head when a padding mask is
  given, as transformers' sdpa path does) and a float32 log-sum-exp per head, plus, with a mask, a float copy of
  the [seq, seq] mask per layer; a gated MLP saves gate, up, act(gate) and their product (4 x intermediate); each
  LoRA layer saves its rank-r middle (and with dropout the dropped input and its mask); a sparse (MoE) layer saves
  the router's probabilities and, per token, the tensors of the `num_experts_per_tok` experts it goes through
  (`moe_activation_bytes`), not of all experts. Gradient checkpointing
  keeps only each layer's input (hidden_size per token) plus one layer's activations while it is recomputed;
  `offload` puts those inputs in CPU RAM (on a CPU they are there anyway).
- **logits**: the model's own loss holds the float32 log-softmax of the [batch, seq, vocab] logits and, in the
  backward pass, the gradients of both: 3 x 4 bytes x tokens x vocab. The chunked loss (`chunked_loss: true`)
  does the same for at most `chunk_size` supervised tokens at a time, plus the gathered hidden states.

Stage rm (a reward model) runs each pair's chosen and rejected rows in one batch (twice the rows), has no output
head over the vocabulary (an untied lm_head is not loaded) and no vocabulary logits: its one-output score head
keeps only the hidden states it reads. Stage pt is sft's run (packed by default).

The peak is runtime + weights + optimizer + max(activations + logits, gradients): in the forward/backward pass the
optimizer state of the previous step is alive and the gradients are not (Trainer frees them), while at the
optimizer step the activations are gone. On a CPU, loading can peak higher than training for a quantized model
(the whole checkpoint paged in plus the quantized copy); the larger of the two is the prediction.

On a CPU these are the bytes alive at the peak, which is the process's resident peak only when the allocator does
not fragment. glibc's malloc, by default, keeps freed tensors of up to 32 MiB in its heap arenas, so the resident
peak of a run was ~1.5x the live peak (SmolLM2, LoRA, batch 4 x 512: 6.5 GiB against 4.2 GiB); CPU runs of
`tunesmith train` therefore use tcmalloc or jemalloc where installed, else a 1 MiB mmap threshold
(tunesmith.train.allocator), and their resident peak stays within a few percent of this estimate.

The sequence length is `cutoff_len`: every unpacked batch is padded to its longest row, so the longest batch of
an epoch reaches it whenever some row does, and a packed row always fills it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ConfigError
from tunesmith.estimate.shape import EstimateUnsupported, Linear, ModelShape, UnknownShape
from tunesmith.model.precision import ComputeDevice, choose_precision, cpu_bf16_feature, detect_device

__all__ = ["EstimateUnsupported", "Linear", "ModelShape", "UnknownShape"]

GiB = 2**30
# Measured: peak RSS of `tunesmith train` on a 2-layer, hidden-32 model with batch 1 x 64 tokens (656 MiB) less
# this module's terms for that model (43 MiB); torch 2.13 / transformers 5.23. `python -m bench.estimate` prints it
# as the `runtime` row.
CPU_RUNTIME_BYTES = 613 * 2**20
CUDA_CONTEXT_BYTES = GiB // 2  # CUDA context, cuBLAS/cuDNN workspaces and kernels
CHUNK_SIZE = 1024  # tunesmith.train.loss.DEFAULT_CHUNK_SIZE; kept here so that this module imports no torch
NF4_BLOCK = 64  # bitsandbytes 4-bit block size
DOUBLE_QUANT_GROUP = 256  # double quantization: one float32 constant per 256 absmax values
BNB_8BIT_OPTIMIZER_BLOCK = 2048
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
AUTO_MARGIN = 0.9  # gradient_checkpointing: auto turns it on above this share of the free memory

OPTIMIZER_STATES = {  # optimizer → (states per trainable value, bytes per state or None for the parameter's dtype)
    "adamw_torch": (2, None),
    "adamw_torch_fused": (2, None),
    "paged_adamw_32bit": (2, 4),
    "adamw_8bit": (2, 1),
    "adamw_bnb_8bit": (2, 1),
    "paged_adamw_8bit": (2, 1),
    "sgd": (0, None),
    "adafactor": (0, None),  # factored: see optimizer_bytes
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one training process on `device`, in bytes, and the terms it adds up."""

    device: str
    runtime: int
    weights: int  # the base model's parameters as kept (quantized linears, float32 others in a quantized run)
    trainable: int  # LoRA parameters (0 for full / freeze: those are in `weights`)
    gradients: int
    optimizer: int
    activations: int
    logits: int
    loading_peak: int  # weights + pages while loading, compared with the training peak
    total_bytes: int
    reference: int = 0  # dpo/kto with full/freeze (or ref_model): the frozen second copy of the model
    host_bytes: int = 0  # on a GPU: what offloading keeps in CPU RAM instead (not in total_bytes)
    gradient_checkpointing: bool | str = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def parts(self) -> dict[str, int]:
        """The named terms, in the order the table prints them."""
        names = ("runtime", "weights", "reference", "trainable", "gradients", "optimizer")
        return {name: getattr(self, name) for name in (*names, "activations", "logits")}

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"notes": list(self.notes)}


@dataclass(frozen=True)
class Settings:
    """The config values the estimate depends on (read with defaults, so older configs work too)."""

    finetuning_type: str = "lora"
    quantization_bit: int | None = None
    double_quantization: bool = True
    lora_rank: int = 8
    lora_target: tuple[str, ...] = ("all",)
    lora_dropout: float = 0.0
    use_dora: bool = False
    freeze_trainable_layers: int = 2
    batch_size: int = 1
    seq_len: int = 2048
    packing: bool = False
    optim: str = "adamw_torch"
    chunked_loss: bool = True
    bf16: bool | None = None  # None: the device's choice (model/precision.py)
    fp16: bool = False
    pure_bf16: bool = False
    deepspeed: dict[str, Any] | None = None
    fsdp: str | None = None
    fsdp_offload: bool = False
    world_size: int = 1
    dtype_bytes: int | None = None  # weights and activations in 2 or 4 bytes; None: the device's precision
    stage: str = "sft"
    reference_copy: bool = False  # dpo/kto: a frozen second copy of the model is held (not LoRA, not precomputed)

    @classmethod
    def from_config(cls, config: Any, device: str) -> Settings:
        """The settings of `config` run on `device` ("cpu" or "cuda"; pairs_per_forward: auto depends on it)."""

        def get(section: str, key: str, default: Any) -> Any:
            return getattr(getattr(config, section, None), key, default)

        deepspeed = get("train", "deepspeed", None)
        target = get("method", "lora_target", ["all"])
        stage = get("method", "stage", "sft")
        loss = stage if stage in ("orpo", "simpo") else get("preference", "pref_loss", "sigmoid")
        uses_reference = stage == "kto" or (stage == "dpo" and loss not in ("orpo", "simpo"))
        separate_reference = get("preference", "ref_model", None) or get("method", "finetuning_type", "lora") != "lora"
        # a pair's chosen and rejected rows go through the model as one batch of twice the rows (rm: see estimate())
        rows = get("train", "per_device_train_batch_size", 1)
        if stage in ("dpo", "orpo", "simpo"):  # the pairs of one forward pass (pairs_per_forward)
            rows = 2 * config.preference.pairs_in_one_forward(rows, device)
        return cls(
            reference_copy=bool(uses_reference and separate_reference)
            and get("preference", "precompute_ref_log_probs", False) is not True,
            finetuning_type=get("method", "finetuning_type", "lora"),
            quantization_bit=get("model", "quantization_bit", None),
            double_quantization=get("model", "double_quantization", True),
            lora_rank=get("method", "lora_rank", 8),
            lora_target=tuple(target) if isinstance(target, list | tuple) else (str(target),),
            lora_dropout=get("method", "lora_dropout", 0.0),
            use_dora=get("method", "use_dora", False),
            freeze_trainable_layers=get("method", "freeze_trainable_layers", 2),
            batch_size=rows,
            seq_len=get("data", "cutoff_len", 2048),
            packing=bool(get("data", "packing", False) or get("data", "neat_packing", False)),
            optim=get("train", "optim", "adamw_torch"),
            chunked_loss=get("method", "chunked_loss", True),
            bf16=get("train", "bf16", None),
            fp16=get("train", "fp16", False),
            pure_bf16=get("train", "pure_bf16", False),
            deepspeed=read_deepspeed(deepspeed) if deepspeed else None,
            fsdp=get("train", "fsdp", None),
            fsdp_offload=get("train", "fsdp_offload", False),
            world_size=get("train", "nproc_per_node", None) or 1,
            stage=stage,
        )


def read_deepspeed(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"`deepspeed`: cannot read {path}: {error}") from None


def estimate_peak_memory(
    config: Any, model_config: dict[str, Any], *, device: str, gradient_checkpointing: bool | str
) -> MemoryEstimate:
    """The peak memory of training `config` on one process of `device` ("cpu" or "cuda").

    `model_config` is the model's config.json as a dict; `gradient_checkpointing` is True, False or "offload"
    ("auto" is the caller's choice between those, see `choose_checkpointing`).
    """
    shape = ModelShape.from_config(model_config)
    return estimate(
        shape, Settings.from_config(config, device), device=device, gradient_checkpointing=gradient_checkpointing
    )


def estimated_device(device: str) -> ComputeDevice:
    """This machine's device of that type; a GPU the estimate cannot see is assumed to have bfloat16."""
    here = detect_device()
    if here.type == device:
        return here
    if device == "cuda":
        return ComputeDevice("cuda", bf16=True)
    return ComputeDevice("cpu", cpu_bf16_feature() is not None)


def estimate(
    shape: ModelShape, settings: Settings, *, device: str, gradient_checkpointing: bool | str = False
) -> MemoryEstimate:
    """The terms of the peak, each computed by one step below, and the peak they add up to."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, not {device!r}")
    if gradient_checkpointing == "auto":
        raise ValueError("resolve gradient_checkpointing: auto before estimating (see choose_checkpointing)")
    cpu, notes = device == "cpu", []
    if settings.stage == "rm":  # chosen and rejected rows in one batch; no vocabulary head
        settings = replace(settings, batch_size=2 * settings.batch_size)
        shape = replace(shape, tied_embeddings=True)
        notes.append("a reward model: chosen and rejected rows in one batch, a score head instead of the lm_head")
    if settings.stage in ("dpo", "orpo", "simpo"):
        notes.append(f"activations of one pass of {settings.batch_size // 2} pair(s) (pairs_per_forward)")
    weight_bytes, act_bytes = kept_dtype_bytes(settings, device)
    weights = base_weight_bytes(shape, settings, weight_bytes, act_bytes, notes)
    training = trainable_terms(shape, settings, weight_bytes)
    weights, training, host = shard_and_offload(weights, training, settings, cpu, notes)
    activations, offloaded = activation_bytes(shape, settings, training.targets, act_bytes, gradient_checkpointing, cpu)
    host += offloaded
    logits = logits_bytes(shape, settings, act_bytes)
    loading = loading_peak_bytes(shape, settings, weight_bytes, cpu)

    runtime = CPU_RUNTIME_BYTES if cpu else CUDA_CONTEXT_BYTES
    reference = shape.total_params * weight_bytes if settings.reference_copy else 0
    if reference:
        notes.append("a frozen second copy of the model is the reference (precompute_ref_log_probs: true avoids it)")
    step = training.gradients + optimizer_step_temporaries(settings.optim, cpu, training.gradients, training.largest)
    peak = weights + reference + training.adapters + training.optimizer + max(activations + logits, step)
    if loading > peak:
        notes.append("loading the checkpoint is the peak")
    return MemoryEstimate(
        device=device,
        runtime=runtime,
        weights=weights,
        trainable=training.adapters,
        gradients=training.gradients,
        optimizer=training.optimizer,
        activations=activations,
        logits=logits,
        loading_peak=loading,
        total_bytes=runtime + max(peak, loading),
        reference=reference,
        host_bytes=host,
        gradient_checkpointing=gradient_checkpointing,
        notes=tuple(notes),
    )


def kept_dtype_bytes(s: Settings, device: str) -> tuple[int, int]:
    """(bytes per weight, bytes per activation) as model/precision.py keeps them on this kind of device: float32
    weights on a CPU and for full fine-tuning on a GPU, bfloat16 for a frozen GPU base and with pure_bf16; 16-bit
    activations under autocast."""
    precision = choose_precision(s.bf16, s.fp16, s.pure_bf16, s.finetuning_type, estimated_device(device))
    weight_bytes = s.dtype_bytes or (2 if precision.dtype == torch.bfloat16 else 4)
    act_bytes = s.dtype_bytes or (2 if precision.bf16 or precision.fp16 else 4)
    return weight_bytes, act_bytes


def is_quantized(s: Settings) -> bool:
    return s.quantization_bit in (4, 8) and s.finetuning_type == "lora"


def base_weight_bytes(shape: ModelShape, s: Settings, weight_bytes: int, act_bytes: int, notes: list[str]) -> int:
    """The base model's parameters as kept: quantized linears (the rest in float32), or all in the weight dtype."""
    if is_quantized(s):
        # peft's prepare_model_for_kbit_training: every parameter bitsandbytes did not quantize (embeddings, norms,
        # the experts' fused 3-D weights) in float32
        other = shape.total_params - shape.linear_params
        if shape.experts:
            notes.append(
                "bitsandbytes does not quantize the experts' fused weights (transformers 5), and peft keeps them in "
                "float32: quantization saves little on this mixture-of-experts model"
            )
        return other * 4 + quantized_linear_bytes(shape, s.quantization_bit, s.double_quantization)
    weights = shape.total_params * weight_bytes
    if weight_bytes == 4 and act_bytes == 2:
        # Autocast casts float32 weights to 16 bits for each matmul: trained weights once per step (cached), frozen
        # ones per use; either copy is kept for the backward pass.
        notes.append("16-bit autocast holds a 16-bit copy of the float32 linear weights during the step")
        weights += shape.linear_params * 2
    return weights


@dataclass(frozen=True)
class Training:
    """What trains: its parameter count and bytes (adapters are extra tensors; full/freeze train base weights)."""

    params: int
    bytes_per: int
    adapters: int  # LoRA tensors (0 for full / freeze: those are in the weights)
    gradients: int
    optimizer: int
    largest: int  # the largest trainable tensor, for the optimizer step's temporaries
    targets: tuple[Linear, ...]  # LoRA-adapted linears


def trainable_terms(shape: ModelShape, s: Settings, weight_bytes: int) -> Training:
    lora = s.finetuning_type == "lora"
    targets = lora_targets(shape, s.lora_target) if lora else ()
    if lora:
        params = sum(s.lora_rank * (t.in_features + t.out_features) * shape.layer_count(t) for t in targets)
        if s.use_dora:
            params += sum(t.out_features * shape.layer_count(t) for t in targets)
        bytes_per = 4  # peft keeps adapter weights in float32 (autocast_adapter_dtype)
    elif s.finetuning_type == "freeze":
        params, bytes_per = shape.last_layers_params(abs(s.freeze_trainable_layers)), weight_bytes
    else:
        params, bytes_per = shape.total_params, weight_bytes
    return Training(
        params=params,
        bytes_per=bytes_per,
        adapters=params * bytes_per if lora else 0,
        gradients=params * bytes_per,
        optimizer=optimizer_bytes(shape, s.optim, params, bytes_per, lora, targets, s.lora_rank),
        largest=largest_tensor(shape, lora, s.lora_rank, targets),
        targets=targets,
    )


def shard_and_offload(
    weights: int, training: Training, s: Settings, cpu: bool, notes: list[str]
) -> tuple[int, Training, int]:
    """DeepSpeed ZeRO / FSDP shard across processes, DDP keeps a bucket copy of the gradients, offload moves state
    to CPU RAM. Returns the weights and training terms per process and the bytes offloaded."""
    world = max(1, s.world_size)
    stage, offload_optimizer, offload_params = sharding(s)
    optimizer, gradients, adapters, host = training.optimizer, training.gradients, training.adapters, 0
    if s.deepspeed is not None and training.bytes_per < 4:
        optimizer += training.params * 4  # DeepSpeed's float32 master weights
    if stage >= 1:
        optimizer //= world
    if stage >= 2:
        gradients //= world
    if stage >= 3:
        weights, adapters = weights // world, adapters // world
    if world > 1 and stage == 0:
        gradients *= 2  # DDP's reducer buckets hold a second copy of every gradient
    if offload_optimizer and not cpu:
        host, optimizer = host + optimizer, 0
    if offload_params and not cpu:
        host, weights = host + weights, 0
    if world > 1:
        notes.append(f"per process, {world} processes")
    return weights, replace(training, optimizer=optimizer, gradients=gradients, adapters=adapters), host


def activation_bytes(
    shape: ModelShape, s: Settings, targets: tuple[Linear, ...], act_bytes: int, checkpointing: bool | str, cpu: bool
) -> tuple[int, int]:
    """(activations of one [batch, seq] batch, the part of them that `offload` moves from the GPU to CPU RAM)."""
    tokens = s.batch_size * s.seq_len
    masked = s.packing or s.batch_size > 1  # padding (or packing's block mask) needs an attention mask
    trains_norms = s.finetuning_type != "lora"
    dense = layer_activation_bytes(shape, s, targets, act_bytes, masked, trains_norms)
    sparse = layer_activation_bytes(shape, s, targets, act_bytes, masked, trains_norms, sparse=True)
    final_norm = tokens * (shape.hidden_size * (4 + act_bytes) + 4)
    embedding_output = tokens * shape.hidden_size * act_bytes  # the input of the first layer
    if not checkpointing:
        layers = (shape.num_layers - shape.sparse_layers) * dense + shape.sparse_layers * sparse
        return layers * tokens + final_norm + embedding_output, 0
    # Checkpointing keeps each layer's input, and one layer's activations while it is recomputed.
    inputs = shape.num_layers * tokens * shape.hidden_size * act_bytes
    one_layer = max(sparse if shape.sparse_layers else 0, dense if shape.sparse_layers < shape.num_layers else 0)
    kept = one_layer * tokens + final_norm + embedding_output
    if checkpointing == "offload" and not cpu:  # on a CPU they are in CPU RAM anyway
        return kept, inputs
    return kept + inputs, 0


def logits_bytes(shape: ModelShape, s: Settings, act_bytes: int) -> int:
    """The loss head: float32 log-softmax and the gradients of it and of the logits."""
    tokens, vocab = s.batch_size * s.seq_len, shape.vocab_size
    if s.stage == "rm":  # the score head's input (kept for its backward) and its one float32 output per token
        return tokens * (shape.hidden_size * act_bytes + 4)
    if s.chunked_loss:
        return 3 * 4 * min(CHUNK_SIZE, tokens) * vocab + tokens * shape.hidden_size * act_bytes
    logits = 3 * 4 * tokens * vocab
    if act_bytes < 4:
        logits += act_bytes * tokens * vocab  # the logits in the compute dtype before the float32 copy
    return logits


def loading_peak_bytes(shape: ModelShape, s: Settings, weight_bytes: int, cpu: bool) -> int:
    """Loading a quantized (or converted) model on a CPU pages in the whole checkpoint next to the copy being
    built; tunesmith releases the file afterwards (model/load.release_checkpoint_file)."""
    stored_bytes = BYTES.get(shape.stored_dtype, 4)
    if not cpu or not (is_quantized(s) or weight_bytes != stored_bytes):
        return 0
    return shape.total_params * stored_bytes + base_weight_bytes(shape, s, weight_bytes, cpu, [])


def quantized_linear_bytes(shape: ModelShape, bits: int | None, double_quant: bool) -> int:
    """bitsandbytes storage of the decoder's linear weights (biases stay in float32)."""
    weights = sum(t.in_features * t.out_features * shape.layer_count(t) for t in shape.linears)
    biases = sum(t.out_features * shape.layer_count(t) for t in shape.linears if t.bias)
    if bits == 8:
        rows = sum(t.out_features * shape.layer_count(t) for t in shape.linears)
        return weights + 4 * rows + 4 * biases  # int8 weights, a float32 scale per output row
    blocks = math.ceil(weights / NF4_BLOCK)
    constants = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_GROUP) if double_quant else 4 * blocks
    return weights // 2 + constants + 4 * biases


def lora_targets(shape: ModelShape, lora_target: tuple[str, ...]) -> tuple[Linear, ...]:
    if list(lora_target) == ["all"]:
        return shape.linears
    unknown = [name for name in lora_target if name not in shape.linear_names()]
    if unknown:
        raise EstimateUnsupported(
            f"`lora_target`: {', '.join(unknown)} matches no linear layer of this model as the estimate knows it; "
            f"its linear layers are: {', '.join(shape.linear_names())} (or use `all`)"
        )
    return tuple(t for t in shape.linears if t.name in lora_target)


def optimizer_bytes(
    shape: ModelShape,
    optim: str,
    trainable_params: int,
    bytes_per: int,
    lora: bool,
    targets: tuple[Linear, ...],
    rank: int,
) -> int:
    if optim == "adafactor":  # factored second moment: a row and a column vector per matrix, full for vectors
        if lora:
            return sum(4 * (2 * rank + t.in_features + t.out_features) * shape.layer_count(t) for t in targets)
        matrices = [(shape.layer_count(t), t.in_features, t.out_features) for t in shape.linears]
        matrices.append((1, shape.vocab_size, shape.hidden_size))
        if shape.experts:  # 3-D expert weights: factored over their last two dimensions, per expert
            layers = shape.experts.layers
            matrices += [(layers * n, rows, cols) for n, rows, cols in shape.experts.tensors(shape.hidden_size)]
        factored = sum(4 * n * (rows + cols) for n, rows, cols in matrices)
        vectors = trainable_params - sum(n * rows * cols for n, rows, cols in matrices)
        return factored + 4 * max(vectors, 0)
    if optim not in OPTIMIZER_STATES:
        raise EstimateUnsupported(
            f"`optim`: the memory estimate does not know {optim!r}; it knows: {', '.join(OPTIMIZER_STATES)}"
        )
    states, state_bytes = OPTIMIZER_STATES[optim]
    per_value = state_bytes if state_bytes is not None else bytes_per
    total = states * per_value * trainable_params
    if state_bytes == 1:
        total += states * 4 * math.ceil(trainable_params / BNB_8BIT_OPTIMIZER_BLOCK)
    return total


def optimizer_step_temporaries(optim: str, cpu: bool, gradients: int, largest: int) -> int:
    """torch AdamW on a GPU runs `foreach` (one temporary as large as all states); on a CPU it goes tensor by tensor."""
    if optim == "adamw_torch" and not cpu:
        return gradients
    return 2 * largest if optim.startswith("adamw_torch") else 0


def largest_tensor(shape: ModelShape, lora: bool, rank: int, targets: tuple[Linear, ...]) -> int:
    if lora:
        return 4 * max((rank * max(t.in_features, t.out_features) for t in targets), default=0)
    experts = [n * rows * cols for n, rows, cols in shape.experts.tensors(shape.hidden_size)] if shape.experts else []
    return 4 * max(shape.embedding_params, *(t.in_features * t.out_features for t in shape.linears), *experts)


def sharding(s: Settings) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) from the DeepSpeed config or the FSDP setting."""
    if s.deepspeed is not None:
        zero = s.deepspeed.get("zero_optimization", {}) or {}
        stage = int(zero.get("stage", 0) or 0)
        offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        offload_params = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
        return stage, offload_optimizer, offload_params
    if s.fsdp:
        stage = {"full_shard": 3, "shard_grad_op": 2}.get(s.fsdp.split()[0], 0)
        return stage, s.fsdp_offload, s.fsdp_offload and stage == 3
    return 0, False, False


def layer_activation_bytes(
    shape: ModelShape,
    s: Settings,
    targets: tuple[Linear, ...],
    act_bytes: int,
    masked: bool,
    trains_norms: bool,
    sparse: bool = False,
) -> int:
    """Bytes autograd saves per token in one dense (or sparse) decoder layer (see the module docstring)."""
    h = shape.hidden_size
    # RMSNorm: float32 input, float32 1/rms, output in the compute dtype; the normalised input if the weight trains.
    norm = h * 4 + 4 + h * act_bytes + (h * act_bytes if trains_norms else 0)
    norms = shape.norms_per_layer * norm
    attention = attention_activation_bytes(shape, s.seq_len, act_bytes, masked, trains_norms)
    layer_targets = [t for t in targets if t.layers in ("every", "sparse" if sparse else "dense")]
    if sparse:
        adapted_mlp = any(t.layers == "sparse" for t in layer_targets)  # LoRA on the shared experts
        mlp = moe_activation_bytes(shape, act_bytes, experts_train=trains_norms, adapted_mlp=adapted_mlp)
    else:
        mlp = dense_mlp_activation_bytes(shape, act_bytes)
    adapters = sum(s.lora_rank * 4 for _ in layer_targets)
    if s.lora_dropout > 0:
        adapters += sum(t.in_features * (act_bytes + 1) for t in layer_targets)
    return norms + attention + mlp + adapters


def attention_activation_bytes(
    shape: ModelShape, seq_len: int, act_bytes: int, masked: bool, trains_norms: bool
) -> int:
    """Per token: q, k, v and the output (k and v repeated to every query head when sdpa gets a mask, as
    transformers does), a float32 log-sum-exp per head, and with a mask a float copy of its [seq, seq] rows.
    q/k norms (Qwen3, OLMo2) save their float32 input and 1/rms, and the normalised input when their weight trains."""
    heads, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    mask = seq_len * act_bytes if masked else 0
    if shape.attention is not None:  # MLA: latents, their norms, q and k of q_head_dim, v of v_head_dim
        a = shape.attention
        latents = (a.q_latent + a.kv_latent) * (4 + 4 + act_bytes) + 8 + (a.kv_latent + a.rope_dim) * act_bytes
        qkv = heads * (3 * a.q_head_dim + 2 * a.v_head_dim) * act_bytes + 2 * heads * a.rope_dim * act_bytes
        return latents + qkv + heads * 4 + mask
    qk_norm = 0
    if shape.qk_norm_params:
        qk_norm = (heads + kv) * d * (4 + (act_bytes if trains_norms else 0)) + (heads + kv) * 4
    key_heads = heads if masked else kv
    return qk_norm + (2 * heads * d + 2 * key_heads * d) * act_bytes + heads * 4 + mask


def dense_mlp_activation_bytes(shape: ModelShape, act_bytes: int) -> int:
    """A gated MLP saves gate, up, act(gate) and their product; a plain one its input to the activation and it."""
    return (4 if shape.gated_mlp else 2) * shape.intermediate_size * act_bytes


def moe_activation_bytes(shape: ModelShape, act_bytes: int, experts_train: bool, adapted_mlp: bool) -> int:
    """Per token in a sparse layer: the router's float32 probabilities over all experts; for each of the `active`
    experts the token goes through, its int64 indices and float32 routing weight, its gate_up output, act(gate)
    and weighted output, and when the experts train their gathered input and the product too; the shared experts
    like a dense gated MLP. With frozen experts and router (LoRA) and no adapter on the shared experts, nothing
    keeps the normalised input of the block: the norm's output (counted with the norms) is not saved."""
    experts = shape.experts
    if experts is None:
        return 0
    h = shape.hidden_size
    router = 4 * experts.count + 40 * experts.active
    per_expert = 2 * h + 4 * experts.intermediate_size if experts_train else h + 3 * experts.intermediate_size
    shared = 4 * experts.shared_intermediate_size * act_bytes
    if experts.shared_gate:
        shared += (h + 1) * act_bytes  # the shared expert's output and its sigmoid gate, multiplied together
    unsaved_input = 0 if experts_train or adapted_mlp else h * act_bytes
    return router + experts.active * per_expert * act_bytes + shared - unsaved_input


def choose_checkpointing(
    config: Any, model_config: dict[str, Any], *, device: str, available: int, margin: float = AUTO_MARGIN
) -> tuple[bool, MemoryEstimate]:
    """`gradient_checkpointing: auto`: on when the run without it needs more than `margin` of the free memory."""
    without = estimate_peak_memory(config, model_config, device=device, gradient_checkpointing=False)
    if without.total_bytes <= margin * available:
        return False, without
    return True, estimate_peak_memory(config, model_config, device=device, gradient_checkpointing=True)


def auto_checkpointing(config: Any, model_dir: str, device: str) -> tuple[bool, str]:
    """`gradient_checkpointing: auto` for a training run on the model in `model_dir`: the choice, and the line
    that explains it. Never stops a run: where the estimate does not know the model or a setting, checkpointing
    is on, the choice that cannot run out of memory because of it (it costs about a third more compute), and the
    default of LLaMA-Factory, whose configs users bring."""
    model_config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    free = available_memory(device)
    try:
        needed = estimate_peak_memory(config, model_config, device=device, gradient_checkpointing=False).total_bytes
    except EstimateUnsupported as error:
        return True, (
            f"on (auto), without a memory estimate: {error}. On costs about a third more compute; "
            "gradient_checkpointing: false turns it off"
        )
    enabled = needed > AUTO_MARGIN * free  # the margin: fragmentation and what the estimate does not see
    return enabled, (
        f"{'on' if enabled else 'off'} (auto): the run needs about {needed / GiB:.1f} GiB without it, "
        f"{free / GiB:.1f} GiB is free on {device}"
    )


def auto_precompute(config: Any, model_dir: str, device: str) -> tuple[bool, str]:
    """`precompute_ref_log_probs: auto`: on when the run with a second copy of the model as the reference would not
    fit; the choice and the line that explains it. A model the estimate does not know: on (it cannot run out of
    memory because of the reference)."""
    model_config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    free = available_memory(device)
    checkpointing = config.train.gradient_checkpointing not in (False, "auto")
    try:
        run = estimate_peak_memory(config, model_config, device=device, gradient_checkpointing=checkpointing)
    except EstimateUnsupported as error:
        return True, f"on (auto), without a memory estimate: {error}"
    enabled = run.total_bytes > AUTO_MARGIN * free
    return enabled, (
        f"{'on' if enabled else 'off'} (auto): with a second copy as the reference ({run.reference / GiB:.1f} GiB) the "
        f"run needs about {run.total_bytes / GiB:.1f} GiB, {free / GiB:.1f} GiB is free on {device}"
    )


def available_memory(device: str) -> int:
    """Bytes free for a new run: the GPU's free memory, or the system's available memory on a CPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil  # MemAvailable on Linux (free + reclaimable caches), the same idea on macOS and Windows

    return int(psutil.virtual_memory().available)
