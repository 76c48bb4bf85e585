"""Multi-process training on CPU: the launch decision, and real 2-process gloo runs of `tunesmith train` on the tiny
model. Each multi-process run checks inside itself that it had 2 processes: some launchers silently start one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.unit.test_train import train, train_args
from tunesmith.config import load_config
from tunesmith.distributed import launch
from tunesmith.distributed.deepspeed import SHIPPED
from tunesmith.distributed.process_group import TEST_FAIL_RANK
from tunesmith.errors import ConfigError

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")


def cpu_adam_built() -> bool:
    """DeepSpeed compiles its CPU Adam (for ZeRO-Offload) on first use, ~1-3 minutes: too slow for a unit test."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", get_default_build_root()))
    return any(root.glob("*/cpu_adam/cpu_adam*.so"))


needs_cpu_adam = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not cpu_adam_built(),
    reason="DeepSpeed's cpu_adam op is not built yet (run any ds_*_offload config once)",
)
TWO_PROCESSES = "x 2 process(es) = 4 rows per step"  # print_batch_plan, from Trainer's own world size


def train_section(*overrides: str):
    return load_config(None, ["dataset=identity", *overrides]).train


@pytest.mark.parametrize(
    ("overrides", "environ", "devices", "expected"),
    [
        ((), {}, 0, None),  # a CPU, nothing asked: train in this process
        ((), {}, 1, None),
        ((), {}, 4, (4, 1, 0)),  # every visible GPU
        (("nproc_per_node=2",), {}, 0, (2, 1, 0)),  # CPU processes over gloo
        ((), {"NPROC_PER_NODE": "3"}, 0, (3, 1, 0)),
        (("nproc_per_node=2",), {"NPROC_PER_NODE": "3"}, 0, (2, 1, 0)),  # the key wins over its variable
        ((), {"FORCE_TORCHRUN": "1"}, 0, (1, 1, 0)),
        (("deepspeed=ds_z2",), {}, 0, (1, 1, 0)),  # DeepSpeed needs a process group, even for one process
        ((), {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}, 8, (8, 2, 1)),
        (("nproc_per_node=2",), {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, 0, None),  # already launched
        ((), {"FORCE_TORCHRUN": "1", "WORLD_SIZE": "1"}, 0, None),
    ],
)
def test_launch_decision(overrides, environ, devices, expected):
    plan = launch.plan_launch(train_section(*overrides), environ, devices=devices)
    assert (None if plan is None else (plan.nproc_per_node, plan.nnodes, plan.node_rank)) == expected


def test_launch_command_is_torchrun_running_this_package():
    train = train_section("nnodes=2", "node_rank=1", "master_addr=node0", "nproc_per_node=2")
    plan = launch.plan_launch(train, {}, devices=0)
    assert plan.master_port == launch.DEFAULT_MULTI_NODE_PORT  # every node must agree on it without being told
    command = plan.torchrun_command(["cfg.yaml", "lr=1e-4"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node_rank=1", "--nproc_per_node=2", "--master_addr=node0", "--master_port=29500"} <= set(
        command
    )
    assert command[-4:] == ["-m", "tunesmith.train", "cfg.yaml", "lr=1e-4"]
    port = launch.plan_launch(train_section("nproc_per_node=2", "master_port=1234"), {}, devices=0).master_port
    assert port == 1234


def test_launch_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="master_addr"):
        launch.plan_launch(train_section("nnodes=2"), {}, devices=0)
    with pytest.raises(ConfigError, match="node_rank 2 is not below nnodes 2"):
        launch.plan_launch(train_section("nnodes=2", "node_rank=2", "master_addr=a"), {}, devices=0)
    with pytest.raises(ConfigError, match="NNODES"):
        launch.plan_launch(train_section(), {"NNODES": "two"}, devices=0)


def run_tunesmith(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", *args],
        cwd=REPO,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# max_samples=12 and 3 steps of 4 rows: every row once; identity rows differ in length and supervised tokens.
SHORT_RUN = ("max_steps=3", "max_samples=12", "learning_rate=1e-2", "optim=adamw_torch", "logging_steps=1")


@pytest.mark.parametrize(
    ("method", "weights", "engine"),
    [
        pytest.param("lora", "adapter_model.safetensors", (), id="lora-ddp"),
        pytest.param("full", "model.safetensors", (), id="full-ddp"),
        pytest.param("lora", "adapter_model.safetensors", ("deepspeed=ds_z2",), marks=needs_deepspeed, id="lora-z2"),
        pytest.param("full", "model.safetensors", ("deepspeed=ds_z3",), marks=needs_deepspeed, id="full-z3"),
        pytest.param(
            "lora",
            "adapter_model.safetensors",
            ("deepspeed=ds_z2_offload",),
            marks=needs_cpu_adam,
            id="lora-z2-offload",
        ),
        pytest.param(
            "full", "model.safetensors", ("deepspeed=ds_z3_offload",), marks=needs_cpu_adam, id="full-z3-offload"
        ),
    ],
)
def test_two_processes_match_one_process_with_the_same_global_batch(
    method, weights, engine, tmp_path, tiny_model_dir, identity_data
):
    method_args = (f"finetuning_type={method}", *SHORT_RUN)
    one = train(tmp_path, tiny_model_dir, identity_data, *method_args, "per_device_train_batch_size=4", output="one")

    started = time.perf_counter()
    args = train_args(tmp_path, tiny_model_dir, identity_data, *method_args, "nproc_per_node=2", *engine, output="two")
    result = run_tunesmith(args)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert TWO_PROCESSES in result.stdout
    assert "launch: " in result.stdout and "torch.distributed.run" in result.stdout
    assert result.stdout.count("batch: ") == 1  # only rank 0 prints
    assert elapsed < 90, elapsed

    expected, got = load_file(one / weights), load_file(tmp_path / "two" / weights)
    assert expected.keys() == got.keys()
    worst = max((expected[name] - got[name]).abs().max().item() for name in expected)
    print(f"{method} {engine}: max abs weight difference {worst:.2e}, 2-process run {elapsed:.1f} s")
    assert worst <= 1e-5, worst
    before = load_file(tiny_model_dir / "model.safetensors") if method == "full" else {}
    # LoRA B starts at zero; the base model's weights start as saved: either way, training moved them
    moved = max(
        (t - before[n]).abs().max().item() if n in before else t.abs().max().item()
        for n, t in got.items()
        if method == "full" or "lora_B" in n
    )
    assert moved > 1e-3
    records = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in records if '"loss"' in r]) == 3  # one writer: no duplicated lines
    if engine:  # DeepSpeed really ran: its engine writes ZeRO state in its own layout
        assert (tmp_path / "two" / "checkpoint-3" / "global_step3").is_dir()


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path, tiny_model_dir, identity_data):
    args = train_args(tmp_path, tiny_model_dir, identity_data, "nproc_per_node=2", "ddp_timeout=60")
    started = time.perf_counter()
    result = run_tunesmith(args, timeout=90, **{TEST_FAIL_RANK: "1"})
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "rank 1 failed on purpose" in output
    assert "a training process failed" in result.stderr
    assert elapsed < 60, elapsed  # torchrun stops rank 0; nobody waits out ddp_timeout


