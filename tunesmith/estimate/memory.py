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
  layer (`lora_target: all` = every linear layer but the head); DoRA adds a magnitude per output feature.
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
  LoRA layer saves its rank-r middle (and with dropout the dropped input and its mask). Gradient checkpointing
  keeps only each layer's input (hidden_size per token) plus one layer's activations while it is recomputed;
  `offload` puts those inputs in CPU RAM (on a CPU they are there anyway).
- **logits**: the model's own loss holds the float32 log-softmax of the [batch, seq, vocab] logits and, in the
  backward pass, the gradients of both: 3 x 4 bytes x tokens x vocab. The chunked loss (`chunked_loss: true`)
  does the same for at most `chunk_size` supervised tokens at a time, plus the gathered hidden states.

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
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ConfigError
from tunesmith.model.precision import ComputeDevice, choose_precision, cpu_bf16_feature, detect_device

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
class Linear:
    name: str  # the short module name LoRA targets (q_proj, ...)
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder-only transformer, read from its config.json."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool
    linears: tuple[Linear, ...]  # one decoder layer's linear layers
    norms_per_layer: int = 2
    norm_params: int = 1  # per hidden unit: 1 for RMSNorm, 2 for LayerNorm (weight and bias)
    qk_norm_params: int = 0  # per layer: norms over q and k (Qwen3, Gemma3: one head_dim each; OLMo2: q and k)
    gated_mlp: bool = True
    stored_dtype: str = "float32"  # the checkpoint's dtype

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def layer_linear_params(self) -> int:
        return sum(linear.params for linear in self.linears)

    @property
    def layer_other_params(self) -> int:
        return self.norms_per_layer * self.norm_params * self.hidden_size + self.qk_norm_params

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder layers' linear layers: what quantization and LoRA act on."""
        return self.num_layers * self.layer_linear_params

    @property
    def total_params(self) -> int:
        final_norm = self.norm_params * self.hidden_size
        return (
            self.embedding_params
            + self.head_params
            + self.num_layers * (self.layer_linear_params + self.layer_other_params)
            + final_norm
        )

    def linear_names(self) -> list[str]:
        return sorted({linear.name for linear in self.linears})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """A Llama-family config.json (llama, mistral, qwen2/3, gemma/2/3, phi3, olmo2, ...) → its shape."""
        config = config.get("text_config") or config  # multimodal models: the language model's config
        model_type = str(config.get("model_type", ""))
        if any(key in config for key in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise ConfigError(
                f"{model_type or 'this model'} is a mixture-of-experts model, which the estimate does not model "
                "yet; give --params for a dense model of the same size as an upper bound"
            )
        try:
            hidden = int(config["hidden_size"])
            layers = int(config["num_hidden_layers"])
            heads = int(config["num_attention_heads"])
            vocab = int(config["vocab_size"])
        except KeyError as error:
            raise ConfigError(
                f"the model's config.json has no {error.args[0]}; this estimate knows Llama-style decoder models. "
                "Give --params instead"
            ) from None
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        intermediate = int(config.get("intermediate_size") or 4 * hidden)
        attention_bias = bool(config.get("attention_bias", False))
        qkv_bias = attention_bias or model_type == "qwen2"
        mlp_bias = bool(config.get("mlp_bias", False))
        q, kv = heads * head_dim, kv_heads * head_dim
        if model_type == "phi3":  # fused projections
            linears = (
                Linear("qkv_proj", hidden, q + 2 * kv),
                Linear("o_proj", q, hidden),
                Linear("gate_up_proj", hidden, 2 * intermediate),
                Linear("down_proj", intermediate, hidden),
            )
        else:
            linears = (
                Linear("q_proj", hidden, q, qkv_bias),
                Linear("k_proj", hidden, kv, qkv_bias),
                Linear("v_proj", hidden, kv, qkv_bias),
                Linear("o_proj", q, hidden, attention_bias),
                Linear("gate_proj", hidden, intermediate, mlp_bias),
                Linear("up_proj", hidden, intermediate, mlp_bias),
                Linear("down_proj", intermediate, hidden, mlp_bias),
            )
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=intermediate,
            tied_embeddings=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
            linears=linears,
            norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
            qk_norm_params={"qwen3": 2 * head_dim, "gemma3_text": 2 * head_dim, "olmo2": q + kv}.get(model_type, 0),
            stored_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        )

    @classmethod
    def from_param_count(cls, params: float) -> ModelShape:
        """A Llama-shaped model of about `params` parameters, for a model whose config.json is not at hand.

        Hidden size and depth follow the Llama 2/3 family (hidden 4096 and 32 layers at 7B); the shape matters only
        for activations, which scale with hidden_size x num_layers.
        """
        if params <= 0:
            raise ConfigError(f"--params must be positive, got {params:g}")
        reference = [  # (params, hidden, layers (recomputed below), heads, kv heads, intermediate, vocab, tied)
            (0.135e9, 576, 30, 9, 3, 1536, 49152, True),
            (0.5e9, 896, 24, 14, 2, 4864, 151936, True),
            (1.2e9, 2048, 16, 32, 8, 8192, 128256, True),
            (3.2e9, 3072, 28, 24, 8, 8192, 128256, True),
            (6.7e9, 4096, 32, 32, 32, 11008, 32000, False),
            (13e9, 5120, 40, 40, 40, 13824, 32000, False),
            (33e9, 6656, 60, 52, 52, 17920, 32000, False),
            (70e9, 8192, 80, 64, 8, 28672, 128256, False),
            (405e9, 16384, 126, 128, 8, 53248, 128256, False),
        ]
        _, hidden, _, heads, kv_heads, intermediate, vocab, tied = min(
            reference, key=lambda row: abs(math.log(params / row[0]))
        )
        base = cls.from_config(
            {
                "hidden_size": hidden,
                "num_hidden_layers": 1,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "intermediate_size": intermediate,
                "vocab_size": vocab,
                "tie_word_embeddings": tied,
            }
        )
        per_layer = base.layer_linear_params + base.layer_other_params
        fixed = base.embedding_params + base.head_params + hidden
        return cls.from_config(
            {
                "hidden_size": hidden,
                "num_hidden_layers": max(1, round((params - fixed) / per_layer)),
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "intermediate_size": intermediate,
                "vocab_size": vocab,
                "tie_word_embeddings": tied,
                "dtype": "bfloat16",
            }
        )


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
    host_bytes: int = 0  # on a GPU: what offloading keeps in CPU RAM instead (not in total_bytes)
    gradient_checkpointing: bool | str = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def parts(self) -> dict[str, int]:
        """The named terms, in the order the table prints them."""
        names = ("runtime", "weights", "trainable", "gradients", "optimizer")
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

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        def get(section: str, key: str, default: Any) -> Any:
            return getattr(getattr(config, section, None), key, default)

        deepspeed = get("train", "deepspeed", None)
        target = get("method", "lora_target", ["all"])
        return cls(
            finetuning_type=get("method", "finetuning_type", "lora"),
            quantization_bit=get("model", "quantization_bit", None),
            double_quantization=get("model", "double_quantization", True),
            lora_rank=get("method", "lora_rank", 8),
            lora_target=tuple(target) if isinstance(target, list | tuple) else (str(target),),
            lora_dropout=get("method", "lora_dropout", 0.0),
            use_dora=get("method", "use_dora", False),
            freeze_trainable_layers=get("method", "freeze_trainable_layers", 2),
            batch_size=get("train", "per_device_train_batch_size", 1),
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
    return estimate(shape, Settings.from_config(config), device=device, gradient_checkpointing=gradient_checkpointing)


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
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, not {device!r}")
    if gradient_checkpointing == "auto":
        raise ValueError("resolve gradient_checkpointing: auto before estimating (see choose_checkpointing)")
    s = settings
    notes: list[str] = []
    cpu = device == "cpu"
    # How tunesmith keeps weights and computes (model/precision.py) on this kind of device.
    precision = choose_precision(s.bf16, s.fp16, s.pure_bf16, s.finetuning_type, estimated_device(device))
    weight_bytes = s.dtype_bytes or (2 if precision.dtype == torch.bfloat16 else 4)
    act_bytes = s.dtype_bytes or (2 if precision.bf16 or precision.fp16 else 4)
    quantized = s.quantization_bit in (4, 8) and s.finetuning_type == "lora"
    lora = s.finetuning_type == "lora"

    # Base weights.
    linear = shape.linear_params
    other = shape.total_params - linear
    if quantized:
        other_bytes = other * 4  # peft's prepare_model_for_kbit_training: non-quantized parameters in float32
        weights = other_bytes + quantized_linear_bytes(shape, s.quantization_bit, s.double_quantization)
    else:
        weights = shape.total_params * weight_bytes
    if weight_bytes == 4 and act_bytes == 2 and not quantized:
        # Autocast casts float32 weights to 16 bits for each matmul: trained weights once per step (cached), frozen
        # ones per use; either copy is kept for the backward pass.
        weights += shape.linear_params * 2
        notes.append("16-bit autocast holds a 16-bit copy of the float32 linear weights during the step")

    # What trains.
    targets = lora_targets(shape, s.lora_target) if lora else ()
    if lora:
        per_layer = sum(s.lora_rank * (t.in_features + t.out_features) for t in targets)
        if s.use_dora:
            per_layer += sum(t.out_features for t in targets)
        trainable_params = shape.num_layers * per_layer
        trainable_bytes_per = 4  # peft keeps adapter weights in float32 (autocast_adapter_dtype)
        trainable = trainable_params * trainable_bytes_per
    elif s.finetuning_type == "freeze":
        layers = min(abs(s.freeze_trainable_layers), shape.num_layers)
        trainable_params = layers * (shape.layer_linear_params + shape.layer_other_params)
        trainable_bytes_per, trainable = weight_bytes, 0
    else:
        trainable_params = shape.total_params
        trainable_bytes_per, trainable = weight_bytes, 0
    gradients = trainable_params * trainable_bytes_per
    optimizer = optimizer_bytes(shape, s.optim, trainable_params, trainable_bytes_per, lora, targets, s.lora_rank)
    largest_trainable = largest_tensor(shape, lora, s.lora_rank, targets)

    # Distributed: DeepSpeed ZeRO / FSDP shard across processes; DDP keeps a bucket copy of the gradients.
    world = max(1, s.world_size)
    stage, offload_optimizer, offload_params = sharding(s)
    host = 0
    if s.deepspeed is not None and trainable_bytes_per < 4:
        optimizer += trainable_params * 4  # DeepSpeed's float32 master weights
    if stage >= 1:
        optimizer //= world
    if stage >= 2:
        gradients //= world
    if stage >= 3:
        weights, trainable = weights // world, trainable // world
    if world > 1 and stage == 0:
        gradients *= 2  # DDP's reducer buckets hold a second copy of every gradient
    if offload_optimizer and not cpu:
        host += optimizer
        optimizer = 0
    if offload_params and not cpu:
        host += weights
        weights = 0
    if world > 1:
        notes.append(f"per process, {world} processes")

    # Activations of one [batch, seq] batch.
    tokens = s.batch_size * s.seq_len
    masked = s.packing or s.batch_size > 1  # padding (or packing's block mask) needs an attention mask
    per_layer = layer_activation_bytes(shape, s, targets, act_bytes, masked, trains_norms=not lora)
    final_norm = tokens * (shape.hidden_size * (4 + act_bytes) + 4)
    if gradient_checkpointing:
        inputs = shape.num_layers * tokens * shape.hidden_size * act_bytes
        if gradient_checkpointing == "offload" and not cpu:
            host += inputs
            inputs = 0
        activations = inputs + per_layer * tokens + final_norm
    else:
        activations = shape.num_layers * per_layer * tokens + final_norm
    activations += tokens * shape.hidden_size * act_bytes  # the embedding output, input of the first layer

    # The loss head: float32 log-softmax and the gradients of it and of the logits.
    vocab = shape.vocab_size
    if s.chunked_loss:
        chunk = min(CHUNK_SIZE, tokens)
        logits = 3 * 4 * chunk * vocab + tokens * shape.hidden_size * act_bytes
    else:
        logits = 3 * 4 * tokens * vocab
        if act_bytes < 4:
            logits += act_bytes * tokens * vocab  # the logits in the compute dtype before the float32 copy

    # Loading a quantized (or converted) model pages in the whole checkpoint next to the copy being built;
    # tunesmith releases the file afterwards (model/load.release_checkpoint_file).
    stored = shape.total_params * BYTES.get(shape.stored_dtype, 4)
    runtime = CPU_RUNTIME_BYTES if cpu else CUDA_CONTEXT_BYTES
    step = gradients + optimizer_step_temporaries(s.optim, cpu, gradients, largest_trainable)
    training = weights + trainable + optimizer + max(activations + logits, step)
    loading = stored + weights if cpu and (quantized or weight_bytes != BYTES.get(shape.stored_dtype, 4)) else 0
    if loading > training:
        notes.append("loading the checkpoint is the peak")
    return MemoryEstimate(
        device=device,
        runtime=runtime,
        weights=weights,
        trainable=trainable,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
        loading_peak=loading,
        total_bytes=runtime + max(training, loading),
        host_bytes=host,
        gradient_checkpointing=gradient_checkpointing,
        notes=tuple(notes),
    )


def quantized_linear_bytes(shape: ModelShape, bits: int | None, double_quant: bool) -> int:
    """bitsandbytes storage of the decoder's linear weights (biases stay in float32)."""
    weights = sum(t.in_features * t.out_features for t in shape.linears) * shape.num_layers
    biases = sum(t.out_features for t in shape.linears if t.bias) * shape.num_layers
    if bits == 8:
        rows = sum(t.out_features for t in shape.linears) * shape.num_layers
        return weights + 4 * rows + 4 * biases  # int8 weights, a float32 scale per output row
    blocks = math.ceil(weights / NF4_BLOCK)
    constants = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_GROUP) if double_quant else 4 * blocks
    return weights // 2 + constants + 4 * biases


