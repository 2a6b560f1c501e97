"""coursekit.forks: the exit that the zygote and fresh workers take."""
from __future__ import annotations

import subprocess
import sys


def test_exit_now_runs_atexit_handlers_flushes_and_keeps_the_status():
    # The zygote and a fresh worker leave through exit_now, skipping the interpreter's teardown
    # (a second with torch loaded); what an ordinary exit does that matters must still happen.
    code = ("import atexit, sys\n"
            "from coursekit.forks import exit_now\n"
            "atexit.register(lambda: print('atexit ran'))\n"
            "sys.stdout.write('buffered, no newline')\n"
            "sys.stderr.write('on stderr')\n"
            "exit_now(3)\n"
            "print('never reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "buffered, no newlineatexit ran\n"
    assert proc.stderr == "on stderr"
