"""The typed config, one small section per concern.

Field names are LLaMA-Factory's flat keys, so its YAML files run unchanged; each key lives in exactly one section
(a test checks this) and is documented and checked where it is defined. Keys that belong to features still to
come are accepted and type-checked now, and refused with a clear "not supported yet" message when set.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunesmith.config import fsdp_keys
from tunesmith.config.deepspeed_config import resolve_deepspeed_config
from tunesmith.errors import NotSupportedYet


def planned(default: Any, feature: str, **kwargs: Any) -> Any:
    """A field that is validated today but whose feature is not built yet: setting it away from `default` fails."""
    return Field(default, json_schema_extra={"planned": feature}, **kwargs)


def _split_list(value: Any) -> Any:
    """LLaMA-Factory writes lists as comma-separated strings (`dataset: identity,alpaca_en_demo`)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="after")
    def _refuse_planned_features(self) -> Section:
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and "planned" in extra and getattr(self, name) != field.default:
                raise NotSupportedYet(
                    f"`{name}: {getattr(self, name)!r}` is not supported yet ({extra['planned']}). "
                    f"Remove the key or set it back to {field.default!r}."
                )
        return self


class ModelSection(Section):
    model_name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="A local Hugging Face model directory, a .gguf file, a hub id, or the alias smollm2-135m-instruct.",
    )
    adapter_name_or_path: list[str] | None = Field(
        None,
        description="Saved LoRA adapter directories, comma-separated: all but the last are merged into the model; "
        "training goes on with the last (create_new_adapter: merge all and train a new one); chat applies them all.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Only for models you trust."
    )
    cache_dir: str | None = Field(
        None,
        description="One folder for all caches: hub downloads (cache_dir/models--org--name, as transformers' "
        "cache_dir), converted models and tokenized datasets. Default: the Hugging Face cache ($HF_HOME/hub) for hub "
        "models, ~/.cache/tunesmith ($TUNESMITH_CACHE) for the rest.",
    )
    quantization_bit: Literal[4, 8] | None = Field(
        None,
        description="Load the base model's linear layers in 4 bits (QLoRA) or 8 bits with bitsandbytes and train "
        "LoRA on top; needs finetuning_type: lora.",
    )
    quantization_method: Literal["bitsandbytes", "bnb"] = Field(
        "bitsandbytes",
        description="How quantization_bit quantizes: bitsandbytes (bnb), the only method, so no code reads the key; "
        "other values fail its type check. A model saved in GPTQ or AWQ form is recognised from its config.json.",
    )
    quantization_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="quantization_bit: 4: the 4-bit data type, NormalFloat (nf4, QLoRA's) or plain fp4."
    )
    double_quantization: bool = Field(
        True, description="quantization_bit: 4: also quantize the quantization constants (saves ~0.4 bit/weight)."
    )
    flash_attn: Literal["auto", "fa2", "sdpa", "eager", "disabled"] = Field(
        "auto",
        description="Attention kernel: auto (FlashAttention-2 on a GPU in bf16/fp16 when flash-attn is installed, "
        "else PyTorch's sdpa), fa2, sdpa, or eager (disabled = eager, LLaMA-Factory's name).",
    )
    enable_liger_kernel: bool = Field(
        False,
        description="Liger's Triton kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU); needs a CUDA GPU "
        "and pip install liger-kernel.",
    )
    use_unsloth: bool = Field(
        False, description="Load and patch the model with Unsloth; needs an NVIDIA GPU and pip install unsloth."
    )
    rope_scaling: str | None = planned(None, "RoPE scaling is not built yet")
    image_max_pixels: int = Field(
        768 * 768, gt=0, description="Vision-language models: larger images are scaled down to this many pixels."
    )
    image_min_pixels: int = Field(
        32 * 32, gt=0, description="Vision-language models: smaller images are scaled up to this many pixels."
    )
    freeze_vision_tower: bool = Field(
        True, description="Vision-language models: keep the vision tower fixed (no LoRA on it, no full training)."
    )
    freeze_multi_modal_projector: bool = Field(
        True, description="Vision-language models: keep the projector from vision features to text embeddings fixed."
    )
    freeze_language_model: bool = planned(False, "training only the vision parts is not built yet")
    video_max_pixels: int = planned(256 * 256, "videos are not supported yet")
    video_min_pixels: int = planned(16 * 16, "videos are not supported yet")
    video_fps: float = planned(2.0, "videos are not supported yet")
    video_maxlen: int = planned(128, "videos are not supported yet")

    _split_adapters = field_validator("adapter_name_or_path", mode="before")(_split_list)

    @model_validator(mode="after")
    def _quantization_options_agree(self) -> ModelSection:
        four_bit_only = [
            name
            for name in ("quantization_type", "double_quantization")
            if getattr(self, name) != type(self).model_fields[name].default
        ]
        if four_bit_only and self.quantization_bit != 4:
            raise ValueError(
                f"{' and '.join(four_bit_only)} only apply to 4-bit quantization; set quantization_bit: 4 "
                f"or remove {' and '.join(four_bit_only)}"
            )
        return self


