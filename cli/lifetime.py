"""The lifetime of a foreground local cluster (`editfarm dev`): everything it started ends with it.

Two ways a foreground command ends besides Ctrl-C, and what each needs:

* a catchable signal — SIGTERM from `timeout`, systemd, a CI runner or `docker stop`, SIGHUP from a
  closed terminal: :func:`stop_on_signals` turns it into :class:`Stopped` in the main thread, so the
  ``with LocalCluster(...)`` block unwinds and stops every process as Ctrl-C does;
* SIGKILL (or a crash), where no code of ours runs: each child is started with
  :func:`parent_death_signal` as its ``preexec_fn``, so the kernel signals it when we die
  (Linux ``PR_SET_PDEATHSIG``). Celery's prefork children already die with their worker process
  (Celery sets the same for them), so the whole tree goes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Stopped(BaseException):
    """The command was asked to stop by a signal. A BaseException, like KeyboardInterrupt: the
    ``except Exception`` of code it interrupts (a readiness poll, a retry loop) must not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block, the first of ``signums`` raises :class:`Stopped` in the main thread.

    After that first signal these signals and SIGINT are ignored until the block ends, so a second
    SIGTERM or Ctrl-C cannot cut the cleanup short and leave processes behind. Main thread only
    (Python runs signal handlers there). The previous handlers are restored on exit.
    """
    quiet = (*signums, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in quiet}

    def handler(signum: int, _frame: object) -> None:
        for other in quiet:
            signal.signal(other, signal.SIG_IGN)
        raise Stopped(signum)

    for signum in signums:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def parent_death_signal(signum: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child sent ``signum`` when this process dies; None where it
    cannot be trusted.

    The kernel sends it when the *thread* that forked the child ends, not the process: armed from
    any thread but the main one, a child would be killed as soon as that thread finished. So this
    answers None off the main thread (and off Linux), and callers there get no guard. A parent that
    died between the fork and the ``prctl`` would never send the signal: the child checks that its
    parent is still the one that forked it, and sends the signal to itself otherwise.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # looked up here: the child only calls it
    prctl = libc.prctl
    parent = os.getpid()

    def arm() -> None:
        if prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            return  # no guard (e.g. a seccomp policy forbids it): the signal handlers still stop us
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)
    return arm
