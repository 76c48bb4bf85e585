"""The memory estimate's formula against the real thing: parameter counts of models built from configs, LoRA
parameter counts from peft, saved activations counted by autograd hooks, and the command's output."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from functools import partial

import pytest
import torch
import transformers

from tests.conftest import at_once
from tunesmith.config import load_config
from tunesmith.estimate.memory import (
    CPU_RUNTIME_BYTES,
    EstimateUnsupported,
    ModelShape,
    Settings,
    UnknownShape,
    available_memory,
    estimate,
    estimate_peak_memory,
    layer_activation_bytes,
    lora_targets,
    quantized_linear_bytes,
)

TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


# Mixture-of-experts configs: experts, active experts, shared experts and dense layers all set differently, so that
# a formula mixing them up gets a different count.
MOE = {
    "MixtralConfig": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "Qwen2MoeConfig": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 96,
        "mlp_only_layers": [0],
    },
    "Qwen3MoeConfig": {
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 48,
        "decoder_sparse_step": 2,
    },
    "OlmoeConfig": {"num_experts": 4, "num_experts_per_tok": 1},
    "DeepseekV3Config": {
        "n_routed_experts": 4,
        "n_shared_experts": 2,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "q_lora_rank": 16,
        "kv_lora_rank": 24,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
        "n_group": 1,
        "topk_group": 1,
        "num_key_value_heads": 4,
    },
    "DeepseekV2Config": {
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 24,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
        "num_key_value_heads": 4,
    },
}
GPT2 = {"vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}
BLOOM = {"vocab_size": 256, "hidden_size": 64, "n_layer": 2, "n_head": 4}


def real_model(config_class: str, base: dict | None = None, **overrides):
    config = getattr(transformers, config_class)(**((TINY if base is None else base) | overrides))
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config), config.to_dict()


def linear_weights(model) -> int:
    """What bitsandbytes quantizes and LoRA `all` adapts: nn.Linear (and GPT-2's Conv1D) modules but the head."""
    from transformers.pytorch_utils import Conv1D

    return sum(
        sum(p.numel() for p in m.parameters(recurse=False))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | Conv1D) and m is not model.get_output_embeddings()
    )