class DataSection(Section):
    dataset: list[str] = Field(
        default_factory=list,
        description="Names from dataset_dir/dataset_info.json, or paths to .json/.jsonl/.csv/.parquet/.txt files or "
        "folders of them; comma-separated.",
    )
    eval_dataset: list[str] = Field(
        default_factory=list, description="Datasets for eval loss only (instead of val_size); names or paths."
    )
    dataset_dir: str = Field("data", description="Folder holding dataset_info.json and the dataset files.")
    template: str | None = Field(
        None, description="A named prompt template; default: the tokenizer's own chat template."
    )
    default_system: str | None = Field(
        None,
        description="A system message for every example that has none (LLaMA-Factory's default_system); the chat "
        "template renders it, e.g. llama2's <<SYS>> block.",
    )
    cutoff_len: int = Field(2048, gt=0, description="Longest tokenized example; longer ones are truncated.")
    max_samples: int | None = Field(None, gt=0, description="Use at most this many rows of each dataset.")
    val_size: float = Field(0.0, ge=0, description="Rows held out for eval loss: a fraction (< 1) or a count.")
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: only assistant tokens).")
    overwrite_cache: bool = Field(False, description="Re-tokenize even if a cached copy exists.")
    preprocessing_num_workers: int | None = Field(None, ge=1, description="Processes used to tokenize.")
    name: str | None = Field(None, description="Fills {{name}} placeholders in the data (identity.json).")
    author: str | None = Field(None, description="Fills {{author}} placeholders in the data (identity.json).")
    packing: bool = Field(
        False,
        description="Fill cutoff_len rows with whole examples (fewer rows, less padding); position ids restart and "
        "attention stops at each example's boundary, so no example sees another. Default: on for stage pt (unless "
        "streaming), off otherwise.",
    )
    neat_packing: bool = Field(
        False,
        description="LLaMA-Factory's name for packing without attention across examples: the same as packing: true "
        "(tunesmith's packing never lets examples see each other).",
    )
    mask_history: bool = Field(
        False, description="Train only on the last assistant turn (default: on every assistant turn)."
    )
    streaming: bool = Field(
        False, description="Read and tokenize rows while training, for data larger than memory; needs max_steps."
    )
    buffer_size: int = Field(16384, gt=0, description="streaming: rows held in the shuffle buffer.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over", "interleave_once"] = Field(
        "concat",
        description="Several datasets: concat, or interleave rows until the first runs out (under), until all have "
        "been used up, repeating the smaller ones (over), or with every row used once (once).",
    )
    interleave_probs: list[float] | None = Field(
        None, description="interleave_*: the chance of drawing from each dataset, in `dataset` order (default equal)."
    )
    column_map: dict[str, str] | None = Field(
        None,
        description="Datasets given by path: our column name → the file's, e.g. {instruction: prompt, output: answer}.",
    )
    tokenized_path: str | None = Field(
        None,
        description="Save the tokenized data here, or load it from here if it is there (the other data keys are "
        "then ignored).",
    )

    _split_dataset = field_validator("dataset", "eval_dataset", "interleave_probs", mode="before")(_split_list)

    @field_validator("column_map", mode="before")
    @classmethod
    def _column_map_from_text(cls, value: Any) -> Any:
        """`column_map={instruction: prompt}` on the command line arrives as text."""
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError("write it as a mapping, e.g. {instruction: prompt, output: answer}") from None
        return value

    @model_validator(mode="after")
    def _data_choices_agree(self) -> DataSection:
        if self.interleave_probs is not None:
            if not self.mix_strategy.startswith("interleave"):
                raise ValueError(
                    "interleave_probs needs mix_strategy interleave_under, interleave_over or interleave_once"
                )
            if len(self.interleave_probs) != len(self.dataset):
                raise ValueError(
                    f"interleave_probs has {len(self.interleave_probs)} values for {len(self.dataset)} datasets"
                )
            if min(self.interleave_probs) < 0 or abs(sum(self.interleave_probs) - 1) > 1e-6:
                raise ValueError(f"interleave_probs {self.interleave_probs} must be non-negative and add up to 1")
        if self.eval_dataset and self.val_size:
            raise ValueError("set either val_size (hold out training rows) or eval_dataset, not both")
        if self.streaming and self.tokenized_path:
            raise ValueError("tokenized_path saves a tokenized dataset, which streaming never builds; drop one of them")
        if self.streaming and 0 < self.val_size < 1:
            raise ValueError(f"with streaming, val_size must be a number of rows, not a fraction ({self.val_size})")
        return self

    @field_validator("val_size")
    @classmethod
    def _val_size_is_fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("must be a fraction below 1 (0.1) or a whole number of rows (100)")
        return value

    @property
    def packs(self) -> bool:
        """Whether examples are packed: `neat_packing` is LLaMA-Factory's name for the same packing."""
        return self.packing or self.neat_packing


# The method keys only one finetuning_type reads (train/sft.apply_method → model/adapters.py; LoRA+ in
# train/trainer.py); stage, do_train, chunked_loss and neftune_noise_alpha apply to every type, use_galore to full and
# freeze (checked below), and the galore_* keys to use_galore.
METHOD_ONLY_KEYS: dict[str, tuple[str, ...]] = {
    "lora": (
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target",
        "use_dora",
        "use_rslora",
        "pissa_init",
        "pissa_iter",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
        "additional_target",
        "create_new_adapter",
    ),
    "freeze": ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"),
}
GALORE_KEYS = (
    "galore_target",
    "galore_rank",
    "galore_update_interval",
    "galore_scale",
    "galore_proj_type",
    "galore_layerwise",
)


