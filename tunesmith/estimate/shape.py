"""A model's config.json → the shape the memory estimate needs: its linear layers, experts, norms and embeddings.

Read by names first (Llama's: hidden_size, num_hidden_layers, ...), then by the names transformers' config class
maps them to (`attribute_map`: GPT-2's n_embd / n_layer / n_head, Bloom's n_layer / n_head). Known layouts:

- **Llama-style decoders** (llama, mistral, qwen2/3, gemma/2/3, phi3, olmo2, ...): q/k/v/o projections, a gated
  MLP (gate/up/down), RMSNorm; any other model type with those names is read the same way.
- **GPT-2 / Bloom**: a fused query-key-value projection, a plain 4 x hidden MLP, LayerNorm, biases everywhere.
- **Mixture of experts** (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, ...): the sparse layers' routed
  experts, as transformers 5 stores them: one fused 3-D weight per projection for all experts of a layer (no
  `nn.Linear`, so neither `lora_target: all` nor bitsandbytes touch them) and a router; shared experts are plain
  `nn.Linear` MLPs. All experts' weights count for memory; each token goes through `num_experts_per_tok` of them,
  which is what its compute and activations count. Dense layers: DeepSeek's first `first_k_dense_replace`,
  Qwen-MoE's `mlp_only_layers` and the layers off its `decoder_sparse_step`.
- **Multi-head latent attention** (DeepSeek-V2/V3: `kv_lora_rank`): the low-rank q and kv projections.

Anything else (no hidden size, depth, heads or vocabulary under any of those names, an encoder-decoder model) is an
`UnknownShape`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from tunesmith.errors import TunesmithError


class EstimateUnsupported(TunesmithError):
    """The run holds something the estimate does not model: an optimizer, a LoRA target, a model shape."""


class UnknownShape(EstimateUnsupported):
    """The model's config.json does not describe a shape the estimate knows."""


# The keys the shape is read from, by their Llama names; `attribute_map` gives other families' names for them.
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
FUSED_QKV_FAMILIES = ("gpt2", "bloom")  # one query-key-value projection, plain MLP, LayerNorm, biases


@dataclass(frozen=True)
class Linear:
    name: str  # the short module name LoRA targets (q_proj, ...)
    in_features: int
    out_features: int
    bias: bool = False
    # Which decoder layers hold it: every one, the dense ones (their MLP) or the sparse ones (shared experts).
    layers: Literal["every", "dense", "sparse"] = "every"

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Experts:
    """The routed experts of each sparse (mixture-of-experts) decoder layer, and its router."""

    layers: int  # decoder layers with experts; the others have the dense MLP
    count: int  # routed experts per layer
    active: int  # experts each token goes through (num_experts_per_tok)
    intermediate_size: int  # one expert's MLP width (gate, up: hidden → this; down: back)
    shared_intermediate_size: int = 0  # the shared experts' total width, always active (nn.Linear, in `linears`)
    shared_gate: bool = False  # Qwen2-MoE: a sigmoid gate (hidden → 1) scales the shared expert's output

    def layer_params(self, hidden: int) -> int:
        """One sparse layer's expert and router weights (the shared experts are linears, counted there)."""
        return self.count * 3 * hidden * self.intermediate_size + self.count * hidden

    def tensors(self, hidden: int) -> list[tuple[int, int, int]]:
        """The fused weights of one layer as (experts, rows, columns): gate_up, down and the router."""
        return [
            (self.count, 2 * self.intermediate_size, hidden),
            (self.count, hidden, self.intermediate_size),
            (1, self.count, hidden),
        ]