def lora_targets(shape: ModelShape, lora_target: tuple[str, ...]) -> tuple[Linear, ...]:
    if list(lora_target) == ["all"]:
        return shape.linears
    unknown = [name for name in lora_target if name not in shape.linear_names()]
    if unknown:
        raise ConfigError(
            f"`lora_target`: {', '.join(unknown)} matches no linear layer of this model; "
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
            return shape.num_layers * sum(4 * (2 * rank + t.in_features + t.out_features) for t in targets)
        matrices = [(t.in_features, t.out_features) for t in shape.linears] * shape.num_layers
        matrices.append((shape.vocab_size, shape.hidden_size))
        factored = sum(4 * (rows + cols) for rows, cols in matrices)
        vectors = trainable_params - sum(rows * cols for rows, cols in matrices)
        return factored + 4 * max(vectors, 0)
    if optim not in OPTIMIZER_STATES:
        raise ConfigError(f"`optim`: the estimate does not know {optim!r}; known: {', '.join(OPTIMIZER_STATES)}")
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
    return 4 * max(shape.embedding_params, max(t.in_features * t.out_features for t in shape.linears))


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
    shape: ModelShape, s: Settings, targets: tuple[Linear, ...], act_bytes: int, masked: bool, trains_norms: bool
) -> int:
    """Bytes autograd saves per token in one decoder layer (see the module docstring)."""
    h, heads, kv, d = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim
    # RMSNorm: float32 input, float32 1/rms, output in the compute dtype; the normalised input if the weight trains.
    norm = h * 4 + 4 + h * act_bytes + (h * act_bytes if trains_norms else 0)
    norms = shape.norms_per_layer * norm
    if shape.qk_norm_params:
        norms += (heads + kv) * d * (4 + act_bytes) + (heads + kv) * 4
    key_heads = heads if masked else kv  # transformers repeats k and v per query head when sdpa gets a mask
    attention = (2 * heads * d + 2 * key_heads * d) * act_bytes + heads * 4
    if masked:
        attention += s.seq_len * act_bytes  # the [seq, seq] mask, converted to a float bias per layer
    mlp = (4 if shape.gated_mlp else 2) * shape.intermediate_size * act_bytes
    adapters = sum(s.lora_rank * 4 for _ in targets)
    if s.lora_dropout > 0:
        adapters += sum(t.in_features * (act_bytes + 1) for t in targets)
    return norms + attention + mlp + adapters


def choose_checkpointing(
    config: Any, model_config: dict[str, Any], *, device: str, available: int, margin: float = 0.9
) -> tuple[bool, MemoryEstimate]:
    """`gradient_checkpointing: auto`: on when the run without it needs more than `margin` of the free memory."""
    without = estimate_peak_memory(config, model_config, device=device, gradient_checkpointing=False)
    if without.total_bytes <= margin * available:
        return False, without
    return True, estimate_peak_memory(config, model_config, device=device, gradient_checkpointing=True)


def available_memory(device: str) -> int:
    """Bytes free for a new run: the GPU's free memory, or the system's MemAvailable on a CPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