class MethodSection(Section):
    stage: Literal["sft", "pt", "rm", "ppo", "dpo", "kto", "orpo", "simpo", "grpo"] = Field(
        "sft",
        description="Training stage: sft, pt, rm, dpo (pref_loss picks the loss; orpo and simpo are shorthands for "
        "dpo with that pref_loss), kto, or grpo (online RL from reward_model / reward_funcs). ppo is refused: TRL "
        "1.x has no PPO.",
    )
    do_train: bool = Field(
        True,
        description="Accepted for LLaMA-Factory compatibility: train always trains, so true needs no code; "
        "false (evaluation or prediction only) is refused.",
    )
    finetuning_type: Literal["lora", "full", "freeze"] = Field("lora", description="What is trained.")
    lora_rank: int = Field(8, gt=0, description="LoRA rank r.")
    lora_alpha: int | None = Field(None, gt=0, description="LoRA alpha; default 2 x lora_rank.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target: list[str] = Field(
        default_factory=lambda: ["all"],
        description="Linear layer names to adapt (q_proj,v_proj), or `all` for every linear layer but the output head.",
    )
    freeze_trainable_layers: int = Field(
        2, description="freeze: train the last N layers (N > 0) or the first -N layers (N < 0)."
    )
    freeze_trainable_modules: list[str] = Field(
        default_factory=lambda: ["all"],
        description="freeze: module names inside the trainable layers (mlp,self_attn), or `all`.",
    )
    freeze_extra_modules: list[str] = Field(
        default_factory=list, description="freeze: extra top-level modules to train (embed_tokens,norm)."
    )
    create_new_adapter: bool = Field(
        False,
        description="With adapter_name_or_path: merge every given adapter into the model and train a new LoRA "
        "adapter on top (default: go on training the last one).",
    )
    use_dora: bool = Field(
        False, description="DoRA: LoRA on the direction of each weight plus a trained magnitude vector (peft)."
    )
    use_rslora: bool = Field(
        False, description="rsLoRA: scale the adapter by lora_alpha/sqrt(r) instead of lora_alpha/r (peft)."
    )
    chunked_loss: bool = Field(
        True,
        description="Compute the loss only at supervised positions, a chunk of tokens at a time, so the full "
        "[batch, seq, vocab] logits are never held (same value as the model's own loss); false: the model's loss.",
    )
    pissa_init: bool = Field(
        False,
        description="PiSSA: start LoRA from the weight's principal singular vectors (faster convergence); the saved "
        "adapter is converted so that it applies to the original base model (peft).",
    )
    pissa_iter: int = Field(
        16, ge=-1, description="pissa_init: fast-SVD iterations (-1: exact SVD, slow on large layers)."
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices learn this many times faster than A (16 is typical)."
    )
    loraplus_lr_embedding: float = Field(1e-6, gt=0, description="LoRA+: learning rate of LoRA embedding layers.")
    additional_target: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (peft modules_to_save), e.g. "
        "embed_tokens,lm_head after adding tokens.",
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune: add uniform noise of this scale to the input embeddings while training."
    )
    use_galore: bool = Field(
        False,
        description="GaLore: full fine-tuning with gradients projected to a low rank in the optimizer "
        "(pip install galore-torch); the optimizer is galore_ + optim.",
    )
    galore_target: list[str] = Field(
        default_factory=lambda: ["all"], description="use_galore: linear layer names to project, or all."
    )
    galore_rank: int = Field(16, gt=0, description="use_galore: rank of the gradient projection.")
    galore_update_interval: int = Field(200, gt=0, description="use_galore: steps between projection updates.")
    galore_scale: float = Field(2.0, gt=0, description="use_galore: scale of the projected update.")
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = Field(
        "std", description="use_galore: which side of the gradient is projected."
    )
    galore_layerwise: bool = Field(
        False, description="use_galore: update layer by layer during backward (less memory; no accumulation)."
    )

    _split_lists = field_validator(
        "lora_target",
        "freeze_trainable_modules",
        "freeze_extra_modules",
        "additional_target",
        "galore_target",
        mode="before",
    )(_split_list)

    @model_validator(mode="after")
    def _set_keys_are_read(self) -> MethodSection:
        """A key set for another finetuning_type, or for a switch left off, is refused: nothing would read it."""
        given = self.model_fields_set
        for finetuning_type, keys in METHOD_ONLY_KEYS.items():
            unread = [key for key in keys if key in given]
            if unread and self.finetuning_type != finetuning_type:
                raise ValueError(
                    f"{', '.join(unread)} {'needs' if len(unread) == 1 else 'need'} finetuning_type: "
                    f"{finetuning_type} (got {self.finetuning_type}); remove {'it' if len(unread) == 1 else 'them'}, "
                    f"or set finetuning_type: {finetuning_type}"
                )
        switches = {
            "pissa_iter": ("pissa_init: true", self.pissa_init),
            "loraplus_lr_embedding": ("loraplus_lr_ratio", self.loraplus_lr_ratio is not None),
            **{key: ("use_galore: true", self.use_galore) for key in GALORE_KEYS},
        }
        for key, (switch, on) in switches.items():
            if key in given and not on:
                raise ValueError(f"{key} is read only with {switch}; remove {key}, or set {switch}")
        return self

    @model_validator(mode="after")
    def _method_options_agree(self) -> MethodSection:
        if self.use_galore and self.finetuning_type == "lora":
            raise ValueError(
                "use_galore projects the gradients of full weights; use finetuning_type: full or freeze, not lora"
            )
        if self.pissa_init and self.use_dora:
            raise ValueError("pissa_init and use_dora are two different LoRA initialisations; choose one")
        return self

    @field_validator("use_galore")
    @classmethod
    def _galore_installed(cls, value: bool) -> bool:
        if value and importlib.util.find_spec("galore_torch") is None:
            raise ValueError("GaLore needs its library: pip install galore-torch")
        return value

    @field_validator("stage")
    @classmethod
    def _no_ppo(cls, value: str) -> str:
        if value == "ppo":
            raise ValueError(
                "TRL 1.x removed PPO and its value-head model; use stage: grpo with reward_model (a stage: rm output) "
                "or reward_funcs"
            )
        return value

    @field_validator("do_train")
    @classmethod
    def _training_only(cls, value: bool) -> bool:
        if not value:
            raise NotSupportedYet("`do_train: false` (evaluation or prediction only) is not supported yet")
        return value


# TRL 1.16's DPO losses by their TRL names ("sft" is pref_ftx), and the two reference-free losses LLaMA-Factory names
# pref_loss, which run TRL's ORPO and CPO trainers.
DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
PreferenceLoss = Literal[DPO_LOSSES + REFERENCE_FREE_LOSSES]  # type: ignore[valid-type]


