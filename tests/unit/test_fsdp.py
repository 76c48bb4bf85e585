"""FSDP (PyTorch's FSDP2 through Trainer and accelerate) on 2 CPU processes over gloo, through `tunesmith train`.

Each 2-process run prints, from inside the run, that the prepared model is an FSDP2 module whose parameters are
DTensors and that a process holds half of them (`ShardingCheck`): a silent fallback to DDP would match the 1-process
run just as well, so every equivalence test also checks that line.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, logged_losses
from tests.unit.test_distributed import SHORT_RUN, TWO_PROCESSES, run_tunesmith
from tests.unit.test_train import train, train_args
from tunesmith.config import load_config
from tunesmith.distributed import fsdp, launch
from tunesmith.errors import ConfigError

SHARDED = re.compile(  # ShardingCheck's line, printed by rank 0 once Trainer has prepared the model
    r"fsdp: FSDP2 over 2 process\(es\), \d+ fully_shard units, \d+ DTensor parameters .*; "
    r"this process holds ([\d,]+) of ([\d,]+) elements"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("fsdp") / "data"
    shutil.copytree(REPO / "data", target)
    return target


def run_two(tmp_path: Path, model: Path, data: Path, *overrides: str, output: str) -> str:
    """`tunesmith train` on 2 processes x 2 rows; returns stdout after checking it really sharded over 2 processes."""
    result = run_tunesmith(
        train_args(
            tmp_path,
            model,
            data,
            *SHORT_RUN,
            "nproc_per_node=2",
            "per_device_train_batch_size=2",
            *overrides,
            output=output,
        ),
        timeout=150,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert TWO_PROCESSES in result.stdout
    match = SHARDED.search(result.stdout)
    assert match, result.stdout[-3000:]
    held, whole = (int(group.replace(",", "")) for group in match.groups())
    assert abs(held - whole / 2) <= 0.01 * whole  # half each: every parameter is split along its first dim
    return result.stdout


def weight_difference(expected: dict, got: dict) -> float:
    """Max abs difference; the same tensor names (a tied weight saved once, as transformers saves it)."""
    assert expected.keys() == got.keys(), set(expected) ^ set(got)
    return max((expected[name] - got[name]).abs().max().item() for name in expected)


def test_full_fine_tuning_on_two_processes_matches_one_and_resumes_exactly(tmp_path, tiny_model_dir, data_dir):
    from transformers import AutoModelForCausalLM

    one = train(
        tmp_path,
        tiny_model_dir,
        data_dir,
        "finetuning_type=full",
        *SHORT_RUN,
        "per_device_train_batch_size=4",
        output="one",
    )

    # transformers' spelling, pasted from a LLaMA-Factory config; a checkpoint at step 2 (full state dict, default);
    # weights loaded by rank 0 only and sent to the others, FSDP's own activation checkpointing
    settings = (
        "finetuning_type=full",
        "fsdp=full_shard auto_wrap",
        "fsdp_config={cpu_ram_efficient_loading: true, activation_checkpointing: true}",
        "save_steps=2",
    )
    run_two(tmp_path, tiny_model_dir, data_dir, *settings, output="two")
    two = tmp_path / "two"
    expected, got = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    worst = weight_difference(expected, got)
    print(f"full: max abs weight difference, 2 processes (FSDP) vs 1: {worst:.2e}")
    assert worst <= 1e-5
    before = load_file(tiny_model_dir / "model.safetensors")
    assert max((got[name] - before[name]).abs().max().item() for name in before) > 1e-3  # training moved them
    assert (two / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP checkpoint layout
    reloaded = AutoModelForCausalLM.from_pretrained(two)  # a whole model, in plain transformers
    assert torch.equal(reloaded.model.embed_tokens.weight, got["model.embed_tokens.weight"])
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(two / "tunesmith_run.json", resumed)
    run_two(tmp_path, tiny_model_dir, data_dir, *settings, "resume_from_checkpoint=true", output="resumed")
    difference = weight_difference(got, load_file(resumed / "model.safetensors"))
    print(f"full: resumed from an FSDP checkpoint vs uninterrupted: {difference:.2e}")
    assert difference <= 1e-6


def test_lora_on_two_processes_matches_one_and_resumes_from_sharded_checkpoints(tmp_path, tiny_model_dir, data_dir):
    """Sharded checkpoints (each process writes its own shards; SHARDED_STATE_DICT), while the final adapter is
    still saved whole."""
    from tunesmith.model.adapters import check_adapter_weights

    one = train(tmp_path, tiny_model_dir, data_dir, *SHORT_RUN, "per_device_train_batch_size=4", output="one")
    # transformers 5's spelling: fsdp true with the settings in fsdp_config (accelerate's `fsdp_` key names)
    settings = (
        "fsdp=true",
        "fsdp_config={fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer, fsdp_version: 2, "
        "fsdp_state_dict_type: SHARDED_STATE_DICT}",
        "save_steps=2",
    )
    run_two(tmp_path, tiny_model_dir, data_dir, *settings, output="two")
    two = tmp_path / "two"
    expected, got = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    check_adapter_weights(got)  # every LoRA weight is there and B moved off zero
    worst = weight_difference(expected, got)
    print(f"lora: max abs weight difference, 2 processes (FSDP) vs 1: {worst:.2e}")
    assert worst <= 1e-5

    assert (two / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # a distributed checkpoint, not one file
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(two / "tunesmith_run.json", resumed)
    run_two(tmp_path, tiny_model_dir, data_dir, *settings, "resume_from_checkpoint=true", output="resumed")
    difference = weight_difference(got, load_file(resumed / "adapter_model.safetensors"))
    print(f"lora: resumed from a sharded FSDP checkpoint vs uninterrupted: {difference:.2e}")
    assert difference <= 1e-6
    assert logged_losses(resumed)[-1:] == pytest.approx(logged_losses(two)[-1:], abs=1e-6)


def test_no_shard_is_ddp_and_says_so(capsys):
    """FSDP2 has no NO_SHARD; whole parameters, gradients and optimizer state in every process is DDP, which
    test_distributed proves equivalent. No FSDP arguments reach Trainer, and the run says why."""
    train = train_section("fsdp=no_shard")
    assert fsdp.training_arguments(train.fsdp, train.fsdp_offload, train.fsdp_config, None) == {}
    assert "fsdp: no_shard keeps whole parameters, gradients and optimizer state in every process" in (
        capsys.readouterr().out
    )
    assert launch.plan_launch(train, {}, devices=0) is not None  # still under torchrun, like every fsdp run


def test_qlora_with_shard_grad_op_and_offload_matches_one_process(tmp_path, wide_tiny_model_dir, data_dir):
    """FSDP + QLoRA: bitsandbytes 4-bit weights stored in the compute dtype (bnb_4bit_quant_storage) are sharded
    like any other parameter; here with shard_grad_op (ZeRO-2-like) and the CPU offload policy."""
    from tunesmith.model.adapters import check_adapter_weights

    qlora = ("quantization_bit=4", *SHORT_RUN)
    one = train(tmp_path, wide_tiny_model_dir, data_dir, *qlora, "per_device_train_batch_size=4", output="one")
    out = run_two(
        tmp_path, wide_tiny_model_dir, data_dir, "quantization_bit=4", "fsdp=shard_grad_op offload", output="two"
    )
    assert "(CPU-offloaded)" in out
    got = load_file(tmp_path / "two" / "adapter_model.safetensors")
    check_adapter_weights(got)
    worst = weight_difference(load_file(one / "adapter_model.safetensors"), got)
    print(f"qlora, shard_grad_op offload: max abs weight difference, 2 processes (FSDP) vs 1: {worst:.2e}")
    assert worst <= 1e-5


def train_section(*overrides: str):
    return load_config(None, ["dataset=identity", *overrides]).train


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("fsdp=full_shard",), ("full_shard", False, None)),
        (("fsdp=full_shard auto_wrap",), ("full_shard", False, None)),
        (("fsdp=full_shard offload",), ("full_shard", True, None)),
        (("fsdp=[shard_grad_op, offload]",), ("shard_grad_op", True, None)),
        (("fsdp=true",), ("full_shard", False, None)),
        (("fsdp=false",), (None, False, None)),
        (
            ("fsdp=true", "fsdp_config={reshard_after_forward: false, fsdp_offload_params: true}"),
            ("shard_grad_op", True, None),
        ),
        (
            ("fsdp=full_shard", "fsdp_config={fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer, fsdp_version: 2}"),
            ("full_shard", False, {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "version": 2}),
        ),
    ],
)
def test_fsdp_spellings_users_paste(overrides, expected):
    train = train_section(*overrides)
    assert (train.fsdp, train.fsdp_offload, train.fsdp_config) == expected


def test_fsdp_config_from_a_json_file_and_its_trainer_arguments(tmp_path):
    path = tmp_path / "fsdp_config.json"
    pasted = {  # accelerate's key names, values as its config files write them
        "fsdp_auto_wrap_policy": "transformer_based_wrap",
        "backward_prefetch": "BACKWARD_PRE",
        "fsdp_cpu_ram_efficient_loading": "true",
    }
    path.write_text(json.dumps(pasted))
    train = train_section("fsdp=shard_grad_op offload", f"fsdp_config={path}")
    assert train.fsdp_config == {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "backward_prefetch": "BACKWARD_PRE",
        "cpu_ram_efficient_loading": True,
    }
    arguments = fsdp.training_arguments(train.fsdp, train.fsdp_offload, train.fsdp_config, torch.nn.Linear(1, 1))
    assert arguments == {
        "fsdp": True,
        "fsdp_config": {
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "cpu_ram_efficient_loading": True,
            "version": 2,
            "reshard_after_forward": False,  # shard_grad_op
            "cpu_offload": True,
            "state_dict_type": "FULL_STATE_DICT",  # a whole model at every save unless told otherwise
        },
    }
    assert fsdp.training_arguments("no_shard", False, None, None) == {}  # DDP


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("fsdp=fulll_shard",),
            "`fsdp`: got 'fulll_shard'; fulll_shard is not an FSDP option; expected full_shard, shard_grad_op or no",
        ),
        (("fsdp=hybrid_shard",), "hybrid sharding is FSDP1-only"),
        (("fsdp=full_shard shard_grad_op",), "choose one of full_shard, shard_grad_op or no_shard"),
        (("fsdp=full_shard", "deepspeed=ds_z3"), "`fsdp: full_shard` and `deepspeed` both shard the model; choose one"),
        (("fsdp_config={version: 2}",), "`fsdp_config` is set but `fsdp` is not"),
        (("fsdp_offload=true",), "`fsdp_offload` needs fsdp"),
        (("fsdp=full_shard", "fsdp_config={version: 1}"), "`fsdp_config.version`: got 1; tunesmith runs FSDP2"),
        (("fsdp=full_shard", "fsdp_config={reshard_after_forward: false}"), "the settings disagree"),
        (
            ("fsdp=full_shard", "fsdp_config={wrap_everything: true}"),
            "`fsdp_config`: unknown key 'wrap_everything'; the keys are version",
        ),
        (
            ("fsdp=full_shard", "fsdp_config={state_dict_type: LOCAL_STATE_DICT}"),
            "got 'LOCAL_STATE_DICT'; expected FULL_STATE_DICT or SHARDED_STATE_DICT",
        ),
        (
            ("fsdp=full_shard", "fsdp_config={auto_wrap_policy: everything}"),
            "expected TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP or NO_WRAP",
        ),
        (
            ("fsdp=full_shard", "fsdp_config=missing.json"),
            "`fsdp_config`: got 'missing.json', which is neither a file nor a mapping",
        ),
        (("fsdp=full_shard", "quantization_bit=8"), "`fsdp` cannot shard bitsandbytes 8-bit weights"),
        (("fsdp=shard_grad_op", "pissa_init=true"), "not with `fsdp: shard_grad_op`; remove fsdp (DDP) or pissa_init"),
        (
            ("fsdp=full_shard", "fsdp_config={activation_checkpointing: true}", "gradient_checkpointing=true"),
            "`fsdp_config.activation_checkpointing` and `gradient_checkpointing` both checkpoint activations",
        ),
    ],
)
def test_fsdp_config_errors_name_the_key_the_value_and_the_choices(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["dataset=identity", "finetuning_type=lora", *overrides])
    assert message in str(error.value)


def test_layer_classes_to_wrap_are_checked_against_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match="GPT2Block is not in this model; its layer classes are LlamaDecoderLayer"):
        fsdp.training_arguments("full_shard", False, {"transformer_layer_cls_to_wrap": ["GPT2Block"]}, model)


def test_fsdp_always_runs_in_a_process_group():
    """Like DeepSpeed: even one process is started by torchrun (FSDP2 shards over a process group, of 1 here)."""
    plan = launch.plan_launch(train_section("fsdp=full_shard"), {}, devices=0)
    assert plan is not None and plan.nproc_per_node == 1
