"""`spillway worker` keeps its Celery worker running: the worker runs as a child process and is
started again if it dies on its own.

A threads-pool worker on the Redis broker can die ("Unrecoverable error") or go quiet for good
(celery/celery#8030, #8091) after the broker vanishes; the watchdog (`workers/watchdog.py`) turns the quiet
case into an exit. A restarted worker reconnects, and the messages the dead one held come
back (unacked restore, or the reconciler). A stop asked for (SIGTERM, SIGINT, SIGQUIT) is
passed on and ends the supervisor too; a worker that keeps dying is given up after a few tries
a minute.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from types import FrameType

RESTARTS_PER_MINUTE = 5
RESTART_PAUSE_S = 1.0

# Ctrl-C in a terminal already reaches the child (same process group), and Celery takes a
# second SIGINT as "cold shutdown: kill the running calls". So a SIGINT is passed on as SIGTERM,
# Celery's other warm shutdown; a second Ctrl-C still reaches the child as its own SIGINT.
_FORWARD_AS = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGTERM, signal.SIGQUIT: signal.SIGQUIT}


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def supervise(argv: list[str]) -> int:
    """Run `argv` until it exits by request (or cleanly); restart it when it dies on its own.
    Returns the exit status for the supervisor (128 + N for a child killed by signal N)."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(_FORWARD_AS[signal.Signals(signum)])

    for signum in _FORWARD_AS:
        signal.signal(signum, forward)
    recent: deque[float] = deque(maxlen=RESTARTS_PER_MINUTE)
    while True:
        child = subprocess.Popen(argv, preexec_fn=_die_with_parent(os.getpid()))
        if stopping:  # the stop came while this child was starting: `forward` saw the old one
            child.send_signal(signal.SIGTERM)
        code = child.wait()
        status = 128 - code if code < 0 else code
        if stopping or code == 0:
            return status
        now = time.monotonic()
        if len(recent) == recent.maxlen and now - recent[0] < 60:
            _say(f"the worker {describe_exit(code)}: {len(recent) + 1} deaths within a minute; giving up")
            return status
        recent.append(now)
        _say(f"the worker {describe_exit(code)}; starting it again")
        time.sleep(RESTART_PAUSE_S)
        if stopping:  # asked to stop during the pause: start nothing new
            return status


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """For the child, before it runs Celery: a SIGTERM (Celery's warm shutdown) when the
    supervisor dies, even by SIGKILL, so no worker is left running under a name a restarted
    one will take. Linux only; elsewhere the child outlives a killed supervisor."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _say(message: str) -> None:
    print(f"spillway worker: {message}", file=sys.stderr, flush=True)
