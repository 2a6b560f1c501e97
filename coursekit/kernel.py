"""The student's process: a Jupyter kernel started through jupyter_client.

The grader runs the notebook's cells in it by sending code to execute and reading
the messages that come back, then starts the runtime's serve loop (the requests
themselves go over coursekit.channel). Everything that waits on it has a deadline;
a kernel that misses one is interrupted, and killed with its whole process group
if it does not answer.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from queue import Empty

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec

from coursekit.isolation import launcher, write_plan
from coursekit.sandbox import read_status, remove_control_groups

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_CAPTURED_OUTPUT = 64 * 1024


class KernelTimeout(Exception):
    """The student's code did not finish in time; the kernel was interrupted or killed."""


class KernelDied(Exception):
    """The student's process exited (sys.exit, os._exit, a crash, out of memory)."""


@dataclass
class Execution:
    status: str = "ok"                 # "ok" or "error"
    execution_count: int | None = None
    error_name: str = ""
    error_value: str = ""
    traceback: str = ""
    output: str = ""                   # captured stdout/stderr, bounded
    output_dropped: int = 0


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class StudentKernel:
    """One kernel for one submission. ``env`` and ``cwd`` are the student's; ``plan``
    is its sandbox (coursekit.isolation.sandbox_plan): limits, user, what it sees."""

    def __init__(self, cwd: str, env: dict[str, str], plan: dict | None = None, startup_timeout: float = 120.0):
        self.cwd = cwd
        self.env = env
        self.plan = plan or {"workdir": cwd, "writable": [cwd]}
        self.startup_timeout = startup_timeout
        self.sandbox: dict = {}            # what the launcher achieved, read before student code runs
        self.km: KernelManager | None = None
        self.kc = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        # Unix sockets in the student's folder rather than TCP ports any local process could reach.
        km = KernelManager(transport="ipc", ip=os.path.join(self.cwd, ".kernel"),
                           connection_file=os.path.join(self.cwd, ".kernel.json"))
        km._kernel_spec = KernelSpec(
            argv=[*launcher(write_plan(self.plan)), sys.executable, "-m", "ipykernel_launcher",
                  "-f", "{connection_file}"],
            display_name="student", language="python",
        )
        km.start_kernel(cwd=self.cwd, env=self.env)
        kc = km.client()
        kc.start_channels()
        try:
            self._wait_until_ready(km, kc)
        except RuntimeError as exc:
            km.shutdown_kernel(now=True)
            raise KernelDied(f"the student's kernel did not start: {exc}") from None
        self.km, self.kc = km, kc
        self.sandbox = read_status(self.cwd)

    def _wait_until_ready(self, km: KernelManager, kc) -> None:
        """jupyter_client's wait_for_ready without its last step, which listens until IOPub has
        been quiet for 0.2 s: half of every kernel's start, and the first kernel of a batch is on
        the batch's critical path. What that step would have drained (the status messages of the
        kernel_info requests) answers no request of execute(), which skips it. The kernel is the
        course's own ipykernel, so its protocol version needs no adapting."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            kc.kernel_info()
            try:
                reply = kc.get_shell_msg(timeout=1)
            except Empty:
                pass
            else:
                if reply["msg_type"] == "kernel_info_reply":
                    try:
                        kc.get_iopub_msg(timeout=0.2)   # IOPub hears the kernel: requests can start
                        return
                    except Empty:
                        pass   # subscribed too late for this reply's messages: ask again
            if not km.is_alive():
                raise RuntimeError("Kernel died before replying to kernel_info")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kernel didn't respond in {self.startup_timeout:.0f} seconds")

    def shutdown(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            try:
                self._terminate()
                self.km.shutdown_kernel(now=True)
            finally:
                self._kill_group()
                self._remove_control_groups()
        self.km = self.kc = None

    def _terminate(self) -> None:
        """Where the kernel runs in its sandbox's namespaces, the process jupyter_client started is
        coursekit.forge's relay or coursekit.sandbox's launcher, and SIGTERM has either end the
        kernel at once (the launcher then removes its control groups and exits). jupyter_client's
        own SIGKILL leaves that to the launcher's next look at its grader, and then polls for the
        end every 0.1 s: together a quarter of a second of every submission. Without namespaces the
        process is the kernel itself, which shutdown_kernel kills."""
        process = self._started_process()
        if not self.sandbox.get("namespaces") or process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass   # shutdown_kernel kills it

    def _started_process(self) -> subprocess.Popen | None:
        """The process jupyter_client started (the launcher, the relay, or the kernel itself)."""
        return getattr(getattr(self.km, "provisioner", None), "process", None)

    def _remove_control_groups(self) -> None:
        groups = self.sandbox.get("control_group")
        if isinstance(groups, str):
            remove_control_groups(groups, wait=5.0)

    def _kill_group(self) -> None:
        """Kill what the kernel left behind: every process of its session."""
        import signal

        provisioner = getattr(self.km, "provisioner", None)
        pgid = getattr(provisioner, "pgid", None)
        if pgid:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def is_alive(self) -> bool:
        """Asked before every request: the launcher's process, polled directly, answers in
        microseconds where jupyter_client's is_alive (an event-loop round trip) takes longer
        than the request itself. The launcher lives exactly as long as the kernel."""
        if self.km is None:
            return False
        process = self._started_process()
        return process.poll() is None if process is not None else self.km.is_alive()

    # -- execution ------------------------------------------------------------------

    def execute(self, code: str, timeout: float, store_history: bool = False) -> Execution:
        """Run ``code``; raise KernelTimeout or KernelDied if it does not finish."""
        if not self.is_alive():
            raise KernelDied("the student's process is not running")
        msg_id = self.kc.execute(code, store_history=store_history, allow_stdin=False, stop_on_error=False)
        deadline = time.monotonic() + max(timeout, 0.05)
        result = Execution()
        chunks: list[str] = []
        captured = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._recover_from_timeout(msg_id)
                raise KernelTimeout(f"did not finish within {timeout:.0f} s")
            try:
                msg = self.kc.get_iopub_msg(timeout=min(remaining, 1.0))
            except Empty:
                if not self.km.is_alive():
                    raise KernelDied("the student's process exited") from None
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content.get("execution_state") == "idle":
                break
            if kind == "stream":
                text = content.get("text", "")
                room = MAX_CAPTURED_OUTPUT - captured
                chunks.append(text[:room])
                captured += min(len(text), max(room, 0))
                result.output_dropped += max(len(text) - max(room, 0), 0)
            elif kind == "error":
                result.status = "error"
                result.error_name = str(content.get("ename", ""))
                result.error_value = str(content.get("evalue", ""))
                result.traceback = strip_ansi("\n".join(map(str, content.get("traceback", []))))
            elif kind == "execute_input":
                result.execution_count = content.get("execution_count")
        result.output = strip_ansi("".join(chunks))
        return result

    def submit(self, code: str) -> None:
        """Start ``code`` without waiting for it: the runtime's serve loop, which runs
        until the grader closes its channel."""
        if not self.is_alive():
            raise KernelDied("the student's process is not running")
        self.kc.execute(code, store_history=False, allow_stdin=False, stop_on_error=False)

    def interrupt(self) -> None:
        """SIGINT to the kernel: a KeyboardInterrupt in the student's code in flight."""
        if self.is_alive():
            self.km.interrupt_kernel()

    def _recover_from_timeout(self, msg_id: str) -> None:
        """Interrupt (KeyboardInterrupt in the student's code); if the kernel does not
        go idle within a few seconds, kill it: the caller restarts it."""
        self.km.interrupt_kernel()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except Empty:
                continue
            if (msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"].get("execution_state") == "idle"):
                return
        self.shutdown()
