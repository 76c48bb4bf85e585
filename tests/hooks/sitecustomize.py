"""Fault injection for the multi-process tests, kept out of tunesmith's own code.

Python imports `sitecustomize` at start-up from the path; a test that puts this folder first on PYTHONPATH (see
`tests.unit.test_distributed.with_hooks`) gets it in every process of the job, torchrun's workers included. It wraps
`tunesmith.distributed.process_group.join`, which every launched process calls once, so that:

- TUNESMITH_TEST_FAIL_RANK=N: global rank N raises in its first forward pass, while the others wait in a collective;
- TUNESMITH_TEST_SLOW_RANK=N:SECONDS: global rank N starts its run that much later, as a rank on a busy machine does.
"""

import os

FAIL_RANK = "TUNESMITH_TEST_FAIL_RANK"
SLOW_RANK = "TUNESMITH_TEST_SLOW_RANK"


class InjectedFailure(RuntimeError):
    """Raised on the rank named by TUNESMITH_TEST_FAIL_RANK."""


def _fail_at_first_forward(rank: int) -> None:
    from torch.nn.modules.module import register_module_forward_pre_hook

    def fail(module, inputs):
        raise InjectedFailure(f"rank {rank} failed on purpose ({FAIL_RANK}={rank})")

    register_module_forward_pre_hook(fail)


def _wrap_join() -> None:
    import time

    from tunesmith.distributed import process_group

    join = process_group.join

    def join_with_faults(*args, **kwargs) -> int:
        rank = join(*args, **kwargs)
        if os.environ.get(FAIL_RANK) == str(rank):
            _fail_at_first_forward(rank)
        slow_rank, _, seconds = os.environ.get(SLOW_RANK, "").partition(":")
        if slow_rank == str(rank):
            time.sleep(float(seconds))
        return rank

    process_group.join = join_with_faults


if os.environ.get(FAIL_RANK) or os.environ.get(SLOW_RANK):
    _wrap_join()