class PreferenceSection(Section):
    """The keys of the stages trained through TRL: dpo (and its loss family), kto and grpo."""

    pref_beta: float = Field(
        0.1, gt=0, description="dpo/kto/simpo: beta, how far the policy may move from the reference; orpo: lambda."
    )
    pref_ftx: float = Field(
        0.0,
        ge=0,
        description="dpo: weight of an SFT term (mean NLL of the chosen answer, TRL's `sft` loss) added to the "
        "preference loss; simpo: the CPO behaviour-cloning weight (cpo_alpha; 0 is pure SimPO).",
    )
    pref_loss: PreferenceLoss = Field(
        "sigmoid",
        description="dpo loss: sigmoid (DPO), hinge, ipo, or another of TRL's DPO losses by its TRL name (robust, "
        "exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm); "
        "orpo and simpo need no reference model (TRL's ORPO and CPO trainers).",
    )
    dpo_label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo with pref_loss robust or exo_pair: the label-noise rate (TRL's label_smoothing). TRL 1.x has "
        "no cDPO (smoothed sigmoid), so with pref_loss: sigmoid it is refused.",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="pref_loss: simpo: the target reward margin gamma.")
    ld_alpha: float | None = Field(
        None,
        gt=0,
        le=1,
        description="dpo: LD-DPO, weight of the answer tokens beyond the shorter answer's length (1: plain DPO).",
    )
    ref_model: str | None = Field(
        None,
        description="dpo/kto: the reference model (a directory, .gguf, hub id or alias). Default: LoRA: the model "
        "the new adapter starts from (adapter switched off, or a frozen copy of the adapter it continues); "
        "full/freeze: a second copy of the model.",
    )
    ref_model_adapters: list[str] | None = Field(
        None, description="ref_model: LoRA adapters merged into the reference model, comma-separated."
    )
    ref_model_quantization_bit: Literal[4, 8] | None = Field(
        None, description="ref_model: load the reference in 4 or 8 bits (bitsandbytes)."
    )
    precompute_ref_log_probs: Literal["auto"] | bool = Field(
        False,
        description="dpo/kto: compute the reference log-probs of every row once before training and free the "
        "reference model; auto: only when a second copy would not fit by the memory estimate (full/freeze).",
    )
    pairs_per_forward: Literal["auto"] | int = Field(
        "auto",
        description="dpo/orpo/simpo: pairs in one forward/backward pass; the rest of per_device_train_batch_size "
        "runs as more passes before the optimizer step, with the same gradient (the loss is a mean over pairs). "
        "Fewer pairs per pass: less activation memory and less padding. auto: 1 on a CPU (no speed lost), the "
        "whole per-device batch on a GPU.",
    )
    kto_chosen_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable (true) rows' loss.")
    kto_rejected_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable (false) rows' loss.")
    reward_model: str | None = Field(
        None,
        description="grpo: a reward model trained with stage: rm (a full model directory, or a LoRA adapter "
        "directory whose adapter_config.json names its base).",
    )
    reward_funcs: list[str] = Field(
        default_factory=list,
        description="grpo: reward functions as file.py:function, comma-separated; each is called as "
        "fn(prompts=..., completions=..., **columns) and returns one float per completion.",
    )
    num_generations: int = Field(8, ge=2, description="grpo: completions sampled per prompt (the group size).")

    _split_lists = field_validator("ref_model_adapters", "reward_funcs", mode="before")(_split_list)

    @field_validator("pref_loss", mode="before")
    @classmethod
    def _no_kto_pair(cls, value: Any) -> Any:
        if value == "kto_pair":
            raise ValueError("kto_pair was removed from TRL; use stage: kto (paired rows are unpaired for it)")
        return value

    @field_validator("pairs_per_forward")
    @classmethod
    def _positive_pairs(cls, value: Any) -> Any:
        if value != "auto" and value < 1:
            raise ValueError("expected auto or a number of pairs of 1 or more")
        return value

    def pairs_in_one_forward(self, per_device_batch: int, device: str) -> int:
        """pairs_per_forward resolved: auto is 1 on a CPU, where a bigger batch gains no speed (bench.stages), and
        the whole batch on a GPU, whose throughput grows with the batch."""
        if self.pairs_per_forward == "auto":
            return 1 if device == "cpu" else per_device_batch
        return self.pairs_per_forward

    @field_validator("precompute_ref_log_probs", mode="before")
    @classmethod
    def _precompute_choice(cls, value: Any) -> Any:
        choices = {"auto": "auto", "true": True, "false": False}
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in choices:
            return choices[value.lower()]
        raise ValueError("expected true, false or auto")

    @field_validator("reward_funcs")
    @classmethod
    def _reward_function_spelling(cls, value: list[str]) -> list[str]:
        for spec in value:
            path, _, name = spec.rpartition(":")
            if not path.endswith(".py") or not name.isidentifier():
                raise ValueError(f"{spec!r}: write each reward function as path/to/file.py:function_name")
        return value

    @model_validator(mode="after")
    def _losses_agree(self) -> PreferenceSection:
        if self.dpo_label_smoothing and self.pref_loss not in ("robust", "exo_pair"):
            raise ValueError(
                f"dpo_label_smoothing: {self.dpo_label_smoothing} with pref_loss: {self.pref_loss}: TRL 1.x has no "
                "cDPO (label-smoothed sigmoid); use pref_loss: robust (TRL's noise-robust DPO, a different formula) "
                "or exo_pair, or remove dpo_label_smoothing"
            )
        if self.ref_model is None and (self.ref_model_adapters or self.ref_model_quantization_bit):
            raise ValueError("ref_model_adapters and ref_model_quantization_bit describe ref_model, which is not set")
        return self


LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]


# report_to values → the package each needs
LOGGER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "swanlab": "swanlab",
    "comet_ml": "comet_ml",
    "trackio": "trackio",
}


