"""Whether to re-launch a run under torchrun, and the command that does it.

A run re-launches itself as `python -m torch.distributed.run ... -m tunesmith.train CONFIG [key=value ...]` when
more than one device is visible, when `nproc_per_node` or `nnodes` asks for more than one process, when
`deepspeed` is set (even for one process), or when `FORCE_TORCHRUN=1`. LLaMA-Factory's launch variables
(`FORCE_TORCHRUN`, `NPROC_PER_NODE`, `NNODES`, `NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT`; `CUDA_VISIBLE_DEVICES`
through the device count) work as they do there; a config key of the same meaning wins over its variable. A process
that torchrun started (`LOCAL_RANK` or `WORLD_SIZE` set) never launches again.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tunesmith.config.sections import TrainSection
from tunesmith.errors import ConfigError

DEFAULT_MULTI_NODE_PORT = 29500


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
    if launched_by_torchrun(environ):
        return None
    devices = visible_device_count() if devices is None else devices
    nproc = _setting(train.nproc_per_node, environ, "NPROC_PER_NODE") or max(devices, 1)
    nnodes = _setting(train.nnodes, environ, "NNODES") or 1
    node_rank = _setting(train.node_rank, environ, "NODE_RANK") or 0
    forced = environ.get("FORCE_TORCHRUN", "0").strip().lower() in ("1", "true", "y", "yes")
    if not (forced or nproc > 1 or nnodes > 1 or train.deepspeed):  # DeepSpeed always runs in a process group
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
    """Run torchrun and return its exit status. torchrun stops every process when one fails and exits non-zero;
    each rank's own error is on its stderr, which reaches ours. Ctrl-C reaches the workers from the terminal (they
    save a checkpoint), so here it only waits for them."""
    print("launch: " + shlex.join(command), flush=True)
    process = subprocess.Popen(command)
    interrupted = False
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:  # the workers saved a checkpoint (or were stopped); torchrun reports the signal as a failure
        print("interrupted: the training processes stopped; see above for the checkpoint", file=sys.stderr)
        return 130
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        print(f"error: torchrun was stopped by {name}", file=sys.stderr)
        return 128 - code
    if code != 0:
        print(f"error: a training process failed (torchrun exit status {code}); its error is above", file=sys.stderr)
    return code
