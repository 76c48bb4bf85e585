"""The memory estimate's formula against the real thing: parameter counts of models built from configs, LoRA
parameter counts from peft, saved activations counted by autograd hooks, and the command's output."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import transformers

from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.estimate.memory import (
    ModelShape,
    Settings,
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


def real_model(config_class: str, **overrides):
    config = getattr(transformers, config_class)(**(TINY | overrides))
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config), config.to_dict()


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
    ],
)
def test_parameter_count_matches_a_model_built_from_the_config(config_class, overrides):
    model, config = real_model(config_class, **overrides)
    shape = ModelShape.from_config(config)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
    )
    assert shape.linear_params == linear


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
    with pytest.raises(ConfigError, match="c_attn matches no linear layer"):
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
    ("method", "batch", "padded"),
    [("lora", 2, True), ("lora", 1, False), ("full", 2, True), ("full", 1, False)],
)
def test_activations_per_layer_match_what_autograd_saves(method, batch, padded):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(TINY | {"num_hidden_layers": 3}), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    layers = model.model.layers
    if method == "lora":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    seq = 24
    ids = torch.randint(3, 256, (batch, seq))
    mask = torch.ones_like(ids)
    if padded:
        mask[-1, seq // 2 :] = 0
    saved = saved_activation_bytes(model, {"input_ids": ids, "attention_mask": mask}, layers)

    shape = ModelShape.from_config(config.to_dict())
    settings = Settings(finetuning_type=method, lora_rank=4, batch_size=batch, seq_len=seq)
    targets = lora_targets(shape, ("all",)) if method == "lora" else ()
    per_token = layer_activation_bytes(shape, settings, targets, 4, padded, trains_norms=method == "full")
    # The middle layer: the first shares RoPE's cos/sin, the last holds the final norm's tensors too.
    assert saved[1] == pytest.approx(per_token * batch * seq, rel=0.01), (saved, per_token)


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


def test_terms_move_the_way_the_settings_do():
    lora = run_estimate()
    assert (
        lora.total_bytes == lora.runtime + sum(v for k, v in lora.parts().items() if k not in ("runtime", "gradients"))
        or lora.gradients > lora.activations
    )  # the peak adds activations, not gradients, for LoRA
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
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        ModelShape.from_config(TINY | {"num_local_experts": 8})


def test_available_memory_is_positive():
    assert available_memory("cpu") > 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", "estimate", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_command_json_and_tables(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(smollm2_config()))
    small = run_cli(
        "--model",
        str(tmp_path),
        "--device",
        "cpu",
        "--json",
        "gradient_checkpointing=false",
        "per_device_train_batch_size=1",
    )
    large = run_cli(
        "--model",
        str(tmp_path),
        "--device",
        "cpu",
        "--json",
        "gradient_checkpointing=false",
        "per_device_train_batch_size=8",
    )
    assert small.returncode == 0, small.stderr
    small_report, large_report = json.loads(small.stdout), json.loads(large.stdout)
    assert small_report["params"] == 134_515_008
    assert large_report["estimate"]["total_bytes"] > small_report["estimate"]["total_bytes"]
    assert set(small_report["comparison"]) >= {"QLoRA 4-bit", "LoRA 8-bit", "LoRA 16-bit", "LoRA 32-bit"}

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path}\ndataset: identity\nfinetuning_type: full\n")
    table = run_cli(str(cfg), "--device", "cuda")
    assert table.returncode == 0, table.stderr
    assert "QLoRA 4-bit" in table.stdout and "full 16-bit" in table.stdout and "activations" in table.stdout

    seven = run_cli("--params", "7B", "--device", "cuda", "quantization_bit=4", "--json")
    assert 3 * 2**30 < json.loads(seven.stdout)["estimate"]["weights"] + 2**30 < 6 * 2**30


def test_command_never_downloads():
    missing = run_cli("--model", "nobody-at-all/not-a-model-xyz", "--device", "cpu")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "--params" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