class TrainSection(Section):
    per_device_train_batch_size: int = Field(1, gt=0, description="Rows per device per forward pass.")
    per_device_eval_batch_size: int = Field(1, gt=0, description="Rows per device per eval forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(
        -1, description="Stop after this many optimizer steps (overrides num_train_epochs); -1: off."
    )
    lr_scheduler_type: LrScheduler = Field("linear", description="Learning-rate schedule.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Warm-up as a fraction of all steps (wins over warmup_steps)."
    )
    optim: Literal[
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_8bit",
        "adamw_bnb_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
        "sgd",
        "adafactor",
    ] = Field(
        "adamw_torch",
        description="Optimizer: adamw_torch, adamw_torch_fused, adamw_8bit (bitsandbytes; optimizer state in 8 "
        "bits, 1/4 of the memory), paged_adamw_8bit / paged_adamw_32bit (state pages out to CPU RAM on a GPU), "
        "sgd, adafactor.",
    )
    seed: int = Field(42, description="Seed for shuffling, initialisation and dropout.")
    bf16: bool | None = Field(
        None,
        description="bfloat16 mixed precision: float32 master weights, bf16 autocast. Default: on where it pays (a GPU "
        "with bfloat16, a CPU with avx512_bf16 or AMX); false: float32 (model/precision.py).",
    )
    fp16: bool = Field(False, description="Train in float16 mixed precision (GPU).")
    pure_bf16: bool = Field(
        False,
        description="Weights, gradients and optimizer state all in bfloat16 (LLaMA-Factory's key): half the memory "
        "of mixed precision, less exact updates.",
    )
    logging_steps: int = Field(10, gt=0, description="Log loss, learning rate and tokens/s every N steps.")
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(
        None, description="When to compute eval loss; default: every eval_steps when val_size is set."
    )
    do_eval: bool = Field(
        False,
        description="Evaluate once more after the last step (eval loss, and BLEU/ROUGE with predict_with_generate); "
        "needs val_size or eval_dataset.",
    )
    eval_steps: int | None = Field(None, gt=0, description="Eval every N steps (default: save_steps).")

    @field_validator("eval_strategy", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare `no` as false: `eval_strategy: no` means the strategy "no"."""
        return "no" if value is False else value

    save_steps: int = Field(500, gt=0, description="Write a checkpoint every N steps.")
    save_total_limit: int | None = Field(None, gt=0, description="Keep at most N checkpoints (oldest deleted).")
    save_only_model: bool = Field(False, description="Checkpoints without optimizer state (cannot be resumed exactly).")
    resume_from_checkpoint: str | bool | None = Field(
        None, description="A checkpoint directory, or true for the latest one in output_dir."
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["none"],
        description="Experiment trackers, comma-separated: none, all (every installed one), tensorboard, wandb, "
        "mlflow, swanlab, comet_ml, trackio. Each reads its own settings from the environment (WANDB_MODE=offline, "
        "WANDB_DIR, MLFLOW_TRACKING_URI=sqlite:///mlflow.db, ...); metrics.jsonl and training_loss.png are written "
        "either way.",
    )
    logging_dir: str | None = Field(
        None,
        description="With report_to: tensorboard, the folder for TensorBoard's event files (default: "
        "output_dir/runs/<date>_<host>; point `tensorboard --logdir` at it).",
    )
    run_name: str | None = Field(
        None, description="The run's name in wandb, mlflow and the other trackers (default: output_dir)."
    )
    dataloader_num_workers: int = Field(
        0,
        ge=0,
        description="Background processes feeding batches. 0: the training process collates them itself (0.4 ms "
        "a batch against seconds a CPU step; train/threads.py), which leaves every core to the model.",
    )
    group_by_length: bool | None = Field(
        None,
        description="Batch rows of similar length together (mega-batches sorted by length, then shuffled; "
        "data/length_groups.py): the same rows every epoch, less padding. Default: on unless packing or streaming.",
    )
    ddp_timeout: int = Field(1800, gt=0, description="Seconds a collective may wait before the job fails.")
    deepspeed: str | None = Field(
        None,
        description="DeepSpeed JSON config: a path, or a shipped one: ds_z0, ds_z1, ds_z2, ds_z2_offload, ds_z3, "
        "ds_z3_offload (tunesmith/config/deepspeed). Use with nproc_per_node.",
    )
    fsdp: Literal["full_shard", "shard_grad_op", "no_shard"] | None = Field(
        None,
        description="Shard the model over the processes with FSDP2 (tunesmith/distributed/fsdp.py): full_shard "
        "(parameters, gradients, optimizer state; like ZeRO-3), shard_grad_op (gradients and optimizer state; "
        "ZeRO-2) or no_shard (that is DDP). Transformers' spellings work: `full_shard auto_wrap`, `full_shard "
        "offload`, true. Always runs under torchrun (gloo on CPU); use with nproc_per_node.",
    )
    fsdp_offload: bool = Field(
        False, description="fsdp: keep parameters, gradients and optimizer state in CPU memory (`fsdp: ... offload`)."
    )
    fsdp_config: dict[str, Any] | None = Field(
        None,
        description="fsdp: settings as a mapping or a JSON/YAML path, transformers' keys with or without `fsdp_`: "
        "transformer_layer_cls_to_wrap, auto_wrap_policy, min_num_params, state_dict_type (checkpoints), "
        "cpu_ram_efficient_loading, activation_checkpointing, version (2).",
    )
    nproc_per_node: int | None = Field(
        None,
        gt=0,
        description="Processes on this node; more than 1 re-launches under torchrun (gloo on CPU). "
        "Default: NPROC_PER_NODE, else one per visible GPU.",
    )
    nnodes: int | None = Field(None, gt=0, description="Machines in the job (default: NNODES, else 1).")
    node_rank: int | None = Field(None, ge=0, description="This machine's index, 0 to nnodes-1 (default: NODE_RANK).")
    master_addr: str | None = Field(
        None, description="Address of node 0, the same on every node (default: MASTER_ADDR, else 127.0.0.1)."
    )
    master_port: int | None = Field(
        None,
        gt=0,
        lt=65536,
        description="Port on node 0 (default: MASTER_PORT, else a free port; 29500 with several nodes).",
    )
    gradient_checkpointing: Literal["auto", "offload"] | bool = Field(
        "auto",
        description="Recompute activations in the backward pass instead of keeping them (less memory, ~1/3 more "
        "compute): true, false, offload (also keep the checkpoints in CPU RAM), or auto: on only when the memory "
        "estimate says the run would not fit without it.",
    )
    torch_empty_cache_steps: int | None = Field(
        None, gt=0, description="Return cached GPU memory to the driver every N steps (slower; less fragmentation)."
    )
    torch_compile: bool = Field(False, description="Compile the model with torch.compile (slow first steps).")

    _split_report_to = field_validator("report_to", mode="before")(_split_list)

    @field_validator("report_to")
    @classmethod
    def _loggers_installed(cls, value: list[str]) -> list[str]:
        if len(value) > 1 and {"none", "all"} & set(value):
            raise ValueError("none and all stand alone; list the loggers wanted, or just none or all")
        for logger in value:
            if logger in ("none", "all"):
                continue
            if logger not in LOGGER_PACKAGES:
                raise ValueError(f"unknown logger {logger!r}; use none or one of {', '.join(LOGGER_PACKAGES)}")
            if importlib.util.find_spec(LOGGER_PACKAGES[logger]) is None:
                raise ValueError(f"{logger} is not installed; pip install {LOGGER_PACKAGES[logger]}, or use none")
        return value

    @model_validator(mode="after")
    def _logging_dir_has_a_reader(self) -> TrainSection:
        if self.logging_dir is not None and not {"tensorboard", "all"} & set(self.report_to):
            raise ValueError(
                f"`logging_dir: {self.logging_dir}` is where TensorBoard's event files go, but report_to is "
                f"{','.join(self.report_to)}; add tensorboard to report_to, or remove logging_dir"
            )
        return self

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_choice(cls, value: Any) -> Any:
        choices = {"auto": "auto", "offload": "offload", "true": True, "false": False}
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in choices:
            return choices[value.lower()]
        raise ValueError("expected auto, true, false or offload")

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_config(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return resolve_deepspeed_config(value)

    @model_validator(mode="after")
    def _one_precision(self) -> TrainSection:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose one")
        if self.pure_bf16 and (self.fp16 or self.bf16 is False):
            raise ValueError(
                f"pure_bf16: true trains in bfloat16, but {'fp16: true' if self.fp16 else 'bf16: false'} is set; "
                "drop one of them"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _fsdp_spellings(cls, values: Any) -> Any:
        """`fsdp: "full_shard auto_wrap"` / `full_shard offload` / true, and fsdp_config's strategy keys → the
        typed `fsdp`, `fsdp_offload` and a checked `fsdp_config`."""
        if not isinstance(values, dict) or ("fsdp" not in values and "fsdp_config" not in values):
            return values
        values = dict(values)
        on, strategy, offload = fsdp_keys.parse_fsdp(values.get("fsdp"))
        config = fsdp_keys.read_fsdp_config(values["fsdp_config"]) if values.get("fsdp_config") is not None else None
        if not on:
            if config:
                raise ValueError("`fsdp_config` is set but `fsdp` is not; set fsdp: full_shard (or shard_grad_op)")
            return {**values, "fsdp": None}
        strategy, offload, config = fsdp_keys.fold_strategy_keys(strategy, offload, config or {})
        values.update(
            fsdp=strategy,
            fsdp_offload=bool(values.get("fsdp_offload")) or offload,
            fsdp_config=fsdp_keys.check_fsdp_config(config) or None,
        )
        return values

    @model_validator(mode="after")
    def _fsdp_alone(self) -> TrainSection:
        if self.fsdp and self.deepspeed:
            raise ValueError(
                f"`fsdp: {self.fsdp}` and `deepspeed` both shard the model; choose one (remove fsdp or deepspeed)"
            )
        if self.fsdp_offload and not self.fsdp:
            raise ValueError("`fsdp_offload` needs fsdp: full_shard or shard_grad_op")
        if (self.fsdp_config or {}).get("activation_checkpointing") and self.gradient_checkpointing not in (
            "auto",
            False,
        ):
            raise ValueError(
                "`fsdp_config.activation_checkpointing` and `gradient_checkpointing` both checkpoint activations; "
                "keep one (FSDP's own saves an all-gather per layer)"
            )
        return self


class OutputSection(Section):
    output_dir: str = Field("outputs/run", description="Where checkpoints, the adapter or model, and logs go.")
    overwrite_output_dir: bool = Field(
        False, description="Delete checkpoints already in output_dir and start over (default: refuse)."
    )
    plot_loss: bool = Field(True, description="Draw training_loss.png at the end.")
    do_predict: bool = Field(
        False,
        description="After training, generate a reply for every row of eval_dataset with the trained model and score "
        "them into output_dir (what `tunesmith predict` does); needs predict_with_generate: true.",
    )
    predict_with_generate: bool = Field(
        False,
        description="Generate replies: with do_predict (required there), and at each evaluation, which then reports "
        "BLEU-4 / ROUGE of the eval split's replies (eval_bleu-4, eval_rouge-*) next to the eval loss.",
    )

    @model_validator(mode="after")
    def _predict_generates(self) -> OutputSection:
        if self.do_predict and not self.predict_with_generate:
            raise ValueError("`do_predict: true` needs `predict_with_generate: true` to save model predictions")
        return self


class GenerationSection(Section):
    """How a reply is generated; checked when the config is built, so a bad value fails before a model loads."""

    max_new_tokens: int = Field(512, ge=1, description="Longest reply, in tokens.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 means greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling: keep the likeliest tokens up to this mass.")
    top_k: int = Field(50, ge=0, description="Keep the k likeliest tokens; 0 turns top-k filtering off.")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty for repeating tokens; 1 means none.")
    do_sample: bool = Field(True, description="Sample (true) or always take the likeliest token (false).")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the printed reply.")
    num_beams: int = planned(1, "beam search; a streamed reply is one sampled or greedy sequence")
    length_penalty: float = planned(1.0, "only beam search uses it")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`; sampling settings only when sampling, so none is silently unused."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "do_sample": not self.greedy,
        }
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


TRL_STAGES = ("dpo", "orpo", "simpo", "kto", "grpo")


class RunConfig(BaseModel):
    """Everything `tunesmith train` needs, validated before any weight is loaded."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    method: MethodSection = Field(default_factory=MethodSection)
    train: TrainSection = Field(default_factory=TrainSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    output: OutputSection = Field(default_factory=OutputSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if not self.data.dataset:
            raise ValueError("`dataset` is empty: name a dataset from dataset_info.json or a .json/.jsonl file")
        self._stage_keys()
        if self.model.quantization_bit is not None and self.method.finetuning_type != "lora":
            raise ValueError(
                f"`quantization_bit: {self.model.quantization_bit}` trains a LoRA adapter on frozen quantized weights; "
                f"set finetuning_type: lora, or remove quantization_bit for {self.method.finetuning_type} training"
            )
        if self.train.fsdp and self.model.quantization_bit == 8:
            raise ValueError(
                "`fsdp` cannot shard bitsandbytes 8-bit weights; use quantization_bit: 4 (QLoRA, which FSDP shards) "
                "or deepspeed instead of fsdp"
            )
        if self.train.fsdp in ("full_shard", "shard_grad_op") and self.method.pissa_init:
            raise ValueError(
                f"pissa_init converts the adapter at save time in one process, which needs whole weights: not with "
                f"`fsdp: {self.train.fsdp}`; remove fsdp (DDP) or pissa_init"
            )
        if self.data.streaming and self.train.max_steps <= 0:
            raise ValueError("`streaming: true` needs `max_steps`: a streamed dataset has no length to count epochs by")
        if self.method.pissa_init and self.model.quantization_bit is not None:
            raise ValueError(
                "pissa_init moves the principal part of each weight into the adapter, which needs the weights "
                "unquantized; remove quantization_bit or pissa_init"
            )
        self._evaluation_has_rows()
        if self.train.deepspeed:
            self._optimizer_settings_reach_deepspeed()
        self._adapters_fit_the_run()
        self._stage_keys_apply()
        if self.method.stage in TRL_STAGES:
            self._trl_stage_honours_every_key()
        if self.model.use_unsloth:
            self._unsloth_honours_every_key()
        return self

    def generation_keys_read_by_stage(self) -> set[str]:
        """grpo samples completions while training: max_new_tokens is their length."""
        return {"max_new_tokens"} if self.method.stage == "grpo" else set()

    def _evaluation_has_rows(self) -> None:
        """do_eval and generated eval replies need an eval split; the generation keys need predict_with_generate."""
        has_eval_rows = bool(self.data.val_size or self.data.eval_dataset)
        if self.train.do_eval and not has_eval_rows:
            raise ValueError("`do_eval: true` evaluates on held-out rows: set val_size or eval_dataset")
        if self.output.predict_with_generate and not (has_eval_rows or self.output.do_predict):
            raise ValueError(
                "`predict_with_generate: true` generates for the eval split or for do_predict: set val_size or "
                "eval_dataset"
            )
        generation_keys = sorted(self.generation.model_fields_set - self.generation_keys_read_by_stage())
        if generation_keys and not self.output.predict_with_generate:
            raise ValueError(
                f"{', '.join(generation_keys)} only shape generated replies: set predict_with_generate: true (with "
                "do_predict or an eval split), or remove them"
            )

    def _stage_keys(self) -> None:
        """Keys that mean something for some stages only; pt packs by default (LLaMA-Factory's rule)."""
        stage, data = self.method.stage, self.data
        if stage == "rm" and self.model.use_unsloth:
            raise ValueError("`use_unsloth` loads a causal LM; stage rm trains a reward model: remove use_unsloth")
        if stage == "rm" and self.output.do_predict:
            raise ValueError("`do_predict` generates replies; a reward model scores them (tunesmith score)")
        if stage in ("pt", "rm"):
            for key in ("train_on_prompt", "mask_history"):
                if getattr(data, key):
                    raise ValueError(
                        f"`{key}: true` chooses which conversation turns sft trains on; stage {stage} "
                        f"{'trains every token of plain text' if stage == 'pt' else 'scores whole conversations'}, "
                        f"remove the key"
                    )
        if stage == "rm" and data.packs:
            raise ValueError(
                "`packing` with stage rm: a reward model scores each conversation by its last token, one per row; "
                "remove packing"
            )
        if stage == "pt" and "packing" not in data.model_fields_set and not data.neat_packing and not data.streaming:
            data.packing = True  # recorded in the resolved config, so the run, the estimate and the log agree

    def preference_loss(self) -> str:
        """The loss of a pairwise stage: `stage: orpo|simpo` are shorthands for dpo with that pref_loss."""
        return self.method.stage if self.method.stage in REFERENCE_FREE_LOSSES else self.preference.pref_loss

    def uses_reference(self) -> bool:
        """dpo with a loss against a reference model, and kto."""
        stage = self.method.stage
        return stage == "kto" or (stage == "dpo" and self.preference_loss() not in REFERENCE_FREE_LOSSES)

    def _stage_keys_apply(self) -> None:
        """A preference key set for a stage (or loss) that does not read it is refused, never silently ignored."""
        stage, loss = self.method.stage, self.preference_loss()
        dpo_family = stage in ("dpo", "orpo", "simpo")
        reads = {
            "pref_beta": dpo_family or stage == "kto",
            "pref_ftx": dpo_family and loss != "orpo",
            "pref_loss": stage == "dpo",
            "dpo_label_smoothing": dpo_family and loss not in REFERENCE_FREE_LOSSES,
            "simpo_gamma": loss == "simpo" and dpo_family,
            "ld_alpha": dpo_family and loss not in REFERENCE_FREE_LOSSES,
            "ref_model": self.uses_reference(),
            "ref_model_adapters": self.uses_reference(),
            "ref_model_quantization_bit": self.uses_reference(),
            "precompute_ref_log_probs": self.uses_reference(),
            "pairs_per_forward": dpo_family,
            "kto_chosen_weight": stage == "kto",
            "kto_rejected_weight": stage == "kto",
            "reward_model": stage == "grpo",
            "reward_funcs": stage == "grpo",
            "num_generations": stage == "grpo",
        }
        for key in sorted(self.preference.model_fields_set):
            if not reads[key]:
                about = f"stage: {stage}" + (f" with pref_loss: {loss}" if dpo_family else "")
                raise ValueError(f"`{key}` is not used by {about}; remove it")
        if stage in ("orpo", "simpo") and "pref_loss" in self.preference.model_fields_set:
            raise ValueError(f"stage: {stage} is dpo with pref_loss: {stage}; remove pref_loss")

    def _trl_stage_honours_every_key(self) -> None:
        """Stages trained through TRL's trainers: refuse the SFT-only keys they would not honour, and TRL's limits."""
        stage, method, train, data = self.method.stage, self.method, self.train, self.data
        if not data.dataset:
            raise ValueError(f"`dataset` is empty: stage {stage} needs a dataset")
        refused = {
            "packing": (data.packs, "packs SFT rows; preference and RL rows are not packed"),
            "streaming": (data.streaming, "is not supported yet for this stage; use a dataset that fits in memory"),
            "train_on_prompt": (data.train_on_prompt, "does not apply: only answers enter these losses"),
            "mask_history": (data.mask_history, "does not apply: only the last answer enters these losses"),
            "group_by_length": (train.group_by_length is True, "orders SFT rows; TRL's trainers read rows shuffled"),
            "loraplus_lr_ratio": (method.loraplus_lr_ratio is not None, "is built into the SFT trainer only"),
            "neftune_noise_alpha": (method.neftune_noise_alpha is not None, "is an SFT technique"),
            "chunked_loss": (not method.chunked_loss, "is the SFT loss; TRL computes these log-probs in chunks itself"),
            "gradient_checkpointing": (train.gradient_checkpointing == "offload", "offload is built for SFT only"),
            "use_unsloth": (self.model.use_unsloth, "patches the model for SFT; not with TRL's trainers here"),
            "enable_liger_kernel": (self.model.enable_liger_kernel, "is deprecated in TRL's preference trainers"),
            "torch_compile": (train.torch_compile, "is not tested with TRL's trainers; remove it"),
            "use_galore": (method.use_galore, "is not tested with TRL's trainers; remove it"),
            "do_predict": (self.output.do_predict, "generates after SFT; run tunesmith predict on the output"),
        }
        for key, (is_set, reason) in refused.items():
            if is_set:
                raise ValueError(f"`{key}` with stage: {stage}: {reason}")
        if stage == "kto" and train.per_device_train_batch_size < 2:
            raise ValueError(
                "stage: kto needs per_device_train_batch_size of 2 or more: KTO estimates its KL term from the other "
                "rows of the same batch, and with one row it equals the reward (TRL refuses it); use "
                "per_device_train_batch_size: 2 and halve gradient_accumulation_steps"
            )
        pairs = self.preference.pairs_per_forward
        if pairs != "auto" and train.per_device_train_batch_size % pairs:
            raise ValueError(
                f"`pairs_per_forward: {pairs}` must divide per_device_train_batch_size "
                f"({train.per_device_train_batch_size}): each batch runs as equal passes; use a divisor, or auto"
            )
        if stage == "grpo":
            if not self.preference.reward_model and not self.preference.reward_funcs:
                raise ValueError("stage: grpo needs a reward: reward_model (a stage: rm output) and/or reward_funcs")
            rows = train.per_device_train_batch_size * train.gradient_accumulation_steps * (train.nproc_per_node or 1)
            generations = self.preference.num_generations
            if rows % generations:
                raise ValueError(
                    f"stage: grpo samples num_generations ({generations}) completions per prompt, so the rows per "
                    f"step (per_device_train_batch_size x gradient_accumulation_steps x processes = {rows}) must be "
                    f"a multiple of it"
                )
        if self.method.pissa_init and self.uses_reference():
            raise ValueError("pissa_init changes the base weights, which the reference model shares; remove it")

    def _unsloth_honours_every_key(self) -> None:
        """Unsloth loads and wraps the model itself: refuse each key its loader or LoRA wrapper cannot honour.

        Honoured through it: quantization_bit, trust_remote_code, lora_rank/alpha/dropout/target, use_rslora,
        use_dora, additional_target (modules_to_save) and gradient_checkpointing (offload: Unsloth's own).
        """
        model, method = self.model, self.method
        refused = {
            "finetuning_type": (
                method.finetuning_type != "lora",
                f"tunesmith trains LoRA through Unsloth, not {method.finetuning_type}; use finetuning_type: lora",
            ),
            "pissa_init": (
                method.pissa_init,
                "Unsloth's LoRA starts from its own initialisations (true, gaussian, loftq, corda), not PiSSA",
            ),
            "quantization_type": (
                model.quantization_type != "nf4",
                "Unsloth's 4-bit loader always quantizes to nf4 with double quantization",
            ),
            "double_quantization": (
                not model.double_quantization,
                "Unsloth's 4-bit loader always quantizes to nf4 with double quantization",
            ),
            "flash_attn": (
                model.flash_attn != "auto",
                "Unsloth picks its own attention kernel (FlashAttention-2 or xformers when installed, else sdpa)",
            ),
            "enable_liger_kernel": (
                model.enable_liger_kernel,
                "Unsloth and Liger replace the same kernels (RMSNorm, RoPE, MLP, loss); keep one",
            ),
            "adapter_name_or_path": (
                bool(model.adapter_name_or_path),
                "training an existing adapter further goes through peft, not Unsloth's loader",
            ),
        }
        for key, (is_set, reason) in refused.items():
            if is_set:
                raise ValueError(f"`{key}` with `use_unsloth: true`: {reason}; remove {key} or use_unsloth")

    def _adapters_fit_the_run(self) -> None:
        """adapter_name_or_path / create_new_adapter: the combinations LLaMA-Factory also refuses, with the reason."""
        adapters, method = self.model.adapter_name_or_path, self.method
        if not adapters:
            if "create_new_adapter" in method.model_fields_set:
                raise ValueError(
                    f"`create_new_adapter: {str(method.create_new_adapter).lower()}` says what happens to the adapters "
                    "of adapter_name_or_path: none is set; remove create_new_adapter"
                )
            return
        output_dir = Path(self.output.output_dir).expanduser().resolve()
        if any(Path(adapter).expanduser().resolve() == output_dir for adapter in adapters):
            raise ValueError(
                f"`adapter_name_or_path` includes output_dir {self.output.output_dir}: the run would write over the "
                "adapter it starts from; give another output_dir"
            )
        if method.finetuning_type != "lora":
            raise ValueError(
                f"`adapter_name_or_path` is a LoRA adapter, which finetuning_type: {method.finetuning_type} does not "
                "train; use finetuning_type: lora, or merge the adapter into a model and train that"
            )
        if self.model.quantization_bit is not None and (len(adapters) > 1 or method.create_new_adapter):
            raise ValueError(
                f"`quantization_bit: {self.model.quantization_bit}` takes one adapter to train further: merging "
                f"{'adapters' if len(adapters) > 1 else 'an adapter'} into quantized weights would round its change "
                "to the quantization grid; give one adapter without create_new_adapter, or merge them into the "
                "unquantized model first"
            )
        if method.pissa_init and not method.create_new_adapter:
            raise ValueError(
                "`pissa_init` initialises a new adapter, and adapter_name_or_path trains an existing one further; "
                "set create_new_adapter: true (merge it, then a new PiSSA adapter) or remove pissa_init"
            )

    def _optimizer_settings_reach_deepspeed(self) -> None:
        deepspeed = json.loads(Path(self.train.deepspeed).read_text())
        ours = [
            f"{name}: {value}"
            for name, value, default in (
                ("optim", self.train.optim, "adamw_torch"),
                ("loraplus_lr_ratio", self.method.loraplus_lr_ratio, None),
                ("use_galore", self.method.use_galore, False),
            )
            if value != default
        ]
        if ours and "optimizer" in deepspeed:
            raise ValueError(
                f"{self.train.deepspeed} names its own optimizer, which DeepSpeed would use instead of "
                f'{", ".join(ours)}; remove its "optimizer" block (not possible with CPU offload) or those keys'
            )
        if self.method.pissa_init and deepspeed.get("zero_optimization", {}).get("stage") == 3:
            raise ValueError(
                "pissa_init converts the adapter at save time, which needs whole weights: not under ZeRO-3; "
                "use ZeRO-2 or remove pissa_init"
            )


SECTIONS: dict[str, type[Section]] = {name: field.annotation for name, field in RunConfig.model_fields.items()}