def test_overwrite_with_two_processes_clears_the_old_run_once(tmp_path, tiny_model_dir, identity_data):
    first = run_tunesmith(train_args(tmp_path, tiny_model_dir, identity_data, "nproc_per_node=2", "save_steps=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    again = run_tunesmith(
        train_args(tmp_path, tiny_model_dir, identity_data, "nproc_per_node=2", "overwrite_output_dir=true")
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "removed 2 old checkpoint(s)" in again.stdout
    assert TWO_PROCESSES in again.stdout
    assert not (tmp_path / "out" / "checkpoint-2").exists()  # (checkpoint-4 is written again at the last step)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_deepspeed_configs_pass_the_checks(name):
    assert train_section(f"deepspeed={name}").deepspeed.endswith(f"{name}.json")


def test_deepspeed_config_without_clipping_or_offload_optimizer_is_refused(tmp_path):
    no_clipping = tmp_path / "a.json"
    no_clipping.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="gradient_clipping"):
        train_section(f"deepspeed={no_clipping}")
    offload = tmp_path / "b.json"
    offload.write_text(
        json.dumps(
            {"gradient_clipping": "auto", "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
        )
    )
    with pytest.raises(ConfigError, match="optimizer"):
        train_section(f"deepspeed={offload}")
    with pytest.raises(ConfigError, match="ds_z0, ds_z1"):
        train_section("deepspeed=ds_z9")


def test_ctrl_c_stops_both_processes_at_the_same_step_with_a_checkpoint(tmp_path, tiny_model_dir, identity_data):
    import signal

    output = tmp_path / "out"
    args = train_args(
        tmp_path, tiny_model_dir, identity_data, "max_steps=100000", "save_steps=100000", "nproc_per_node=2"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "tunesmith", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not (output / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the job gets it
    log, _ = process.communicate(timeout=180)
    assert process.returncode == 130, log[-3000:]
    checkpoints = list(output.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file(), log[-3000:]
