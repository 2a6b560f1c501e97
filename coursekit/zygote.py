"""``python -m coursekit.zygote KERNEL_IMPORTS [SUITE_DIR ...]``: where a batch's local grader workers come from.

Starting a grader worker is mostly importing torch, transformers, pytest, the engine
and what the hidden suites import: seconds of CPU per submission, on the same cores
that grade. The zygote does those imports once per batch, then forks one worker per
submission on request. Each fork is a fresh process that serves exactly one
submission (coursekit.worker.serve) and exits, so nothing of one submission reaches
another; the zygote itself never reads a notebook, starts a kernel or touches a GPU (a
CUDA context does not survive a fork), it only forks, forwards lines and reports exits.

Protocol, one JSON object per line. In (stdin, from coursekit.runners.LocalRunner):
  {"spawn": ID, "line": "..."}   fork worker ID, its stdin's first line already written
  {"send": ID, "line": "..."}    the worker's last line (its job, or "" for none)
  {"kill": ID}                   SIGKILL it (a submission past its time limit)
Out (stdout): {"exited": ID, "status": CODE}, CODE as subprocess reports it (negative:
killed by that signal). EOF on stdin: the batch is over or its process died; the zygote
exits, and its workers with it (coursekit.worker.exit_with_parent), and their kernels
with them (coursekit.sandbox).

The batch's student kernels come from a second process the zygote starts, the forge
(coursekit.forge, KERNEL_IMPORTS being what it imports for them): kernels never fork
from the zygote, which holds the grader's engine and the suites' imports.
"""
from __future__ import annotations

import gc
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from coursekit.forks import ChildExits, exit_now, in_fork
from coursekit.isolation import remove_scratch, scratch_dir, student_isolation


class Zygote:
    def __init__(self, requests: int, replies: int):
        self.requests, self.replies = requests, replies
        self.pending = b""
        self.pipes: dict[int, int] = {}      # worker id -> write end of its stdin
        self.pids: dict[int, int] = {}       # pid -> worker id
        self.exits = ChildExits()   # a worker's exit wakes the loop at once (the batch is waiting for it)
        self.own = [self.requests, self.replies, *self.exits.fds]

    def run(self) -> int:
        while True:
            ready, _, _ = select.select([self.requests, self.exits.fd], [], [], 1.0)
            if self.exits.fd in ready:
                self.exits.drain()
            self.reap()
            if self.requests not in ready:
                continue
            chunk = os.read(self.requests, 1 << 16)
            if not chunk:
                return 0
            self.pending += chunk
            *lines, self.pending = self.pending.split(b"\n")
            for line in lines:
                if line.strip():
                    self.handle(json.loads(line))

    def handle(self, request: dict) -> None:
        if "spawn" in request:
            self.spawn(request["spawn"], request["line"])
        elif "send" in request:
            fd = self.pipes.pop(request["send"], None)
            if fd is not None:
                _write_all(fd, request["line"] + "\n")
                os.close(fd)
        elif "kill" in request:
            for pid, worker in self.pids.items():
                if worker == request["kill"]:
                    os.kill(pid, signal.SIGKILL)

    def spawn(self, worker: int, first_line: str) -> None:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write)
            _become_worker(read, [*self.own, *self.pipes.values()])
        os.close(read)
        _write_all(write, first_line + "\n")
        self.pipes[worker], self.pids[pid] = write, worker

    def reap(self) -> None:
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.pids.pop(pid, None)
            if worker is not None:
                remove_scratch(pid)   # what a worker killed mid-submission left in the temporary folder
                fd = self.pipes.pop(worker, None)
                if fd is not None:
                    os.close(fd)
                self.reply({"exited": worker, "status": os.waitstatus_to_exitcode(status)})

    def end(self) -> None:
        """The batch is over or gone: workers still running go, with what they left."""
        for pid in list(self.pids):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            remove_scratch(pid)
        self.pids.clear()

    def reply(self, message: dict) -> None:
        _write_all(self.replies, json.dumps(message) + "\n")


def _become_worker(stdin: int, inherited: list[int]) -> None:
    """In the fork: shed the zygote's pipes, serve one submission, never return."""
    def work() -> int:
        os.dup2(stdin, 0)
        os.close(stdin)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)   # until the worker opens its log: nothing may reach the zygote's replies
        os.close(devnull)
        from coursekit.worker import exit_with_parent, serve

        exit_with_parent()
        with os.fdopen(0, "r", closefd=False) as lines:
            return serve(lines)

    in_fork(work, inherited)


def _write_all(fd: int, text: str) -> None:
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]


def preimport(suite_dirs: list[str]) -> None:
    """What the batch's hidden suites import (`import x`, `from x import y`, wherever they
    are, and `pytest.importorskip`): seconds per submission otherwise. Only the imports are
    run here, never a suite's own code."""
    from coursekit.preload import preload, suite_imports

    for folder in suite_dirs:
        for path in sorted(Path(folder).glob("*.py")):
            try:
                preload(suite_imports(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue


def main(kernel_imports: str, student: str, suite_dirs: list[str]) -> int:
    # Replies go out on a copy of stdout; fd 1 itself goes to stderr, so that nothing an
    # import prints can be taken for a reply.
    replies = os.dup(1)
    os.dup2(2, 1)
    folder = scratch_dir("forge")   # only the grader's user can reach it
    try:
        start_forge(folder, kernel_imports)
        # Whether students can run as the course's student user is probed once here, for every
        # worker to inherit (each probed it for itself: a sandboxed interpreter, 0.25 s), and
        # while the imports below run: the probe mostly waits for its interpreter.
        course_root, student_user = json.loads(student)
        probe = threading.Thread(target=student_isolation, args=(Path(course_root), student_user))
        probe.start()
        # What every worker needs, imported once for all of them (transformers only where a suite
        # imports it: preimport).
        import pytest  # noqa: F401
        import torch  # noqa: F401

        import coursekit.worker  # noqa: F401

        preimport(suite_dirs)
        probe.join()   # a fork copies only the thread that forks
        # What is imported lives as long as the process: out of the collector's sight, a worker's
        # collections no longer walk it (pytest's end of session alone collected 0.3 s of it per
        # submission) nor dirty its shared pages.
        gc.freeze()
        zygote = Zygote(0, replies)
        try:
            return zygote.run()
        finally:
            zygote.end()
    finally:
        shutil.rmtree(folder, ignore_errors=True)   # only the zygote gets here: its forks never return


FORGE_START_SECONDS = 30   # without a forge listening by then, kernels start afresh


def start_forge(folder: str, kernel_imports: str) -> subprocess.Popen:
    """The batch's kernels are forked from a forge (coursekit.forge), a child of this process
    that ends with it, started with an environment as bare as a student's."""
    from coursekit.isolation import student_environment, use_forge

    path = os.path.join(folder, "forge.sock")
    # Its imports may read these at import time (matplotlib's cache, Hugging Face's home):
    # a folder of the forge's own, which no kernel needs to write.
    env = student_environment(Path(folder), Path(folder))
    forge = subprocess.Popen([sys.executable, "-m", "coursekit.forge", "serve", path, kernel_imports], cwd=folder,
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    # Kernels are sent to it once it listens (it does so before its imports: a fraction of a second).
    deadline = time.monotonic() + FORGE_START_SECONDS
    while not os.path.exists(path) and forge.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if os.path.exists(path):
        use_forge(path)
    return forge


if __name__ == "__main__":
    exit_now(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
