"""Run a command as a process group that ends with the process that started it.

    python -m benchmark.guard CMD [ARG ...]

``benchmark.dashboard`` starts ``mlflow server`` through this guard, so the server ends
when the dashboard ends, however it ends (Ctrl-C, ``kill``, even SIGKILL, which no handler
can catch).  The guard is started with :func:`spawn`: in a new session (its own process
group, which its command and the command's children, e.g. MLflow's uvicorn, join) and with
a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)``), which the kernel sends
it when its parent dies.  On SIGTERM, SIGINT or SIGHUP the guard terminates its whole
group and waits for every descendant (it is their subreaper, so grandchildren orphaned by
their parent's exit are still its to wait for), killing what is left after 10 s.  Where
there is no ``prctl`` (not Linux) it polls its parent instead.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _libc_prctl() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: in the child, ask for SIGTERM when the parent dies; if the parent
    died already (before the request took effect), exit at once."""
    prctl = _libc_prctl()  # looked up before the fork: the child only calls it

    def arm() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arm


def spawn(command: list[str], **popen_kwargs) -> subprocess.Popen:
    """Start ``command`` under a guard: a new process group that ends with this process."""
    return subprocess.Popen([sys.executable, "-m", "benchmark.guard", *command], start_new_session=True,
                            preexec_fn=die_with_parent(os.getpid()), **popen_kwargs)


def stop_group(timeout: float = 10.0) -> None:
    """SIGTERM this process's group (the guard itself ignores it), wait for every
    descendant, SIGKILL the group (the guard included) if any outlives ``timeout``; exit."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.05)
        except ChildProcessError:  # none left
            os._exit(0)
    os.killpg(0, signal.SIGKILL)


def _watch_parent(parent: int, on_gone: Callable[[], None]) -> None:
    """Without a parent-death signal: notice the parent's end by polling (once a second)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    on_gone()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m benchmark.guard CMD [ARG ...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    prctl = _libc_prctl()
    if prctl is not None:
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: stop_group())
    child = subprocess.Popen(argv)
    if prctl is None:
        threading.Thread(target=_watch_parent, args=(parent, lambda: os.kill(os.getpid(), signal.SIGTERM)),
                         daemon=True).start()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
