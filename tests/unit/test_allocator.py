"""CPU runs give freed tensor memory back to the system: the resident peak follows the live tensors.

Whether a step is slower than with glibc's defaults is measured in bench/allocator.py, not here."""

import ctypes.util
import os
import subprocess
import sys

import pytest

from tunesmith.train.allocator import PRELOAD_LIBRARIES, preload_library, return_freed_memory_to_os

# Allocate 400 MiB in 2 MiB tensors between small long-lived ones, free the large ones, report resident growth.
PROGRAM = """
import sys, torch
from tunesmith.train.allocator import release_free_memory, return_freed_memory_to_os
if sys.argv[1] == "on":
    assert return_freed_memory_to_os()
def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
warm = torch.empty(4 << 20, dtype=torch.uint8)
del warm  # as in training: a freed large block raises glibc's dynamic threshold past the next tensors
before = rss_mib()
large, small = [], []
for _ in range(200):
    large.append(torch.ones(2 << 20, dtype=torch.uint8))
    small.append(torch.ones(1024, dtype=torch.uint8))  # keeps the heap from shrinking from its top
del large
if sys.argv[1] == "release":  # a preloaded allocator keeps freed pages for reuse until asked
    release_free_memory()
print(rss_mib() - before)
"""


def resident_growth_mib(setting: str, preload: str | None = None) -> int:
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    run = subprocess.run([sys.executable, "-c", PROGRAM, setting], capture_output=True, text=True, check=True, env=env)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_leave_the_process_only_with_the_setting():
    assert return_freed_memory_to_os()
    assert resident_growth_mib("off") > 300  # glibc's default keeps the freed 400 MiB
    assert resident_growth_mib("on") < 20


@pytest.mark.parametrize("name", PRELOAD_LIBRARIES)
def test_a_preloaded_allocator_gives_freed_tensors_back_when_asked(name):
    library = ctypes.util.find_library(PRELOAD_LIBRARIES[name])
    if library is None:
        pytest.skip(f"{name} is not installed (apt-get install libtcmalloc-minimal4 / libjemalloc2)")
    assert resident_growth_mib("release", library) < 20


def test_train_runs_again_with_the_preferred_allocator():
    if preload_library() is None:
        pytest.skip("neither tcmalloc nor jemalloc is installed")
    code = (
        "from tunesmith.train.allocator import loaded_allocator, reexec_with_fast_allocator\n"
        "print('before', loaded_allocator(), flush=True)\n"
        "reexec_with_fast_allocator()\n"
        "print('after', loaded_allocator())"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "TUNESMITH_ALLOCATOR")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    preferred = next(name for name, library in PRELOAD_LIBRARIES.items() if ctypes.util.find_library(library))
    assert run.stdout.split("\n")[-2:] == [f"after {preferred}", ""]
    assert run.stdout.count("before glibc malloc") == 1 and run.stdout.count(f"before {preferred}") == 1  # once
