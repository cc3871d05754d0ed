"""`spillway worker` keeps its Celery worker running: the worker runs as a child process and is
started again if it dies on its own. (`spillway serve --processes N` keeps N serve processes
running the same way.)

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


def supervise(
    argv: list[str], *, copies: int = 1, name: str = "worker", pass_fds: tuple[int, ...] = ()
) -> int:
    """Run `copies` processes of `argv` until they exit by request (or cleanly); restart one
    that dies on its own. `pass_fds`: descriptors each child inherits (serve's listening
    socket). Returns the exit status for the supervisor (128 + N for a child killed by signal
    N; the first failure's, when there are several)."""
    stopping = False
    children: list[subprocess.Popen[bytes] | None] = [None] * copies

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child is not None and child.poll() is None:
                child.send_signal(_FORWARD_AS[signal.Signals(signum)])

    def start(i: int) -> None:
        children[i] = subprocess.Popen(argv, preexec_fn=_die_with_parent(os.getpid()), pass_fds=pass_fds)
        if stopping:  # the stop came while this child was starting: `forward` saw the old one
            children[i].send_signal(signal.SIGTERM)

    for signum in _FORWARD_AS:
        signal.signal(signum, forward)
    recent: deque[float] = deque(maxlen=RESTARTS_PER_MINUTE)  # deaths of any of the children
    status = 0  # the first child's that ended with a failure, not started again
    for i in range(copies):
        start(i)
    while any(child is not None for child in children):
        for i, child in enumerate(children):
            code = _exited(child)
            if code is None:
                continue
            children[i] = None
            failed = 128 - code if code < 0 else code
            if stopping or code == 0:
                # a child still starting when the stop came dies of it: stopped as asked
                stopped = stopping and -code in {int(s) for s in _FORWARD_AS.values()}
                status = status or (0 if stopped else failed)
                continue
            now = time.monotonic()
            if len(recent) == recent.maxlen and now - recent[0] < 60:
                _say(name, f"{describe_exit(code)}: {len(recent) + 1} deaths within a minute; giving up")
                status = status or failed
                forward(signal.SIGTERM, None)  # the others stop too
                continue
            recent.append(now)
            _say(name, f"{describe_exit(code)}; starting it again")
            time.sleep(RESTART_PAUSE_S)
            if stopping:  # asked to stop during the pause: start nothing new
                status = status or failed
            else:
                start(i)
    return status


def _exited(child: subprocess.Popen[bytes] | None) -> int | None:
    """The child's exit code if it exits within a tenth of a second, else None (the children
    are looked at in turn; a signal to the supervisor runs its handler meanwhile)."""
    if child is None:
        return None
    try:
        return child.wait(timeout=0.1)
    except subprocess.TimeoutExpired:
        return None


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


def _say(name: str, message: str) -> None:
    print(f"spillway {name}: the {name} {message}", file=sys.stderr, flush=True)
