"""No student process outlives its grader: `course grade` killed with SIGKILL in the
middle of a submission takes its zygote and worker, the forge and the sandboxed kernel
forked from it, what the notebook started (a daemon in its own session included) and
their control groups with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import TOY, toy_notebook
from tests.test_hostile import control_groups, sandbox_contains

MARKER = f"coursekit-orphan-{uuid.uuid4().hex[:8]}"
CELLS = [
    ("import subprocess, sys, time", None),
    (f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(900)', '{MARKER}'], "
     "start_new_session=True)", None),
    ("time.sleep(300)", None),  # the kernel is busy here when the batch is killed
]


def processes(text: str) -> set[int]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(int(pid))
        except OSError:
            pass
    return found


def parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_killing_the_batch_kills_every_student_process(tmp_path, write_notebook):
    why = sandbox_contains()
    assert not (why and os.geteuid() == 0), why  # as root (CI) the sandbox must be there
    if why:
        pytest.skip(f"this machine does not let the grader build the sandbox: {why}")
    notebook = write_notebook(toy_notebook(CELLS), name="victim.ipynb")
    batch = subprocess.Popen([sys.executable, "-m", "coursekit.cli", "--course", str(TOY / "course.yaml"),
                              "grade", str(notebook), "--out", str(tmp_path / "out"), "--workers", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: processes(MARKER), 120), "the notebook's daemon never started"
        # The daemon's parent is the kernel, forked (as the launcher's child) from the batch's forge,
        # a child of the zygote; the process jupyter_client started for the kernel, which stands in
        # for it (coursekit.forge.relay), is a child of the grader worker, another fork of the zygote.
        kernel = parent(next(iter(processes(MARKER))))
        launcher = parent(kernel)
        forge = parent(launcher)
        assert {kernel, launcher} <= processes("coursekit.forge"), "the kernel was not forked from the forge"
        groups = {g for g in control_groups() if g.name == f"coursekit-{launcher}"}
        assert groups, "the kernel has no control group"
        stand_in = next(iter(processes("course-student-") & processes("\0relay\0")))
        worker = parent(stand_in)
        zygote = parent(worker)
        assert parent(forge) == zygote and processes("coursekit.zygote") >= {zygote} and parent(zygote) == batch.pid
        ours = {kernel, launcher, forge, stand_in}
        left = lambda: list(Path(tempfile.gettempdir()).glob(f"course-*-{worker}-*"))  # noqa: E731
        assert left(), "the worker's folders are not named for it"
        os.kill(batch.pid, signal.SIGKILL)
        batch.wait()
        assert wait_for(lambda: not processes(MARKER), 15), "the notebook's daemon outlived the batch"
        assert wait_for(lambda: not (processes("coursekit") & ours), 15), \
            "the sandboxed kernel, its launcher, the forge or the kernel's stand-in outlived the batch"
        assert wait_for(lambda: not (processes("coursekit") & {worker, zygote}), 15), \
            "the grader's worker or zygote outlived the batch"
        assert wait_for(lambda: not (control_groups() & groups), 15), \
            f"control groups left behind: {control_groups() & groups}"
        # Nor the folders the worker and its kernel worked in.
        assert wait_for(lambda: not left(), 15), f"folders left behind: {left()}"
    finally:
        if batch.poll() is None:
            batch.kill()
        for pid in processes(MARKER):
            os.kill(pid, signal.SIGKILL)
