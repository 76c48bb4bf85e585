"""The CPU allocator of a training run: resident memory near the live tensors, without a page-fault tax per step.

glibc's malloc keeps freed blocks below its mmap threshold in heap arenas; the threshold grows by itself (up to
32 MiB) as large blocks are freed, so activation tensors of a few MiB land in the arenas and fragment them: SmolLM2
LoRA, batch 4 x 512, held 6.5 GiB resident against 4.2 GiB of live tensors. A fixed 1 MiB threshold (tunesmith's
earlier setting) maps every larger tensor on its own and unmaps it when freed, so the peak matches the live
tensors, but each new tensor's pages are then faulted in and zero-filled by the kernel: 9.3 s/step against 6.2.

Measured with bench/allocator.py (SmolLM2 shapes, LoRA r=8, bf16 autocast, batches of 4 rows of 512/300/420/180
tokens; CPU seconds per step, which a shared machine stretches less than wall time; ratios to glibc's defaults):

| allocator                                  | CPU s/step  | page faults/step | peak  | resident after |
| ------------------------------------------ | ----------- | ---------------- | ----- | -------------- |
| glibc defaults                             | 1.00        | 317k             | 1.00  | 1238 MiB       |
| glibc, 1 MiB mmap threshold (earlier)      | 0.57, 0.95  | 678k             | 0.89  | 838 MiB        |
| glibc + malloc_trim(0) after each step     | 0.81        | 409k             | 0.99  | 738 MiB        |
| glibc, 64 MiB threshold + M_TRIM_THRESHOLD | 0.77        | 393k             | 1.03  | 738 MiB        |
| jemalloc (Debian libjemalloc2)             | 0.39, 0.57  | 394k             | 0.91  | 845 MiB        |
| jemalloc, 1 s background decay             | 1.02        | 439k             | 0.91  | 763 MiB        |
| tcmalloc (Debian libtcmalloc-minimal4)     | 0.27, 0.27  | 0.7k             | 0.96  | 1797 MiB       |

(6 layers, 2 cores, load average 4-5 from other processes, so two runs where they differ; min of 2 runs each.
Full-size SmolLM2 under the same load gave peaks of 6166 MiB with glibc's defaults, 3952 with the 1 MiB threshold,
3964 with jemalloc and 4101 with tcmalloc.) Trimming at step end does not lower the peak, which happens inside the
step. tcmalloc keeps freed pages for reuse, so a step faults almost nothing in; it is the fastest by far, and its
peak is within 4-8% of the tightest. It gives memory back only when asked, which `release_free_memory` does at the
end of training. So, in order of preference, where installed:

- tcmalloc (`apt-get install libtcmalloc-minimal4`), else jemalloc (`libjemalloc2`): `tunesmith train`, run as a
  program on a CPU, re-executes itself once with the library in LD_PRELOAD (an allocator must be in place before
  the first allocation, so it cannot be switched from inside the process);
- elsewhere glibc with the 1 MiB threshold: slower, but resident memory stays what `tunesmith estimate` predicts.
A user's own LD_PRELOAD or MALLOC_MMAP_THRESHOLD_ is left alone. GPU memory has its own caching allocator: all of
this is for CPU runs only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20
PRELOAD_LIBRARIES = {"tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}  # preference order → library name
REEXEC_MARK = "TUNESMITH_ALLOCATOR"  # set in the re-executed process, so that it happens once


def preload_library() -> str | None:
    """The file name of the preferred installed allocator (LD_PRELOAD takes it as it is), or None."""
    for library in PRELOAD_LIBRARIES.values():
        found = ctypes.util.find_library(library)
        if found:
            return found
    return None


def loaded_allocator() -> str:
    """tcmalloc or jemalloc when one is mapped into this process, else glibc's malloc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "the system's malloc"
    return next((name for name in PRELOAD_LIBRARIES if f"lib{name}" in maps), "glibc malloc")


def reexec_with_fast_allocator() -> None:
    """Replace this process by itself with tcmalloc or jemalloc preloaded, where one is installed.

    Call only from a process that runs `tunesmith` as its program (the console script, `python -m tunesmith`),
    before any heavy work: the same command line runs again. Returns when there is nothing to do: no library, a
    user's own LD_PRELOAD or MALLOC_MMAP_THRESHOLD_, or already re-executed.
    """
    if os.environ.get(REEXEC_MARK) or os.environ.get("LD_PRELOAD") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    library = preload_library()
    if library is None or not sys.platform.startswith("linux"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, LD_PRELOAD=library, **{REEXEC_MARK: library})
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def release_free_memory() -> None:
    """Hand memory that the allocator keeps for reuse back to the system (at the end of training)."""
    allocator = loaded_allocator()
    if allocator == "tcmalloc":
        ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory()
    elif allocator == "jemalloc":
        all_arenas = b"arena.4096.purge"  # MALLCTL_ARENAS_ALL
        ctypes.CDLL(None).mallctl(all_arenas, None, None, None, ctypes.c_size_t(0))
    elif allocator == "glibc malloc":
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def prepare_cpu_allocator() -> str:
    """Set up the allocator of this CPU run; returns the line that says which it is."""
    allocator = loaded_allocator()
    if allocator != "glibc malloc":
        return f"allocator: {allocator}"
    if return_freed_memory_to_os():
        hint = "" if preload_library() else "; apt-get install libtcmalloc-minimal4 makes CPU steps faster"
        return f"allocator: glibc malloc with a 1 MiB mmap threshold (train/allocator.py){hint}"
    return f"allocator: {allocator}"


def return_freed_memory_to_os() -> bool:
    """Set glibc's mmap threshold (what MALLOC_MMAP_THRESHOLD_ does at start-up); False where there is no glibc."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):  # the user chose one
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
