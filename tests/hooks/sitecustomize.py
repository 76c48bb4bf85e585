"""Fault injection for the multi-process tests, kept out of tunesmith's own code.

Python imports `sitecustomize` at start-up from the path; a test that puts this folder first on PYTHONPATH (see
`tests.unit.test_distributed.with_hooks`) gets it in every process of the job, torchrun's workers included. It wraps
`tunesmith.distributed.process_group.join`, which every launched process calls once, so that:

- TUNESMITH_TEST_FAIL_RANK=N: global rank N raises in its first forward pass, while the others wait in a collective;
- TUNESMITH_TEST_SLOW_RANK=N:SECONDS: global rank N starts its run that much later, as a rank on a busy machine does.

And, in any process, TUNESMITH_TEST_KILL_AT_CHECKPOINT=K: the process SIGKILLs itself when its K-th checkpoint is
fully written under its temporary name but not yet renamed (the moment `os.replace` would publish it); with
TUNESMITH_TEST_KILL_AFTER=SECONDS too, it publishes that checkpoint and SIGKILLs itself SECONDS later, wherever the
run then is (a step, a checkpoint half written), timed by the process itself however busy the machine is.
"""

import os

FAIL_RANK = "TUNESMITH_TEST_FAIL_RANK"
SLOW_RANK = "TUNESMITH_TEST_SLOW_RANK"
KILL_AT_CHECKPOINT = "TUNESMITH_TEST_KILL_AT_CHECKPOINT"
KILL_AFTER = "TUNESMITH_TEST_KILL_AFTER"


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


def _kill_at_checkpoint(count: int, after: float | None) -> None:
    import re
    import signal
    import threading

    replace = os.replace
    published = []

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def replace_or_die(source, destination, *args, **kwargs):
        if re.fullmatch(r"checkpoint-\d+", os.path.basename(os.fspath(destination))):
            published.append(destination)
            if len(published) == count:
                if after is None:
                    kill()
                threading.Timer(after, kill).start()
        return replace(source, destination, *args, **kwargs)

    os.replace = replace_or_die


if os.environ.get(KILL_AT_CHECKPOINT):
    _kill_at_checkpoint(
        int(os.environ[KILL_AT_CHECKPOINT]), float(os.environ[KILL_AFTER]) if os.environ.get(KILL_AFTER) else None
    )
