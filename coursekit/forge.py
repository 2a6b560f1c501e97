"""``python -m coursekit.forge serve SOCKET IMPORTS``: where a batch's student kernels come from.

A student's kernel is a fresh Python that imports ipykernel, torch and what the lab's
notebook imports: seconds of CPU per submission, on the cores that grade. The forge
makes those imports once per batch (IMPORTS: JSON pairs as coursekit.preload takes
them), outside any sandbox, then forks each kernel on request. The fork builds the
walls of its plan around itself (coursekit.sandbox.launch: control group, namespaces,
read-only file system, no capabilities, the student's user and limits) and becomes
the kernel, with the student's environment, folder and standard streams.

So that a fork holds nothing of the grader or of another student, the forge never
reads a notebook, runs a student's code or touches a GPU (a CUDA context does not
survive a fork), and it starts with an environment as bare as a student's (its
parent, coursekit.zygote, gives it one): each kernel is a copy of the forge as it
was before any submission. It ends with its parent.

Protocol, one request per connection on SOCKET (a Unix socket in a folder only the
grader can reach): a 4-byte length and a JSON object {"plan": PLAN_PATH, "argv":
[PYTHON, "-m", MODULE, ...], "env": {...}, "cwd": DIR}, the requester's standard
streams passed along as file descriptors; one JSON line back, {"pid": KERNEL_PID}
or {"fallback": WHY} (the namespaces were refused: the requester then launches the
kernel itself, as without a forge). The connection stays open while the kernel
runs: when the requester goes, the kernel is killed. The requester is
``python -m coursekit.forge relay SOCKET PLAN -- ARGV``, the process jupyter_client
starts for the kernel, which stands in for it (see relay).
"""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import threading

from coursekit.forks import ChildExits, in_fork
from coursekit.sandbox import ORPHAN_POLL_SECONDS, die_with_parent, launch, leave_control_groups, signal_kernel

REPLY_SECONDS = 120   # for the forge to answer: it may still be importing


# -- the requester's side -------------------------------------------------------------

def relay(forge: str, plan_path: str, argv: list[str]) -> None:
    """Have the forge at `forge` fork the kernel `argv` (``python -m MODULE ...``) in the
    sandbox of `plan_path`, then stand in for it as the process jupyter_client started:
    interrupts are passed on, this process ends when the kernel does, and if the grader
    goes first the kernel is killed. Where the forge cannot make the kernel, this process
    launches it itself (coursekit.sandbox), as without a forge."""
    with open(plan_path) as handle:
        plan = json.load(handle)
    if plan.get("sandbox", True) and len(argv) >= 3 and argv[1] == "-m" and hasattr(os, "pidfd_open"):
        _relay(forge, plan_path, argv)
    launch(plan, argv)


