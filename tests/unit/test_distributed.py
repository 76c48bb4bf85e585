"""Multi-process training on CPU: the launch decision, and real 2-process gloo runs of `tunesmith train` on the tiny
model. Each multi-process run checks inside itself that it had 2 processes: some launchers silently start one."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, at_once
from tests.unit.test_train import train, train_args
from tunesmith.config import load_config
from tunesmith.config.deepspeed_config import SHIPPED
from tunesmith.distributed import launch
from tunesmith.errors import ConfigError

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")


@pytest.fixture(scope="session")
def cpu_adam() -> None:
    """DeepSpeed's CPU Adam (ZeRO-Offload's optimizer) is compiled on first use. .ci/run builds it before the tests;
    a machine that has not built it yet does so here, once (about 1-3 minutes on 2 cores), and keeps it in
    TORCH_EXTENSIONS_DIR. Only a machine that cannot build it skips, saying why."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}) to build DeepSpeed's cpu_adam op")
    if not builder.is_compatible(verbose=False):
        pytest.skip("DeepSpeed says its cpu_adam op cannot be built on this machine (CPUAdamBuilder.is_compatible)")
    builder.load()


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


# Fault injection (tests/hooks/sitecustomize.py), in the processes of a job started `with_hooks`.
FAIL_RANK, SLOW_RANK = "TUNESMITH_TEST_FAIL_RANK", "TUNESMITH_TEST_SLOW_RANK"
HOOKS = REPO / "tests" / "hooks"


def with_hooks(**env: str) -> dict[str, str]:
    """Environment variables that load tests/hooks/sitecustomize.py in every process, and the faults it injects."""
    path = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **env}


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
# float32: these runs compare weights across process counts to 1e-5, below bf16 autocast's rounding
SHORT_RUN = (
    "max_steps=3",
    "max_samples=12",
    "learning_rate=1e-2",
    "optim=adamw_torch",
    "logging_steps=1",
    "bf16=false",
)


@pytest.mark.parametrize(
    ("method", "weights", "engine"),
    [
        pytest.param("lora", "adapter_model.safetensors", (), id="lora-ddp"),
        pytest.param("full", "model.safetensors", (), id="full-ddp"),
        pytest.param("lora", "adapter_model.safetensors", ("deepspeed=ds_z0",), marks=needs_deepspeed, id="lora-z0"),
        pytest.param("full", "model.safetensors", ("deepspeed=ds_z1",), marks=needs_deepspeed, id="full-z1"),
        pytest.param("lora", "adapter_model.safetensors", ("deepspeed=ds_z2",), marks=needs_deepspeed, id="lora-z2"),
        pytest.param("full", "model.safetensors", ("deepspeed=ds_z3",), marks=needs_deepspeed, id="full-z3"),
        pytest.param("lora", "adapter_model.safetensors", ("deepspeed=ds_z3",), marks=needs_deepspeed, id="lora-z3"),
        pytest.param(
            "lora",
            "adapter_model.safetensors",
            ("deepspeed=ds_z2_offload",),
            marks=needs_deepspeed,
            id="lora-z2-offload",
        ),
        pytest.param(
            "full", "model.safetensors", ("deepspeed=ds_z3_offload",), marks=needs_deepspeed, id="full-z3-offload"
        ),
    ],
)
def test_two_processes_match_one_process_with_the_same_global_batch(
    method, weights, engine, tmp_path, tiny_model_dir, identity_data, request
):
    if any("offload" in setting for setting in engine):
        request.getfixturevalue("cpu_adam")  # built once per session where it is not built yet
    method_args = (f"finetuning_type={method}", *SHORT_RUN)
    # (how long each engine takes per step is measured in bench/distributed.py, not asserted here)
    args = train_args(tmp_path, tiny_model_dir, identity_data, *method_args, "nproc_per_node=2", *engine, output="two")
    one, result = at_once(  # the 1-process run in this process while the 2-process job starts up
        partial(
            train, tmp_path, tiny_model_dir, identity_data, *method_args, "per_device_train_batch_size=4", output="one"
        ),
        partial(run_tunesmith, args),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert TWO_PROCESSES in result.stdout
    assert "launch: " in result.stdout and "torch.distributed.run" in result.stdout
    assert result.stdout.count("batch: ") == 1  # only rank 0 prints

    expected, got = load_file(one / weights), load_file(tmp_path / "two" / weights)
    assert expected.keys() == got.keys()
    worst = max((expected[name] - got[name]).abs().max().item() for name in expected)
    print(f"{method} {engine}: max abs weight difference {worst:.2e}")
    assert worst <= 1e-5, worst
    before = load_file(tiny_model_dir / "model.safetensors") if method == "full" else {}
    # LoRA B starts at zero; the base model's weights start as saved: either way, training moved them
    moved = max(
        (t - before[n]).abs().max().item() if n in before else t.abs().max().item()
        for n, t in got.items()
        if method == "full" or "lora_B" in n
    )
    assert moved > 1e-3
    if method == "lora":  # plain peft loads the adapter (under ZeRO-3 too: gathered at save) as 1 process saved it
        reloaded = peft_adapter(tiny_model_dir, tmp_path / "two")
        assert reloaded.keys() == expected.keys()
        assert max((expected[name] - reloaded[name]).abs().max().item() for name in expected) <= 1e-5
    records = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in records if '"loss"' in r]) == 3  # one writer: no duplicated lines
    if engine:  # DeepSpeed really ran: its engine writes ZeRO state in its own layout
        assert (tmp_path / "two" / "checkpoint-3" / "global_step3").is_dir()