@dataclass(frozen=True)
class Attention:
    """What the attention of a layer saves for the backward pass; MLA (DeepSeek) adds its low-rank latents."""

    q_head_dim: int  # per head, for queries and keys
    v_head_dim: int
    q_latent: int = 0  # MLA: q_lora_rank (0: q comes straight from the hidden state)
    kv_latent: int = 0  # MLA: kv_lora_rank
    rope_dim: int = 0  # MLA: the key part shared by all heads


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
    linears: tuple[Linear, ...]  # the decoder layers' linear layers (see Linear.layers for which layers)
    norms_per_layer: int = 2
    norm_params: int = 1  # per hidden unit: 1 for RMSNorm, 2 for LayerNorm (weight and bias)
    qk_norm_params: int = 0  # per layer: norms over q and k (Qwen3, Gemma3: one head_dim each; OLMo2: q and k)
    gated_mlp: bool = True
    stored_dtype: str = "float32"  # the checkpoint's dtype
    experts: Experts | None = None
    attention: Attention | None = None  # None: q, k, v of head_dim per head
    extra_params: int = 0  # learned position embeddings, an embedding LayerNorm (GPT-2, Bloom)

    @property
    def sparse_layers(self) -> int:
        return self.experts.layers if self.experts else 0

    def layer_count(self, linear: Linear) -> int:
        """How many decoder layers hold `linear`."""
        return {"every": self.num_layers, "dense": self.num_layers - self.sparse_layers}.get(
            linear.layers, self.sparse_layers
        )

    def layer_linears(self, sparse: bool) -> tuple[Linear, ...]:
        """One dense (or sparse) decoder layer's linear layers."""
        kind = "sparse" if sparse else "dense"
        return tuple(t for t in self.linears if t.layers in ("every", kind))

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def layer_other_params(self) -> int:
        return self.norms_per_layer * self.norm_params * self.hidden_size + self.qk_norm_params

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder layers' linear layers: what quantization and LoRA act on."""
        return sum(t.params * self.layer_count(t) for t in self.linears)

    @property
    def expert_params(self) -> int:
        """All routed experts' and routers' weights (3-D tensors, kept like the norms in a quantized run)."""
        return self.experts.layers * self.experts.layer_params(self.hidden_size) if self.experts else 0

    @property
    def total_params(self) -> int:
        final_norm = self.norm_params * self.hidden_size
        return (
            self.embedding_params
            + self.head_params
            + self.linear_params
            + self.expert_params
            + self.num_layers * self.layer_other_params
            + final_norm
            + self.extra_params
        )

    @property
    def active_params(self) -> int:
        """Parameters one token goes through: what the compute per token scales with (all of them if dense)."""
        if not self.experts:
            return self.total_params
        idle = self.experts.count - self.experts.active
        return self.total_params - self.experts.layers * idle * 3 * self.hidden_size * self.experts.intermediate_size

    def last_layers_params(self, count: int) -> int:
        """Parameters of the last `count` decoder layers (the sparse layers are the last ones where there are any)."""
        count = min(count, self.num_layers)
        sparse = min(count, self.sparse_layers)
        dense_layer = sum(t.params for t in self.layer_linears(sparse=False))
        sparse_layer = sum(t.params for t in self.layer_linears(sparse=True))
        if self.experts:
            sparse_layer += self.experts.layer_params(self.hidden_size)
        return sparse * sparse_layer + (count - sparse) * dense_layer + count * self.layer_other_params

    def linear_names(self) -> list[str]:
        return sorted({linear.name for linear in self.linears})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """A decoder model's config.json (see the module docstring for the families read) → its shape."""
        config = standard_names(config.get("text_config") or config)  # multimodal: the language model's config
        model_type = str(config.get("model_type", ""))
        if config.get("is_encoder_decoder"):
            raise UnknownShape(f"{model_type} is an encoder-decoder model; the memory estimate knows decoder models")
        missing = [key for key in REQUIRED if not isinstance(config.get(key), int)]
        if missing:
            raise UnknownShape(
                f"the memory estimate does not know the shape of {model_type or 'this model'}: its config.json has "
                f"no {' / '.join(missing)} (nor another name for it)"
            )
        if model_type in FUSED_QKV_FAMILIES:
            return fused_qkv_shape(config, model_type)
        return llama_style_shape(config, model_type)

    @classmethod
    def from_param_count(cls, params: float) -> ModelShape:
        """A Llama-shaped model of about `params` parameters, for a model whose config.json is not at hand.

        Hidden size and depth follow the Llama 2/3 family (hidden 4096 and 32 layers at 7B); the shape matters only
        for activations, which scale with hidden_size x num_layers.
        """
        if params <= 0:
            raise EstimateUnsupported(f"--params must be positive, got {params:g}")
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
        llama = {
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "intermediate_size": intermediate,
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
        }
        one_layer = cls.from_config(llama | {"num_hidden_layers": 1})
        per_layer = one_layer.last_layers_params(1)
        fixed = one_layer.total_params - per_layer
        layers = max(1, round((params - fixed) / per_layer))
        return cls.from_config(llama | {"num_hidden_layers": layers, "dtype": "bfloat16"})