def _relay(forge: str, plan_path: str, argv: list[str]) -> None:
    grader = os.getppid()
    request = json.dumps({"plan": os.path.abspath(plan_path), "argv": argv,
                          "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(forge)
        socket.send_fds(sock, [struct.pack("!I", len(request)) + request], [0, 1, 2])
        reply = _read_reply(sock, grader)
    except OSError:
        reply = None
    if not reply or "pid" not in reply:
        sock.close()
        return
    kernel = reply["pid"]
    try:
        ended = os.pidfd_open(kernel)
    except OSError:
        os._exit(1)
    signal.signal(signal.SIGINT, lambda *_: signal_kernel(kernel, ended, signal.SIGINT))
    signal.signal(signal.SIGTERM, lambda *_: (signal_kernel(kernel, ended, signal.SIGKILL), os._exit(1)))
    while True:
        if select.select([ended], [], [], ORPHAN_POLL_SECONDS)[0]:
            os._exit(0)
        if os.getppid() != grader:
            signal_kernel(kernel, ended, signal.SIGKILL)
            os._exit(1)


def _read_reply(sock: socket.socket, grader: int) -> dict | None:
    data = b""
    for _ in range(int(REPLY_SECONDS / ORPHAN_POLL_SECONDS)):
        if os.getppid() != grader:
            os._exit(1)   # the grader is gone; the forge's launcher sees this connection close
        if not select.select([sock], [], [], ORPHAN_POLL_SECONDS)[0]:
            continue
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
        if b"\n" in data:
            return json.loads(data.split(b"\n", 1)[0])
    return None


# -- the forge --------------------------------------------------------------------------

class Forge:
    def __init__(self, listener: socket.socket):
        self.listener = listener
        self.parent = os.getppid()
        self.exits = ChildExits()
        self.own = [listener.fileno(), *self.exits.fds]

    def run(self) -> int:
        while os.getppid() == self.parent:
            ready, _, _ = select.select([self.listener, self.exits.fd], [], [], 1.0)
            if self.exits.fd in ready:
                self.exits.drain()
            self.reap()
            if self.listener in ready:
                conn, _ = self.listener.accept()
                try:
                    self.handle(conn)
                except (OSError, ValueError):
                    pass   # a broken request: its requester sees the connection close, and falls back
                finally:
                    conn.close()
        return 0

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        try:
            if len(data) < 4 or len(fds) != 3:
                raise ValueError("a request is a length, a JSON object and three streams")
            size = struct.unpack("!I", data[:4])[0]
            while len(data) < 4 + size:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    raise ValueError("the request ended early")
                data += chunk
            request = json.loads(data[4:4 + size])
            if os.fork() == 0:
                _launcher(conn, request, fds, self.own)
        finally:
            for fd in fds:
                os.close(fd)

    def reap(self) -> None:
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    return
            except ChildProcessError:
                return


def _launcher(conn: socket.socket, request: dict, fds: list[int], own: list[int]) -> None:
    """In the fork: coursekit.sandbox's launcher, whose kernel is forked rather than exec'd.
    Never returns into the forge."""
    def work() -> int:
        forge = os.getppid()
        with open(request["plan"]) as handle:
            plan = json.load(handle)

        def started(pid: int | None, status: dict) -> None:
            if pid is None:
                _send(conn, {"fallback": status.get("why", "")})
                leave_control_groups(status.get("control_group"))
                os._exit(0)
            _send(conn, {"pid": pid})

        def wanted() -> bool:
            return os.getppid() == forge and not _closed(conn)

        launch(plan, request["argv"], start=lambda: _become_kernel(conn, request, fds),
               wanted=wanted, started=started)
        return 70   # launch() returns in neither the launcher nor the kernel

    in_fork(work, own, finish=False)


def _become_kernel(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Inside the walls, as the student's user: what exec'ing ``python -m MODULE ARGS`` in
    the student's folder, with the student's environment and streams, would have been."""
    def work() -> int:
        import runpy

        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        # What the forge's imports derived from its own environment and kept: the temporary folder
        # (peft asks for it at import) must be the student's again, not the forge's, which the
        # student cannot see.
        tempfile.tempdir = None
        # numpy's global generator was seeded once, in the forge: every kernel would draw the same
        # numbers. Fresh entropy, as a fresh interpreter has (Python's `random` reseeds itself after
        # a fork; torch's generator starts from the same fixed seed in every process anyway).
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
        threads = request["env"].get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            import torch

            torch.set_num_threads(int(threads))
        argv = request["argv"]
        sys.argv = [argv[2], *argv[3:]]
        sys.path[0] = request["cwd"]   # as `python -m` in that folder would have it
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        return 0

    in_fork(work, [conn.detach()])


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass


def _closed(conn: socket.socket) -> bool:
    """The requester has gone (it never writes after its request)."""
    try:
        if not select.select([conn], [], [], 0)[0]:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def serve(path: str, imports: str) -> int:
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:
        return 0
    # Listening before the imports: a kernel asked for meanwhile waits for them, not for a timeout.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)   # the name appears once it listens: coursekit.zygote waits for it
    import ipykernel.ipkernel  # noqa: F401
    import ipykernel.kernelapp  # noqa: F401

    import coursekit.runtime  # noqa: F401  (torch with it)
    from coursekit.preload import preload

    preload([tuple(pair) for pair in json.loads(imports)])
    if threading.active_count() != 1:
        # A fork copies only the thread that forks: a lock another Python thread held would stay
        # held. (torch's OpenMP pool starts a native thread at import; it is remade after a fork,
        # as every fork of coursekit.zygote relies on too.)
        print("coursekit.forge: an import started a thread; kernels are not forked", file=sys.stderr)
        return 3
    gc.freeze()   # see coursekit.zygote: the same holds for every kernel forked from here
    return Forge(listener).run()


if __name__ == "__main__":
    if sys.argv[1] == "relay":   # relay SOCKET PLAN -- ARGV
        relay(sys.argv[2], sys.argv[3], sys.argv[sys.argv.index("--") + 1:])
    sys.exit(serve(sys.argv[2], sys.argv[3]))   # serve SOCKET IMPORTS
