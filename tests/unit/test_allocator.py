"""CPU runs give freed tensor memory back to the system: the resident peak follows the live tensors."""

import subprocess
import sys

import pytest

from tunesmith.train.allocator import return_freed_memory_to_os

# Allocate 400 MiB in 2 MiB tensors between small long-lived ones, free the large ones, report resident growth.
PROGRAM = """
import sys, torch
if sys.argv[1] == "on":
    from tunesmith.train.allocator import return_freed_memory_to_os
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
print(rss_mib() - before)
"""


def resident_growth_mib(setting: str) -> int:
    run = subprocess.run([sys.executable, "-c", PROGRAM, setting], capture_output=True, text=True, check=True)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_leave_the_process_only_with_the_setting():
    assert return_freed_memory_to_os()
    assert resident_growth_mib("off") > 300  # glibc's default keeps the freed 400 MiB
    assert resident_growth_mib("on") < 20