def standard_names(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the Llama names filled in from the names its transformers config class maps them to."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return config
    aliases = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {}
    filled = {name: config[alias] for name, alias in aliases.items() if name not in config and alias in config}
    return config | filled


def llama_style_shape(config: dict[str, Any], model_type: str) -> ModelShape:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    experts = experts_of(config, int(config["num_hidden_layers"]))
    linears = attention_linears(config, model_type, hidden, heads, kv_heads, head_dim)
    if experts is None or experts.layers < int(config["num_hidden_layers"]):
        linears += dense_mlp_linears(config, model_type, hidden, intermediate)
    if experts is not None:
        linears += shared_expert_linears(experts, hidden)
    attention = mla_attention(config)
    qk_norm = {"qwen3": 2 * head_dim, "qwen3_moe": 2 * head_dim, "gemma3_text": 2 * head_dim}.get(model_type, 0)
    if model_type in ("olmo2", "olmoe"):
        qk_norm = heads * head_dim + kv_heads * head_dim
    if attention is not None:
        qk_norm = attention.q_latent + attention.kv_latent  # the latents' RMSNorms
    return ModelShape(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        tied_embeddings=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
        linears=linears,
        norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
        qk_norm_params=qk_norm,
        stored_dtype=stored_dtype(config),
        experts=experts,
        attention=attention,
    )


def attention_linears(
    config: dict[str, Any], model_type: str, hidden: int, heads: int, kv_heads: int, head_dim: int
) -> tuple[Linear, ...]:
    bias = bool(config.get("attention_bias", False))
    if config.get("kv_lora_rank"):  # DeepSeek's multi-head latent attention
        nope, rope, v_dim = (int(config[key]) for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        q_rank, kv_rank = int(config.get("q_lora_rank") or 0), int(config["kv_lora_rank"])
        if q_rank:
            query = (Linear("q_a_proj", hidden, q_rank, bias), Linear("q_b_proj", q_rank, heads * (nope + rope)))
        else:
            query = (Linear("q_proj", hidden, heads * (nope + rope)),)
        return (
            *query,
            Linear("kv_a_proj_with_mqa", hidden, kv_rank + rope, bias),
            Linear("kv_b_proj", kv_rank, heads * (nope + v_dim)),
            Linear("o_proj", heads * v_dim, hidden, bias),
        )
    q, kv = heads * head_dim, kv_heads * head_dim
    if model_type == "phi3":  # fused projections
        return (Linear("qkv_proj", hidden, q + 2 * kv), Linear("o_proj", q, hidden))
    qkv_bias = bias or bool(config.get("qkv_bias")) or model_type == "qwen2"
    return (
        Linear("q_proj", hidden, q, qkv_bias),
        Linear("k_proj", hidden, kv, qkv_bias),
        Linear("v_proj", hidden, kv, qkv_bias),
        Linear("o_proj", q, hidden, bias),
    )


def dense_mlp_linears(config: dict[str, Any], model_type: str, hidden: int, intermediate: int) -> tuple[Linear, ...]:
    bias = bool(config.get("mlp_bias", False))
    if model_type == "phi3":
        return (
            Linear("gate_up_proj", hidden, 2 * intermediate, layers="dense"),
            Linear("down_proj", intermediate, hidden, layers="dense"),
        )
    return (
        Linear("gate_proj", hidden, intermediate, bias, layers="dense"),
        Linear("up_proj", hidden, intermediate, bias, layers="dense"),
        Linear("down_proj", intermediate, hidden, bias, layers="dense"),
    )


def experts_of(config: dict[str, Any], num_layers: int) -> Experts | None:
    """The mixture-of-experts part of a config, or None for a dense model."""
    count = next((int(config[key]) for key in EXPERT_COUNT_KEYS if config.get(key)), 0)
    if not count:
        return None
    if not config.get("num_experts_per_tok"):
        raise UnknownShape(f"{config.get('model_type')} has {count} experts but no num_experts_per_tok")
    intermediate = int(config.get("moe_intermediate_size") or config["intermediate_size"])
    shared = int(config.get("shared_expert_intermediate_size") or 0)
    if config.get("n_shared_experts"):
        shared = int(config["n_shared_experts"]) * intermediate
    return Experts(
        layers=sum(is_sparse_layer(config, index) for index in range(num_layers)),
        count=count,
        active=int(config["num_experts_per_tok"]),
        intermediate_size=intermediate,
        shared_intermediate_size=shared,
        shared_gate=bool(config.get("shared_expert_intermediate_size")),  # Qwen2-MoE's shared_expert_gate
    )


def is_sparse_layer(config: dict[str, Any], index: int) -> bool:
    """Whether decoder layer `index` has experts, as the families' modelling code decides it."""
    if index < int(config.get("first_k_dense_replace") or 0):  # DeepSeek, GLM-4-MoE
        return False
    if index in (config.get("mlp_only_layers") or ()):  # Qwen-MoE
        return False
    step = int(config.get("decoder_sparse_step") or config.get("moe_layer_freq") or 1)
    return (index + 1) % step == 0 if config.get("decoder_sparse_step") else index % step == 0


def shared_expert_linears(experts: Experts, hidden: int) -> tuple[Linear, ...]:
    if not experts.shared_intermediate_size:
        return ()
    width = experts.shared_intermediate_size
    shared = (
        Linear("gate_proj", hidden, width, layers="sparse"),
        Linear("up_proj", hidden, width, layers="sparse"),
        Linear("down_proj", width, hidden, layers="sparse"),
    )
    return (*shared, Linear("shared_expert_gate", hidden, 1, layers="sparse")) if experts.shared_gate else shared


def mla_attention(config: dict[str, Any]) -> Attention | None:
    if not config.get("kv_lora_rank"):
        return None
    nope, rope = int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"])
    return Attention(
        q_head_dim=nope + rope,
        v_head_dim=int(config["v_head_dim"]),
        q_latent=int(config.get("q_lora_rank") or 0),
        kv_latent=int(config["kv_lora_rank"]),
        rope_dim=rope,
    )


def fused_qkv_shape(config: dict[str, Any], model_type: str) -> ModelShape:
    """GPT-2 and Bloom: LayerNorm, biases, one query-key-value projection and a plain (ungated) MLP."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    intermediate = int(config.get("n_inner") or 4 * hidden)
    if model_type == "gpt2":  # Conv1D modules, named as GPT-2 names them
        names = ("c_attn", "c_proj", "c_fc", "c_proj")
        extra = int(config.get("n_positions") or 1024) * hidden  # learned position embeddings
    else:
        names = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
        extra = 2 * hidden  # the LayerNorm after the word embeddings
    qkv, out, up, down = names
    return ModelShape(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=intermediate,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        linears=(
            Linear(qkv, hidden, 3 * hidden, True),
            Linear(out, hidden, hidden, True),
            Linear(up, hidden, intermediate, True),
            Linear(down, intermediate, hidden, True),
        ),
        norm_params=2,
        gated_mlp=False,
        stored_dtype=stored_dtype(config),
        extra_params=extra,
    )


def stored_dtype(config: dict[str, Any]) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")
