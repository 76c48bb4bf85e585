"""CPU runs compute on one thread per physical core this process may use.

torch starts as many threads as it counts cores, and on a machine with SMT (two hardware threads per core), or in a
container whose CPU set is smaller than the machine, that count can exceed the physical cores the process can run
on: the threads then share cores, and matmuls slow down rather than speed up. A user's OMP_NUM_THREADS (or an
explicit torch.set_num_threads before the run) is left as it is. The data loader stays in the training process by
default (`dataloader_num_workers: 0`): collating a padded batch of 4 rows of up to 512 tokens takes 0.4 ms against
seconds per CPU step, and a worker process would take a core from the matmuls.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def physical_cores(cpuinfo: Path = Path("/proc/cpuinfo"), allowed: set[int] | None = None) -> int | None:
    """Physical cores among the CPUs this process may run on; None where /proc/cpuinfo does not say."""
    allowed = os.sched_getaffinity(0) if allowed is None else allowed
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    cores: set[tuple[str, str]] = set()
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "processor" not in fields or "core id" not in fields:
            return None  # no topology given (some VMs, other architectures)
        if int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def match_threads_to_cores() -> str:
    """Set torch's thread count to the usable physical cores where it is higher; returns the line that says so."""
    threads = torch.get_num_threads()
    cores = physical_cores()
    if cores is None or os.environ.get("OMP_NUM_THREADS"):
        return f"CPU threads: {threads}"
    if threads > cores:
        torch.set_num_threads(cores)
        return f"CPU threads: {cores}, one per physical core (torch counted {threads})"
    return f"CPU threads: {threads} on {cores} physical cores"
