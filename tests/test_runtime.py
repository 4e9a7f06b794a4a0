"""runtime.py: what setup_device("cpu") does to glibc's malloc, measured in the kernel's page-fault count."""
import json
import os
import platform
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process allocates, touches and frees a 96 MiB and a 32 MiB tensor (a phase-2 step's logit chunk and an
# activation, both over glibc's largest default mmap threshold) ten times; the minor page faults of each round say
# whether its pages came back from the heap or, zeroed, from the kernel. The heap takes a few rounds to settle.
ROUNDS = """
import json, resource, sys, torch
import runtime
if sys.argv[1] == "setup_device":
    runtime.setup_device("cpu")
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    logits, activation = torch.ones(96 * 2**18), torch.ones(32 * 2**18)
    del logits, activation
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def faults_per_round(mode):
    proc = subprocess.run([sys.executable, "-c", ROUNDS, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory is glibc's mallopt")
def test_setup_device_cpu_keeps_freed_memory_so_a_steady_loop_stops_faulting_pages_back_in():
    pages = 128 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    default, kept = faults_per_round("default"), faults_per_round("setup_device")
    assert all(f > 0.9 * pages for f in default[-3:]), f"glibc defaults: faults per round {default}, {pages} pages"
    assert sum(kept[-3:]) < 0.05 * pages, f"after setup_device('cpu'): faults per round {kept}, {pages} pages"