@pytest.mark.parametrize(
    ("config_class", "overrides"),
    [
        ("LlamaConfig", {}),
        ("LlamaConfig", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
        ("LlamaConfig", {"head_dim": 32}),
        ("MistralConfig", {}),
        ("Qwen2Config", {}),
        ("Qwen3Config", {}),
        ("Phi3Config", {}),
        ("GemmaConfig", {}),
        ("Gemma2Config", {}),
        ("Gemma3TextConfig", {}),
        ("Olmo2Config", {}),
        *MOE.items(),
    ],
)
def test_parameter_count_matches_a_model_built_from_the_config(config_class, overrides):
    model, config = real_model(config_class, **overrides)
    shape = ModelShape.from_config(config)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.linear_params == linear_weights(model)


@pytest.mark.parametrize(("config_class", "base"), [("GPT2Config", GPT2), ("BloomConfig", BLOOM)])
def test_gpt2_and_bloom_shapes_come_from_their_attribute_map(config_class, base):
    model, config = real_model(config_class, base)
    assert "hidden_size" not in config or config_class == "BloomConfig"  # GPT-2 names it n_embd
    shape = ModelShape.from_config(config)
    assert (shape.hidden_size, shape.num_layers, shape.num_heads) == (64, 2, 4)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.linear_params == linear_weights(model)


def test_expert_counts_move_weights_and_activations_as_they_should():
    """All experts' weights are kept; only the active ones' activations (and compute) grow with the tokens."""
    mixtral = TINY | {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
    settings = Settings(finetuning_type="full", optim="sgd", batch_size=2, seq_len=64, bf16=False)  # float32 bytes
    base = estimate(ModelShape.from_config(mixtral), settings, device="cpu")
    more = estimate(ModelShape.from_config(mixtral | {"num_local_experts": 8}), settings, device="cpu")
    busier = estimate(ModelShape.from_config(mixtral | {"num_experts_per_tok": 4}), settings, device="cpu")
    h, inter, layers, tokens = 64, 128, 2, 2 * 64
    four_experts = layers * 4 * (3 * h * inter + h)  # four more experts' fused weights and router rows
    assert more.weights - base.weights == 4 * four_experts
    assert more.gradients - base.gradients == 4 * four_experts
    assert more.activations - base.activations == layers * tokens * 4 * 4  # router probabilities only
    assert busier.weights == base.weights
    assert busier.activations - base.activations == layers * tokens * 2 * ((2 * h + 4 * inter) * 4 + 40)

    shape = ModelShape.from_config(mixtral)
    idle = layers * 2 * 3 * h * inter  # two of four experts per layer are idle for any one token
    assert shape.active_params == shape.total_params - idle


def test_qlora_keeps_moe_experts_in_float32():
    """bitsandbytes quantizes nn.Linear only; peft then keeps every other parameter, fused experts too, in float32."""
    shape = ModelShape.from_config(TINY | {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2})
    qlora = estimate(shape, Settings(quantization_bit=4, batch_size=1, seq_len=8), device="cuda")
    unquantized = shape.total_params - shape.linear_params
    assert unquantized > shape.expert_params > 0
    assert qlora.weights == 4 * unquantized + quantized_linear_bytes(shape, 4, double_quant=True)
    assert any("does not quantize the experts" in note for note in qlora.notes)


def smollm2_config() -> dict:
    return {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }


def test_smollm2_shape_from_its_config():
    assert ModelShape.from_config(smollm2_config()).total_params == 134_515_008  # SmolLM2-135M's sum(p.numel())


def test_lora_parameters_match_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY)
    model = transformers.LlamaForCausalLM(config)
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    shape = ModelShape.from_config(config.to_dict())
    settings = Settings(lora_rank=4, lora_target=tuple(targets), optim="sgd", batch_size=1, seq_len=8)
    assert estimate(shape, settings, device="cpu").trainable == 4 * trained
    with pytest.raises(EstimateUnsupported, match="c_attn matches no linear layer"):
        lora_targets(shape, ("c_attn",))


def saved_activation_bytes(model, inputs, layers) -> dict[int, int]:
    """Bytes of the distinct non-parameter tensors autograd saves inside each decoder layer."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[int | None] = [None]
    seen: dict[int, tuple[int | None, int]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (current[0], storage.nbytes())
        return tensor

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, index=index: current.__setitem__(0, index))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    per_layer: dict[int, int] = {}
    for layer, size in seen.values():
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + size
    return per_layer


@pytest.mark.parametrize(
    ("method", "batch", "padded", "config_class"),
    [
        ("lora", 2, True, "LlamaConfig"),
        ("lora", 1, False, "LlamaConfig"),
        ("full", 2, True, "LlamaConfig"),
        ("full", 1, False, "LlamaConfig"),
        ("lora", 2, True, "Qwen3Config"),
        ("full", 1, False, "Qwen3Config"),
        ("full", 2, True, "MixtralConfig"),
        ("full", 1, False, "Qwen2MoeConfig"),
        ("lora", 2, True, "Qwen3MoeConfig"),
        ("lora", 1, False, "MixtralConfig"),
        ("lora", 2, True, "Qwen2MoeConfig"),
        ("full", 1, False, "DeepseekV3Config"),
    ],
)
def test_activations_per_layer_match_what_autograd_saves(method, batch, padded, config_class):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    overrides = MOE.get(config_class, {}) | {"num_hidden_layers": 3, "mlp_only_layers": [], "decoder_sparse_step": 1}
    config = getattr(transformers, config_class)(**(TINY | overrides), attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    shape = ModelShape.from_config(config.to_dict())
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=shape.linear_names(), task_type="CAUSAL_LM"))
    seq = 24
    ids = torch.randint(3, 256, (batch, seq))
    mask = torch.ones_like(ids)
    if padded:
        mask[-1, seq // 2 :] = 0
    saved = saved_activation_bytes(model, {"input_ids": ids, "attention_mask": mask}, layers)

    settings = Settings(finetuning_type=method, lora_rank=4, batch_size=batch, seq_len=seq)
    targets = lora_targets(shape, ("all",)) if method == "lora" else ()
    sparse = shape.experts is not None
    per_token = layer_activation_bytes(shape, settings, targets, 4, padded, method == "full", sparse=sparse)
    # The middle layer: the first shares RoPE's cos/sin, the last holds the final norm's tensors too.
    tolerance = 0.02 if shape.attention else 0.01  # MLA's intermediate tensors are counted more roughly
    assert saved[1] == pytest.approx(per_token * batch * seq, rel=tolerance), (saved, per_token)


def test_four_bit_storage_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(128, 256)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    real = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    real += state.state2.absmax.numel() * state.state2.absmax.element_size()
    shape = ModelShape.from_config(TINY | {"num_hidden_layers": 1})
    one = replace(shape, linears=(replace(shape.linears[0], in_features=256, out_features=128),))
    assert quantized_linear_bytes(one, 4, double_quant=True) == pytest.approx(real, rel=0.02)


def run_estimate(*keys: str, device: str = "cpu", checkpointing: bool | str = False):
    config = load_config(None, ["dataset=x", "cutoff_len=512", "per_device_train_batch_size=4", *keys])
    return estimate_peak_memory(config, smollm2_config(), device=device, gradient_checkpointing=checkpointing)


def test_the_peak_adds_up_its_terms():
    """Runtime + weights + optimizer state + the larger of the forward/backward pass and the optimizer step."""
    lora = run_estimate("bf16=false")  # float32 on a CPU (CPU bf16 autocast: tests/unit/test_precision.py)
    assert lora.runtime == CPU_RUNTIME_BYTES
    assert lora.weights == 4 * 134_515_008
    # LoRA r=8 on every linear layer of 30 layers, float32 (hidden 576, q 576, k/v 192, intermediate 1536)
    adapter = 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert lora.trainable == lora.gradients == 4 * adapter
    assert lora.optimizer == 2 * 4 * adapter  # AdamW: two float32 states
    assert lora.activations + lora.logits > lora.gradients  # LoRA's peak is in the forward/backward pass
    assert lora.total_bytes == CPU_RUNTIME_BYTES + 4 * 134_515_008 + 3 * 4 * adapter + lora.activations + lora.logits

    full = run_estimate("bf16=false", "finetuning_type=full", "per_device_train_batch_size=1", "cutoff_len=16")
    assert full.gradients > full.activations + full.logits  # full fine-tuning's peak is at the optimizer step
    largest = 4 * 49152 * 576  # the embedding: AdamW on a CPU goes tensor by tensor, two temporaries of it
    assert full.total_bytes == full.runtime + full.weights + full.optimizer + full.gradients + 2 * largest


def test_terms_move_the_way_the_settings_do():
    lora = run_estimate()
    assert run_estimate("per_device_train_batch_size=8").activations == pytest.approx(2 * lora.activations, rel=0.01)
    assert run_estimate("chunked_loss=false").logits > 1.5 * lora.logits
    assert run_estimate("finetuning_type=full").optimizer == 2 * 4 * 134_515_008
    assert run_estimate("finetuning_type=full", "optim=adamw_8bit").optimizer < 2.1 * 134_515_008
    assert run_estimate("finetuning_type=full", "optim=sgd").optimizer == 0
    assert run_estimate(checkpointing=True).activations < lora.activations / 5

    qlora = run_estimate("quantization_bit=4", device="cuda")
    bf16 = run_estimate(device="cuda")
    linear_bf16 = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) * 2
    assert qlora.weights - 49152 * 576 * 4 - 30 * 2 * 576 * 4 - 576 * 4 < 0.27 * linear_bf16
    assert bf16.weights == 2 * 134_515_008


def test_sharding_and_offload_on_a_gpu():
    from tunesmith.estimate.memory import MemoryEstimate

    shape = ModelShape.from_config(smollm2_config())
    full = Settings(finetuning_type="full", batch_size=1, seq_len=128)
    single: MemoryEstimate = estimate(shape, full, device="cuda")
    zero3 = {"zero_optimization": {"stage": 3}}
    sharded = estimate(shape, replace(full, deepspeed=zero3, world_size=4), device="cuda")
    assert sharded.weights == single.weights // 4
    assert sharded.gradients == single.gradients // 4
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    offloaded = estimate(shape, replace(full, deepspeed=offload, world_size=2), device="cuda")
    assert offloaded.optimizer == 0 and offloaded.host_bytes > 0
    ckpt = estimate(shape, full, device="cuda", gradient_checkpointing=True)
    ckpt_offload = estimate(shape, full, device="cuda", gradient_checkpointing="offload")
    assert ckpt_offload.activations < ckpt.activations and ckpt_offload.host_bytes > 0


def test_param_count_shapes():
    for text, params in (("7B", 7e9), ("135M", 1.35e8), ("70B", 70e9)):
        shape = ModelShape.from_param_count(params)
        assert shape.total_params == pytest.approx(params, rel=0.1), text


def test_a_shape_the_estimate_does_not_know_is_named():
    mamba = transformers.MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2).to_dict()
    with pytest.raises(UnknownShape, match=r"mamba: its config.json has no num_attention_heads"):
        ModelShape.from_config(mamba)
    t5 = transformers.T5Config(vocab_size=256, d_model=64, num_layers=2, num_heads=4).to_dict()
    with pytest.raises(UnknownShape, match="encoder-decoder"):
        ModelShape.from_config(t5)


def test_available_cpu_memory_is_the_systems_available_memory():
    """Bytes, not kB or pages: between the free pages and the physical memory, as psutil and /proc both say."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    free, total = os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    available = available_memory("cpu")
    assert 0.8 * free <= available <= total
    with open("/proc/meminfo") as meminfo:
        kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    assert available == pytest.approx(kib * 1024, rel=0.1)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", "estimate", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_command_json_and_tables(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(smollm2_config()))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path}\ndataset: identity\nfinetuning_type: full\n")
    json_args = ("--model", str(tmp_path), "--device", "cpu", "--json", "gradient_checkpointing=false")
    small, large, table = at_once(  # three independent commands
        partial(run_cli, *json_args, "per_device_train_batch_size=1"),
        partial(run_cli, *json_args, "per_device_train_batch_size=8"),
        partial(run_cli, str(cfg), "--device", "cuda"),
    )
    assert small.returncode == 0, small.stderr
    small_report, large_report = json.loads(small.stdout), json.loads(large.stdout)
    assert small_report["params"] == 134_515_008
    assert large_report["estimate"]["total_bytes"] > small_report["estimate"]["total_bytes"]
    assert set(small_report["comparison"]) >= {"QLoRA 4-bit", "LoRA 8-bit", "LoRA 16-bit", "LoRA 32-bit"}

    assert table.returncode == 0, table.stderr
    assert "QLoRA 4-bit" in table.stdout and "full 16-bit" in table.stdout and "activations" in table.stdout

    seven = run_cli("--params", "7B", "--device", "cuda", "quantization_bit=4", "--json")
    assert 3 * 2**30 < json.loads(seven.stdout)["estimate"]["weights"] + 2**30 < 6 * 2**30


