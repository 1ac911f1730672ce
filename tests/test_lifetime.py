"""cli/lifetime.py on its own: signals into Stopped, and the parent-death guard of a child process.
(`editfarm dev` itself, with all its processes, is in tests/test_dev_lifetime.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cli.cluster import MANAGED_SETTINGS, exported_settings
from cli.lifetime import Stopped, parent_death_signal, stop_on_signals


def test_sigterm_raises_stopped_and_later_signals_cannot_cut_the_cleanup_short() -> None:
    before = signal.getsignal(signal.SIGTERM)
    cleaned = False
    with pytest.raises(Stopped) as stopped, stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # ignored now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            cleaned = True
    assert stopped.value.signum == signal.SIGTERM and str(stopped.value) == "SIGTERM" and cleaned
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_stopped_is_not_swallowed_by_except_exception() -> None:
    assert not issubclass(Stopped, Exception)


def test_the_guard_is_armed_only_from_the_main_thread() -> None:
    assert parent_death_signal() is not None
    seen: list[object] = []
    worker = threading.Thread(target=lambda: seen.append(parent_death_signal()))
    worker.start()
    worker.join()
    assert seen == [None]  # the kernel would kill the child when that thread ended


def test_a_guarded_grandchild_dies_with_its_sigkilled_parent() -> None:
    # parent: a Python process that starts a guarded `sleep` and prints its pid, then waits
    code = ("import subprocess, sys, time; from cli.lifetime import parent_death_signal; "
            "child = subprocess.Popen(['sleep', '60'], preexec_fn=parent_death_signal()); "
            "print(child.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    survived = _alive(child)
    if survived:
        os.kill(child, signal.SIGKILL)
    assert not survived


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_exported_settings_are_every_editfarm_setting_but_the_managed_ones() -> None:
    environ = {"EDITFARM_RENDERER": "standin", "EDITFARM_ALLOW_PRIVATE_URLS": "false", "HOME": "/root",
               "EDITFARM_REDIS_URL": "redis://elsewhere", "EDITFARM_WORKER_NAME": "shared"}
    assert exported_settings(environ) == {"EDITFARM_RENDERER": "standin", "EDITFARM_ALLOW_PRIVATE_URLS": "false"}
    assert {"EDITFARM_REDIS_URL", "EDITFARM_WORKER_NAME", "EDITFARM_READY_FILE"} <= MANAGED_SETTINGS
