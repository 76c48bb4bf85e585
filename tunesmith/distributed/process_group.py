"""Inside a process that torchrun started: join the process group early, prepare the output directory once, leave
cleanly.

The group is joined before the recipe runs (Trainer, through accelerate, reuses an existing group), so that rank 0
alone can delete old checkpoints on `overwrite_output_dir` while the others wait at a barrier. At the end every rank
meets at a barrier and then destroys the group: without that, plain DDP on gloo sometimes aborts rank 1 at exit
(`terminate called without an active exception`), which would fail a finished job.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from tunesmith.config.sections import RunConfig

# Test-only: the global rank named here raises in its first forward pass, while the other ranks wait in a collective.
TEST_FAIL_RANK = "TUNESMITH_TEST_FAIL_RANK"
# Test-only: "RANK:SECONDS", that rank starts its run late, as a rank on a busy machine does.
TEST_SLOW_RANK = "TUNESMITH_TEST_SLOW_RANK"


class InjectedFailure(RuntimeError):
    """Raised on the rank named by TUNESMITH_TEST_FAIL_RANK (tests only)."""


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def join(config: RunConfig) -> int:
    """Join the process group torchrun set up (env://) and return this process's global rank. Other ranks than 0
    print nothing to stdout (their errors still reach stderr)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend(), timeout=timedelta(seconds=config.train.ddp_timeout))
    rank = dist.get_rank()
    if os.environ.get(TEST_FAIL_RANK) == str(rank):
        _fail_at_first_forward(rank)
    slow_rank, _, seconds = os.environ.get(TEST_SLOW_RANK, "").partition(":")
    if slow_rank == str(rank):
        time.sleep(float(seconds))
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    if config.output.overwrite_output_dir and not config.train.resume_from_checkpoint:
        if rank == 0:
            from tunesmith.train.checkpoints import prepare_output_dir, run_fingerprint

            prepare_output_dir(Path(config.output.output_dir), run_fingerprint(config), None, overwrite=True)
        dist.barrier()  # the others check the directory only after rank 0 has cleared it
    return rank


def leave() -> None:
    """Barrier, free what still holds the DDP model, then destroy the group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def _fail_at_first_forward(rank: int) -> None:
    from torch.nn.modules.module import register_module_forward_pre_hook

    def fail(module, inputs):
        raise InjectedFailure(f"rank {rank} failed on purpose ({TEST_FAIL_RANK}={rank})")

    register_module_forward_pre_hook(fail)