def test_command_names_an_unknown_shape_in_one_line_and_offers_params(tmp_path):
    mamba = transformers.MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(mamba.to_dict()))
    unknown = run_cli("--model", str(tmp_path), "--device", "cpu")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert "mamba" in unknown.stderr and "--params" in unknown.stderr


def moe_config_dir(tmp_path, **overrides):
    config = transformers.MixtralConfig(**(TINY | {"num_local_experts": 8, "num_experts_per_tok": 2} | overrides))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    return tmp_path


def test_command_reports_all_and_active_parameters_of_a_moe_model(tmp_path):
    report = run_cli("--model", str(moe_config_dir(tmp_path)), "--device", "cpu", "--json")
    assert report.returncode == 0, report.stderr
    numbers = json.loads(report.stdout)
    experts = 2 * 8 * 3 * 64 * 128  # two layers of eight experts
    assert numbers["params"] - numbers["active_params"] == experts * 6 // 8  # six of eight idle per token


def auto_decision(tmp_path, model_config: dict, *keys: str) -> tuple[bool, str]:
    from tunesmith.estimate.memory import auto_checkpointing

    (tmp_path / "config.json").write_text(json.dumps(model_config))
    config = load_config(None, ["dataset=x", f"model_name_or_path={tmp_path}", *keys])
    return auto_checkpointing(config, str(tmp_path), "cpu")


