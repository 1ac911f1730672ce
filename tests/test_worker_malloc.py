"""workers/malloc.py: a CPU render worker keeps freed memory instead of page-faulting it back in.

Each test runs in a fresh interpreter: the settings change how the whole process allocates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# a render's pattern in miniature: buffers of 1 to 100 MiB allocated, written and freed over and over
# on a non-main thread (the render lane); count the minor page faults once the first round is done
_PROBE = """
import json, resource, sys, threading
import numpy as np
from workers import malloc
set_up = [malloc.one_arena(), malloc.keep_freed_memory()] if sys.argv[1] == "tuned" else []
def cycles(out):
    faults = 0
    for mib in (1, 4, 16, 48, 100):
        size = mib * 2**20
        a = np.ones(size, dtype=np.uint8); b = np.ones(size, dtype=np.uint8); del a, b
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(5):
            a = np.ones(size, dtype=np.uint8); b = np.ones(size, dtype=np.uint8); del a, b
        faults += resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    out.append(faults)
out = []
thread = threading.Thread(target=cycles, args=(out,))
thread.start(); thread.join()
print(json.dumps({"set_up": set_up, "faults": out[0]}))
"""


def _probe(mode: str, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, **env}, timeout=60, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_a_tuned_process_reuses_a_freed_buffer_instead_of_faulting_it_in_again() -> None:
    plain, tuned = _probe("plain"), _probe("tuned")
    assert tuned["set_up"] == [True, True]
    assert int(plain["faults"]) > 1000  # glibc gave the buffers back and faulted them in again
    assert int(tuned["faults"]) < 100  # kept: the same pages were reused


def test_the_operators_own_malloc_variables_are_left_alone() -> None:
    assert _probe("tuned", MALLOC_ARENA_MAX="4")["set_up"] == [False, False]
