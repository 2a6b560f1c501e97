"""What the two processes that fork others share (coursekit.zygote, coursekit.forge):
waking up when a child exits, running a fork's work without ever returning into the
forking process's own code, and exiting without the interpreter's teardown."""
from __future__ import annotations

import atexit
import os
import signal
import sys
import traceback
from typing import Callable, NoReturn


class ChildExits:
    """A pipe that becomes readable when a child exits (SIGCHLD, through the signal
    wake-up descriptor), for a select() loop that must reap at once."""

    def __init__(self):
        self.fd, write = os.pipe()
        os.set_blocking(write, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(write)
        self.fds = [self.fd, write]   # what a fork must close

    def drain(self) -> None:
        os.read(self.fd, 1 << 12)


def in_fork(work: Callable[[], int], inherited: list[int], finish: bool = True) -> NoReturn:
    """In a process just forked: forget the parent's SIGCHLD wake-up, close the parent's
    descriptors `inherited`, run `work` (its result is the exit status) and exit, whatever
    happens: this never returns into the parent's code. `finish`: run the atexit handlers
    and flush the streams first (a process that became a worker or a kernel)."""
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in inherited:
            os.close(fd)
        code = work()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001  whatever it was, this process must not return into its parent's code
        traceback.print_exc()
    finally:
        if finish:
            exit_now(code)
        os._exit(code)


def exit_now(code: int) -> NoReturn:
    """Exit as the interpreter would (atexit handlers run, streams flushed) but without its
    teardown of every module, which takes about a second once torch and transformers are
    loaded: a batch waits for that at its end (the zygote), a worker started afresh per
    submission (Docker, Ray)."""
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