@pytest.mark.parametrize(
    "model_config",
    [transformers.GPT2Config(**GPT2).to_dict(), transformers.BloomConfig(**BLOOM).to_dict()],
    ids=["gpt2", "bloom"],
)
def test_auto_checkpointing_estimates_gpt2_and_bloom(tmp_path, model_config):
    enabled, reason = auto_decision(tmp_path, model_config, "lora_target=all")
    assert enabled is False  # a tiny model fits
    assert reason.startswith("off (auto): the run needs about")


def test_auto_checkpointing_carries_on_for_a_shape_it_does_not_know(tmp_path):
    mamba = transformers.MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2).to_dict()
    enabled, reason = auto_decision(tmp_path, mamba)
    assert enabled is True
    assert reason.startswith("on (auto), without a memory estimate: ") and "mamba" in reason
    assert "--params" not in reason and "\n" not in reason


def test_auto_checkpointing_turns_on_when_the_run_does_not_fit(tmp_path, monkeypatch):
    from tunesmith.estimate import memory

    small = TINY | {"model_type": "llama"}
    needed = estimate_peak_memory(
        load_config(None, ["dataset=x"]), small, device="cpu", gradient_checkpointing=False
    ).total_bytes
    monkeypatch.setattr(memory, "available_memory", lambda device: int(needed / 0.9) + 1)
    assert auto_decision(tmp_path, small)[0] is False
    monkeypatch.setattr(memory, "available_memory", lambda device: int(needed / 0.9) - 1)
    assert auto_decision(tmp_path, small)[0] is True


def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path):
    from tunesmith.errors import ModelError
    from tunesmith.estimate.command import read_model_config

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all" * 8)
    with pytest.raises(ModelError, match=r"cannot read the GGUF header of .*broken\.gguf: GGUF magic invalid"):
        read_model_config(str(broken), None)
