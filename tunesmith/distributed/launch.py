"""Whether to re-launch a run under torchrun, and the command that does it.

A run re-launches itself as `python -m torch.distributed.run ... -m tunesmith.train CONFIG [key=value ...]` when
more than one device is visible, when `nproc_per_node` or `nnodes` asks for more than one process, when
`deepspeed` or `fsdp` is set (even for one process), or when `FORCE_TORCHRUN=1`. LLaMA-Factory's launch variables
(`FORCE_TORCHRUN`, `NPROC_PER_NODE`, `NNODES`, `NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT`; `CUDA_VISIBLE_DEVICES`
through the device count) work as they do there; a config key of the same meaning wins over its variable. A process
that torchrun started (`LOCAL_RANK` or `WORLD_SIZE` set) never launches again; so `torchrun`, `accelerate launch`
(its multi-GPU mode, also on CPUs) and the `deepspeed` launcher can start `-m tunesmith.train` themselves.

torchrun's agent runs inside this process rather than as a child: its Ctrl-C handling (SIGINT to every worker, then
wait for them) is what a checkpoint on Ctrl-C needs, and its errors become one line here instead of its tracebacks.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tunesmith.config.sections import TrainSection
from tunesmith.errors import ConfigError

DEFAULT_MULTI_NODE_PORT = 29500
# After Ctrl-C, how long the agent waits for the workers to finish their step and save before it kills them;
# torchrun's 30 s default would cut a large model's checkpoint short. A second Ctrl-C stops them at once.
SHUTDOWN_TIMEOUT_S = 1800


@dataclass(frozen=True)
class LaunchPlan:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    def torchrun_command(self, train_args: Sequence[str]) -> list[str]:
        """`python -m torch.distributed.run ... -m tunesmith.train <train_args>`; failures are not restarted."""
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.nnodes}",
            f"--node_rank={self.node_rank}",
            f"--nproc_per_node={self.nproc_per_node}",
            f"--master_addr={self.master_addr}",
            f"--master_port={self.master_port}",
            "--max_restarts=0",
            "-m",
            "tunesmith.train",
            *train_args,
        ]


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    return "LOCAL_RANK" in environ or "WORLD_SIZE" in environ


def visible_device_count() -> int:
    """Accelerators this process may use (CUDA_VISIBLE_DEVICES and its kin are applied by torch); 0 on a CPU."""
    import torch

    return torch.accelerator.device_count() if torch.accelerator.is_available() else 0


def plan_launch(train: TrainSection, environ: Mapping[str, str] = os.environ, devices: int | None = None):
    """The torchrun launch this run needs, or None to train in this process."""
    check_foreign_launcher(environ)
    if launched_by_torchrun(environ):
        return None
    devices = visible_device_count() if devices is None else devices
    nproc = _setting(train.nproc_per_node, environ, "NPROC_PER_NODE") or max(devices, 1)
    nnodes = _setting(train.nnodes, environ, "NNODES") or 1
    node_rank = _setting(train.node_rank, environ, "NODE_RANK") or 0
    forced = environ.get("FORCE_TORCHRUN", "0").strip().lower() in ("1", "true", "y", "yes")
    if not (forced or nproc > 1 or nnodes > 1 or train.deepspeed or train.fsdp):  # these need a process group
        return None
    if node_rank >= nnodes:
        raise ConfigError(f"node_rank {node_rank} is not below nnodes {nnodes}; node ranks count 0 to nnodes-1")
    master_addr = train.master_addr or environ.get("MASTER_ADDR")
    if master_addr is None:
        if nnodes > 1:
            raise ConfigError(
                f"nnodes: {nnodes} needs master_addr (or MASTER_ADDR): the address of node 0, the same on every node"
            )
        master_addr = "127.0.0.1"
    port = _setting(train.master_port, environ, "MASTER_PORT")
    if port is None:
        port = DEFAULT_MULTI_NODE_PORT if nnodes > 1 else free_port()
    return LaunchPlan(nproc, nnodes, node_rank, master_addr, port)


def check_foreign_launcher(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse the `accelerate launch` setups that would silently train differently from what was asked.

    accelerate's CPU mode (`--cpu`, `use_cpu: true`, `distributed_type: MULTI_CPU`) starts a single process unless
    it runs under mpirun; it then exports MASTER_ADDR (it does so only when asked for several processes) but no
    world size. Its DeepSpeed mode describes DeepSpeed in ACCELERATE_DEEPSPEED_* variables, which on CPU end as
    plain DDP or a batch-size error; tunesmith's `deepspeed` key is the way that works.
    """
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":  # accelerate's DeepSpeed launcher
        raise ConfigError(
            "accelerate launch with DeepSpeed settings is not read by tunesmith; launch with a plain multi-process "
            "config (examples/accelerate/multi_gpu.yaml) and set `deepspeed: ds_z2` (or a JSON path) in the config"
        )
    world_size_variables = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
    cpu_mode = "ACCELERATE_USE_CPU" in environ  # only accelerate's single-process ("simple") launcher sets it
    if cpu_mode and "MASTER_ADDR" in environ and not any(name in environ for name in world_size_variables):
        raise ConfigError(
            "accelerate launch was asked for several CPU processes but started only this one (its CPU mode needs "
            "mpirun); use `accelerate launch --config_file examples/accelerate/multi_gpu.yaml` (multi_gpu mode runs "
            "CPU processes over gloo too) or `tunesmith train CONFIG nproc_per_node=N`"
        )


