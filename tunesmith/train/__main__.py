"""`python -m tunesmith.train CONFIG.yaml [key=value ...]`: the same as `tunesmith train`, for the launchers that
start a module in each process: `torchrun --nproc_per_node 2 -m tunesmith.train cfg.yaml`, `accelerate launch
--config_file examples/accelerate/multi_gpu.yaml -m tunesmith.train cfg.yaml`, `deepspeed --num_gpus 2 --module
tunesmith.train cfg.yaml`.

The `deepspeed` launcher adds `--local_rank=N` before the script's own arguments; the same number is in LOCAL_RANK,
which is what the process group reads, so the argument is dropped. `record` writes an uncaught exception to the file
torchrun names, so torchrun's failure summary shows the failing rank's error instead of only its exit code.
"""

import re
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from tunesmith.cli import main


def without_local_rank(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local_rank N` (also `--local-rank`), which launchers pass to every process."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif re.fullmatch(r"--local[_-]rank=\d+", arg):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        else:
            kept.append(arg)
    return kept


if __name__ == "__main__":
    raise SystemExit(record(main)(["train", *without_local_rank(sys.argv[1:])]))
