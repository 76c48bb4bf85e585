"""Inside a process that torchrun started: join the process group early, learn who writes the output directory,
leave cleanly.

The group is joined before the recipe runs (Trainer, through accelerate, reuses an existing group), so that the
recipe can let one process per output directory delete or write files while the others wait at a barrier. At the
end every rank meets at a barrier and then destroys the group: without that, plain DDP on gloo sometimes aborts
rank 1 at exit (`terminate called without an active exception`), which would fail a finished job.

Nodes need not share a file system: `output_dir_is_shared` finds out, and where they do not, each node's local
rank 0 keeps in its own output directory what resuming needs (the run's fingerprint, checkpoints with Trainer's
state), while the final model and the logs still come from global rank 0 alone.
"""

from __future__ import annotations

import gc
import os
import sys
from datetime import timedelta
from pathlib import Path


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def join(timeout_seconds: int) -> int:
    """Join the process group torchrun set up (env://) and return this process's global rank. Other ranks than 0
    print nothing to stdout (their errors still reach stderr)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if backend() == "nccl" and local_rank() < torch.cuda.device_count():
            torch.cuda.set_device(local_rank())  # collectives before Trainer's own setup use this process's GPU
        dist.init_process_group(backend(), timeout=timedelta(seconds=timeout_seconds))
    rank = dist.get_rank()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return rank


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def output_dir_is_shared(output_dir: Path) -> bool:
    """Whether every process sees the output directory that global rank 0 sees (one file system, or one machine).

    Rank 0 creates a file with a name no earlier run used; each process looks for it in its own `output_dir`.
    Without a process group: True. A collective: every rank calls it.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return True
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    token = (
        torch.randint(0, 2**62, (1,), device=device)
        if dist.get_rank() == 0
        else torch.zeros(1, dtype=torch.long, device=device)
    )
    dist.broadcast(token, src=0)
    probe = output_dir / f".tunesmith-probe-{token.item():x}"
    if dist.get_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.touch()
    dist.barrier()
    seen = torch.tensor([int(probe.exists())], device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)  # completes only after every rank has looked
    if dist.get_rank() == 0:
        probe.unlink()
    return bool(seen.item())


def writes_run_files(output_dir_shared: bool) -> bool:
    """Whether this process writes the files a run keeps in its output directory (fingerprint, checkpoints): global
    rank 0, and, when the nodes' output directories are separate, each node's local rank 0."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return True
    return dist.get_rank() == 0 or (not output_dir_shared and local_rank() == 0)


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def leave() -> None:
    """Barrier, free what still holds the DDP model, then destroy the group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