def _setting(key_value: int | None, environ: Mapping[str, str], variable: str) -> int | None:
    if key_value is not None:
        return key_value
    raw = environ.get(variable, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ConfigError(f"environment variable {variable}={raw!r} is not a whole number")
    return int(raw)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(command: Sequence[str]) -> int:
    """Run `command` (`python -m torch.distributed.run ARGS`, from `torchrun_command`) with this process as
    torchrun's agent, and return the exit status for the whole job.

    torchrun stops every process when one fails; that rank's error is on its stderr, which is ours. Ctrl-C reaches
    only this process (torchrun starts each worker in a session of its own): the agent sends SIGINT to every
    worker, which finish their step, save a checkpoint, print where it is and exit, and waits for them.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    print("launch: " + shlex.join(command), flush=True)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))  # older torch: 30 s, fixed
    quiet = _DropShutdownLines()
    agent_logs = [logging.getLogger(f"torch.distributed.elastic.{name}") for name in _AGENT_LOGGERS]
    for log in agent_logs:
        log.addFilter(quiet)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(parse_args(list(command[3:])))
        return 0
    except SignalException as stop:
        return _stopped(stop.sigval)
    except ChildFailedError as failure:
        rank, first = failure.get_first_failure()
        print(
            f"error: a training process failed (rank {rank}, exit status {first.exitcode}); its error is above",
            file=sys.stderr,
        )
        return 1
    finally:
        for sig, handler in handlers.items():  # the agent's handlers raise SignalException; they are done
            signal.signal(sig, handler)
        for log in agent_logs:
            log.removeFilter(quiet)


def _stopped(sig: signal.Signals) -> int:
    """The agent got `sig`, passed it to the workers and waited for them. After one Ctrl-C they have finished the
    step, saved, and rank 0 has said where; a second Ctrl-C cut that wait short and the agent stopped them with
    SIGTERM (no checkpoint, as asked). Either way there is nothing to add but the exit status."""
    if sig == signal.SIGINT:
        return 130
    print(f"error: stopped by {sig.name}; the training processes were stopped", file=sys.stderr)
    return 128 + sig.value


_AGENT_LOGGERS = ("agent.server.api", "multiprocessing.api")  # a logger's filters apply only to its own records


class _DropShutdownLines(logging.Filter):
    """Hide the agent's lines about stopping: "Received 2 death signal" and "Sending process N closing signal
    SIGINT" after Ctrl-C (rank 0 says what happened), "failed (exitcode: 1) local_rank: 1 ..." after a failure
    (run_torchrun's own line says it, below the rank's error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Received", "Sending process", "failed (exitcode"))