def peft_adapter(base_dir: Path, adapter_dir: Path) -> dict:
    """The adapter as `peft.PeftModel.from_pretrained` loads it, named as in adapter_model.safetensors."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    return get_peft_model_state_dict(model)


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path, tiny_model_dir, identity_data):
    # Rank 0 waits in a collective with an hour's timeout: the job ends within the 150 s this test allows only if
    # torchrun stops rank 0 when rank 1 fails (subprocess.run raises TimeoutExpired otherwise).
    args = train_args(tmp_path, tiny_model_dir, identity_data, "nproc_per_node=2", "ddp_timeout=3600")
    result = run_tunesmith(args, timeout=150, **with_hooks(**{FAIL_RANK: "1"}))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "rank 1 failed on purpose" in output
    assert "a training process failed (rank 1, exit status 1)" in result.stderr
    assert "ChildFailedError" not in output and "failed (exitcode" not in output  # the rank's error is enough


def test_overwrite_with_two_processes_clears_the_old_run_once(tmp_path, tiny_model_dir, identity_data):
    # Rank 1 starts 2 s late in the first run: rank 0 must not write this run's files into the directory before
    # rank 1 has checked it, or rank 1 refuses it as one that "already holds this run" (a race seen under load).
    # Rank 0 meets rank 1 in a collective before it checks the directory (process_group.output_dir_is_shared), so
    # a longer delay only makes rank 0 wait longer there: a file written before that point is found either way.
    first_args = train_args(tmp_path, tiny_model_dir, identity_data, "nproc_per_node=2", "save_steps=2")
    first = run_tunesmith(first_args, **with_hooks(**{SLOW_RANK: "1:2"}))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
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
    assert TWO_PROCESSES in log
    # what the person sees: the rank-0 message and where the checkpoint is; no launcher traceback or agent warnings
    assert f"Stopped at step {checkpoints[0].name.split('-')[1]}; checkpoint saved in {output}" in log
    assert "Traceback" not in log and "SignalException" not in log and "death signal" not in log, log[-3000:]


def test_a_zero3_config_that_would_save_empty_weights_is_refused(tmp_path):
    config = json.loads((Path(train_section("deepspeed=ds_z3").deepspeed)).read_text())
    del config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    path = tmp_path / "z3.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="stage3_gather_16bit_weights_on_model_save"):
        train_section(f"deepspeed={path}")


def test_zero3_adapter_check_sees_whole_tensors():
    import torch
    from torch import nn

    from tunesmith.distributed.deepspeed import check_gathered_adapter
    from tunesmith.errors import TunesmithError

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))  # 4 trainable tensors
    whole = {f"{i}.weight": torch.ones(2, 2) for i in range(4)}
    check_gathered_adapter(whole, model)
    with pytest.raises(TunesmithError, match="3 whole tensors of the 4"):
        check_gathered_adapter({**whole, "3.weight": torch.empty(0)}, model)  # a rank's slice, not gathered
    with pytest.raises(TunesmithError, match="0 whole tensors of the 4"):
        check_gathered_adapter({}, model)


@pytest.mark.parametrize(
    ("engine", "tolerance"),
    [
        pytest.param((), 1e-6, id="ddp"),
        pytest.param(("deepspeed=ds_z2",), 1e-6, marks=needs_deepspeed, id="z2"),
        pytest.param(("deepspeed=ds_z3",), 1e-6, marks=needs_deepspeed, id="z3"),
    ],
)
def test_two_process_resume_ends_with_the_weights_of_an_uninterrupted_run(
    engine, tolerance, tmp_path, tiny_model_dir, identity_data
):
    """As the 1-process resume test: a straight run, and a run that restarts from its step-2 checkpoint."""
    settings = ("max_steps=4", "save_steps=2", "lora_dropout=0.1", "lr_scheduler_type=cosine", "warmup_steps=1")
    two = ("nproc_per_node=2", *engine)
    straight = run_tunesmith(train_args(tmp_path, tiny_model_dir, identity_data, *settings, *two, output="straight"))
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-3000:]
    assert TWO_PROCESSES in straight.stdout

    interrupted = tmp_path / "resumed"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", interrupted / "checkpoint-2")
    shutil.copy(tmp_path / "straight" / "tunesmith_run.json", interrupted)
    resume = (*settings, *two, "resume_from_checkpoint=true")
    resumed = run_tunesmith(train_args(tmp_path, tiny_model_dir, identity_data, *resume, output="resumed"))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert TWO_PROCESSES in resumed.stdout
    logged = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [3, 4]  # it went on from step 2, not from the start

    expected = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    got = load_file(interrupted / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    at_step_2 = load_file(tmp_path / "straight" / "checkpoint-2" / "adapter_model.safetensors")
    moved = max((expected[k] - at_step_2[k]).abs().max().item() for k in expected)
    print(f"{engine}: resumed vs straight max abs difference {worst:.2e}; steps 3-4 moved weights by {moved:.2e}")
    assert worst <= tolerance, worst
    assert moved > 1e-4  # the resumed steps changed the adapter, so the comparison is not vacuous


def test_launchers_own_local_rank_argument_is_dropped():
    from tunesmith.train.__main__ import without_local_rank

    assert without_local_rank(["--local_rank=1", "cfg.yaml", "lr=1"]) == ["cfg.yaml", "lr=1"]
    assert without_local_rank(["--local-rank", "0", "cfg.yaml"]) == ["cfg.yaml"]
    assert without_local_rank(["cfg.yaml", "name=--local_rank=1x"]) == ["cfg.yaml", "name=--local_rank=1x"]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, "started only this one"),  # --cpu -n 2
        ({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "deepspeed: ds_z2"),
        ({"ACCELERATE_USE_CPU": "True"}, None),  # accelerate --cpu with one process: asked for one
        ({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, None),  # multi_gpu mode
        ({"MASTER_ADDR": "10.0.0.1"}, None),  # not accelerate
    ],
)
def test_accelerate_setups_that_would_train_differently_are_refused(environ, message):
    if message is None:
        launch.check_foreign_launcher(environ)
    else:
        with pytest.raises(ConfigError, match=message):
            launch.check_foreign_launcher(environ)


def launcher(name: str) -> str:
    """A launcher installed next to this Python (torchrun, accelerate, deepspeed)."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def run_launcher(command: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT")}
    return subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "kind",
    [
        "torchrun",
        "accelerate",
        pytest.param("deepspeed", marks=needs_deepspeed),
        pytest.param("deepspeed-hostfile", marks=needs_deepspeed),
    ],
)
def test_tutorial_launchers_start_two_processes(kind, tmp_path, tiny_model_dir, identity_data):
    """Each launcher as the tutorials write it, running `-m tunesmith.train` with a YAML file and overrides."""
    config = tmp_path / "cfg.yaml"
    config.write_text("finetuning_type: lora\nmax_steps: 2\nmax_samples: 8\n")
    module_args = [str(config), *train_args(tmp_path, tiny_model_dir, identity_data)[1:], "max_steps=2"]
    port = str(launch.free_port())
    if kind == "torchrun":
        command = [launcher("torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "tunesmith.train"]
    elif kind == "accelerate":
        accelerate_config = REPO / "examples" / "accelerate" / "multi_gpu.yaml"
        command = [launcher("accelerate"), "launch", "--config_file", str(accelerate_config)]
        command += ["--main_process_port", port, "-m", "tunesmith.train"]
    else:  # the deepspeed launcher passes --local_rank=N to each process; with DeepSpeed itself on, as users run it
        module_args.append("deepspeed=ds_z2")
        if kind == "deepspeed":
            command = [launcher("deepspeed"), "--num_gpus", "2"]  # without it: 1 process on a CPU
        else:
            hostfile = tmp_path / "hostfile"
            hostfile.write_text("localhost slots=2\n")
            # the ssh check (node 0 reaching each host, even localhost) needs an sshd this machine lacks
            # (and to ask node 0 for its address); a real multi-node job has both
            command = [launcher("deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check"]
            command += ["--master_addr", "127.0.0.1"]
        command += ["--master_port", port, "--module", "tunesmith.train"]
    result = run_launcher([*command, *module_args])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "x 2 process(es) = 4 rows per step" in result.stdout
    assert "launch: " not in result.stdout  # the launcher's processes train; none starts torchrun again
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def run_two_nodes(tmp_path: Path, tiny_model_dir: Path, identity_data: Path, *overrides: str, output: str) -> list:
    """The README's two-node commands, both nodes here (NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT, 1 process each),
    each with its own output_dir (`{output}-node0`, `{output}-node1`), as nodes without a shared file system have.
    Returns each node's stdout."""
    port = str(launch.free_port())
    environ = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
    nodes = []
    for node_rank in (0, 1):
        args = train_args(tmp_path, tiny_model_dir, identity_data, *overrides, output=f"{output}-node{node_rank}")
        node_env = {"NNODES": "2", "NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        nodes.append(
            subprocess.Popen(
                [sys.executable, "-m", "tunesmith", *args],
                cwd=REPO,
                env={**environ, **node_env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=150) for node in nodes]
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-2000:] + err[-3000:]
    return [out for out, _ in outputs]


def test_two_nodes_on_one_machine_train_as_one_job_and_resume_from_their_own_output_dirs(
    tmp_path, tiny_model_dir, identity_data
):
    """Two nodes without a shared file system: the job matches 1 process; each node keeps what resuming needs in its
    own output_dir, and a job restarted from each node's step-2 checkpoint ends with the uninterrupted job's weights.
    """
    # no dropout: the 2 processes draw other random masks than 1 process would
    method_args = ("finetuning_type=lora", *SHORT_RUN, "save_steps=2", "lora_dropout=0", "lr_scheduler_type=cosine")
    one = train(tmp_path, tiny_model_dir, identity_data, *method_args, "per_device_train_batch_size=4", output="one")

    outputs = run_two_nodes(tmp_path, tiny_model_dir, identity_data, *method_args, output="straight")
    assert "--nnodes=2" in outputs[1] and "--node_rank=1" in outputs[1]
    assert TWO_PROCESSES in outputs[0]  # node 0 holds global rank 0, which prints
    expected = load_file(one / "adapter_model.safetensors")
    straight = load_file(tmp_path / "straight-node0" / "adapter_model.safetensors")
    worst = max((expected[name] - straight[name]).abs().max().item() for name in expected)
    print(f"two nodes: max abs weight difference to 1 process {worst:.2e}")
    assert worst <= 1e-5, worst
    node1 = tmp_path / "straight-node1"
    assert not (node1 / "adapter_model.safetensors").exists()  # the final model: only global rank 0 writes it
    assert not (node1 / "metrics.jsonl").exists()  # and the logs
    for name in ("trainer_state.json", "tunesmith_run.json", "adapter_model.safetensors", "optimizer.pt"):
        assert (node1 / "checkpoint-2" / name).is_file(), name  # what node 1 needs to resume, on node 1
    assert (node1 / "checkpoint-2" / "rng_state_1.pth").is_file()

    for node in ("node0", "node1"):  # each node was stopped after step 2, with only its own files
        resumed = tmp_path / f"resumed-{node}"
        resumed.mkdir()
        shutil.copytree(tmp_path / f"straight-{node}" / "checkpoint-2", resumed / "checkpoint-2")
        shutil.copy(tmp_path / f"straight-{node}" / "tunesmith_run.json", resumed)
    outputs = run_two_nodes(
        tmp_path, tiny_model_dir, identity_data, *method_args, "resume_from_checkpoint=true", output="resumed"
    )
    assert TWO_PROCESSES in outputs[0]
    logged = [json.loads(line) for line in (tmp_path / "resumed-node0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [3]  # it went on from step 2, not from the start
    got = load_file(tmp_path / "resumed-node0" / "adapter_model.safetensors")
    worst = max((straight[name] - got[name]).abs().max().item() for name in straight)
    at_step_2 = load_file(tmp_path / "straight-node0" / "checkpoint-2" / "adapter_model.safetensors")
    moved = max((straight[name] - at_step_2[name]).abs().max().item() for name in straight)
    print(f"two nodes: resumed vs straight max abs difference {worst:.2e}; step 3 moved weights by {moved:.2e}")
    assert worst <= 1e-6, worst
    assert moved > 1e-4
