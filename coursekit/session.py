"""One submission's student process, from the grader's side.

The session starts the kernel, loads the runtime, runs the notebook's gradable
cells (recording, not stopping at, the cells that raise), and then answers the
proxy's requests under the deadline of the test in flight. A kernel that hangs or
dies is restarted and the notebook run again, so one bad call costs only the
tests that were waiting on it.
"""
from __future__ import annotations

import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from coursekit import wire
from coursekit.channel import ChannelClosed, ChannelTimeout, GraderChannel
from coursekit.errors import StudentCrashed, StudentTimeout
from coursekit.isolation import scratch_dir
from coursekit.kernel import Execution, KernelDied, KernelTimeout, StudentKernel
from coursekit.notebook import Cell
from coursekit.outcomes import MEMORY_ERRORS, CellError, SessionLog
from coursekit.sandbox import describe

MAX_RESTARTS = 3
_RUNTIME_BOOT = "import coursekit.runtime as _ck_rt; _ck_rt.install(get_ipython()); del _ck_rt"
# The kernel's last execution: it serves the grader's requests until the channel closes.
_SERVE = "__import__('coursekit.runtime').runtime.current.serve({path!r}, {token!r})"
CHANNEL_SECONDS = 60     # for the kernel to connect once the notebook has run
RECOVER_SECONDS = 5      # for an interrupted call to answer before the kernel is killed


class GradingSession:
    def __init__(self, cells: list[Cell], workdir: Path, env: dict[str, str], submission_seconds: float,
                 kernel_options: dict | None = None, cell_seconds: float | None = None,
                 reference_cell_seconds: float | None = None, kernel: StudentKernel | None = None):
        """`kernel`: one started ahead for this session (start_kernel, same folder and
        options), while the submission before was graded; it serves this one alone."""
        self.cells = cells
        self.cell_seconds = cell_seconds or submission_seconds
        self.reference_cell_seconds = reference_cell_seconds  # for the student's message
        self.test_limit: tuple[float, float | None] | None = None  # the test in flight: (limit, reference's time)
        self.skipped: set[int] = set()  # cells interrupted at their limit: not run again after a restart
        self.workdir = workdir
        self.env = env
        self.kernel_options = kernel_options or {}  # limits and user, for StudentKernel
        self.started = time.monotonic()
        self.submission_deadline = self.started + submission_seconds
        self.test_deadline: float | None = None
        self.kernel: StudentKernel | None = None
        self.channel: GraderChannel | None = None
        self._request_id = 0
        self.generation = 0           # bumped on every (re)start: handles of older generations are dead
        self.exec_to_cell: dict[int, Cell] = {}
        self.log = SessionLog()
        self.broken: str | None = None  # why grading cannot go on, once it cannot
        self.sandbox = "the student's process never started"
        self._early: threading.Thread | None = None
        self._ahead = kernel

    # -- deadlines ------------------------------------------------------------------

    def remaining(self) -> float:
        now = time.monotonic()
        limit = self.submission_deadline - now
        if self.test_deadline is not None:
            limit = min(limit, self.test_deadline - now)
        return limit

    # -- lifecycle ------------------------------------------------------------------

    def start_early(self) -> None:
        """Start the kernel and run the notebook in the background, while the grader
        imports the suite and builds its oracles: the two overlap instead of adding."""
        def start() -> None:
            try:
                self._ensure_running()
            except StudentCrashed:
                pass  # self.broken says why; the first request raises it
        self._early = threading.Thread(target=start, name="student-kernel-start", daemon=True)
        self._early.start()

    def ensure_running(self) -> None:
        began = time.monotonic()
        try:
            if self._early is not None:
                self._early.join()
                self._early = None
            self._ensure_running()
        finally:
            waited = time.monotonic() - began
            self.log.wait_seconds += waited
            # Starting the kernel and re-running the notebook is not the time of the test in flight.
            if self.test_deadline is not None:
                self.test_deadline += waited

    def _ensure_running(self) -> None:
        if self.broken:
            raise StudentCrashed(self.broken)
        if self.kernel is not None and self.kernel.is_alive() and self.channel is not None:
            return
        if self.kernel is not None:
            self.kernel.shutdown()
            self.log.restarts += 1
            if self.log.restarts > MAX_RESTARTS:
                self.broken = (f"your notebook's process was restarted {MAX_RESTARTS} times "
                                "(it hung or crashed each time); the remaining tests were not run")
                raise StudentCrashed(self.broken)
        self._start()

    def _start(self) -> None:
        self.generation += 1
        began = time.monotonic()
        kernel, self._ahead = self._ahead, None
        try:
            if kernel is None or not kernel.is_alive():
                kernel = start_kernel(self.workdir, self.env, self.kernel_options)
        except (KernelDied, KernelTimeout) as exc:
            self.broken = f"your notebook's process could not be started: {exc}"
            raise StudentCrashed(self.broken) from None
        finally:
            self.log.startup_seconds += time.monotonic() - began
        began = time.monotonic()
        try:
            self._run_cells(kernel)
        finally:
            self.log.notebook_seconds += time.monotonic() - began
        began = time.monotonic()
        try:
            self.channel = self._open_channel(kernel)
        finally:
            self.log.startup_seconds += time.monotonic() - began

    def _open_channel(self, kernel: StudentKernel) -> GraderChannel:
        """A socket in the kernel's own folder, which the kernel connects to and proves
        with a token it was given on its private Jupyter channel; the socket's name is
        gone from the file system once the kernel is connected."""
        path, token = str(self.workdir / f".channel-{secrets.token_hex(8)}"), secrets.token_hex(16)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, 0o666)  # the kernel may run as another user; its folder is its own
            listener.listen(1)
            kernel.submit(_SERVE.format(path=path, token=token))
            connection = _accept(listener, time.monotonic() + CHANNEL_SECONDS, kernel.is_alive)
            channel = GraderChannel(connection, kernel.is_alive)
            request_id, proof = channel.receive(time.monotonic() + CHANNEL_SECONDS)
            if proof != token.encode():
                channel.close()
                raise ChannelClosed("the connection did not come from the notebook's process")
            return channel
        except (OSError, ChannelClosed, ChannelTimeout, KernelDied) as exc:
            kernel.shutdown()
            self.broken = ("your notebook's process did not answer the grader after its cells ran "
                           f"({type(exc).__name__}: {exc}); did a cell replace or break the grader's runtime?")
            raise StudentCrashed(self.broken) from None
        finally:
            listener.close()
            try:
                os.unlink(path)
            except OSError:
                pass

    def _run_cells(self, kernel: StudentKernel) -> None:
        self.kernel = kernel
        self.sandbox = describe(kernel.sandbox)
        first_run = self.generation == 1
        for cell in self.cells:
            if cell.number in self.skipped:
                continue
            budget = self.submission_deadline - time.monotonic()
            if budget <= 0:
                self.log.limits_fired["submission_seconds"] += 1
                self.broken = "the submission's time limit ran out while its cells were running"
                raise StudentCrashed(self.broken)
            began = time.monotonic()
            try:
                result = kernel.execute(cell.source, timeout=min(budget, self.cell_seconds), store_history=True)
                if first_run:
                    self.log.slowest_cell_seconds = max(self.log.slowest_cell_seconds, time.monotonic() - began)
            except KernelTimeout:
                if budget > self.cell_seconds and kernel.is_alive():
                    # Interrupted at the cell's own limit and the kernel is still sound:
                    # the rest of the notebook can still be graded.
                    self.skipped.add(cell.number)
                    self.log.limits_fired["cell_seconds"] += 1
                    needs = (f" (the reference solution's slowest graded cell takes "
                             f"{self.reference_cell_seconds:.1f} s)" if self.reference_cell_seconds else "")
                    self.log.cell_errors.append(CellError(
                        cell, "TimeoutError", f"the cell ran past the cell time limit of {self.cell_seconds:g} s"
                        f"{needs} and was stopped; make sure no cell loops forever or trains for long "
                        "(tag such a cell 'training')", ""))
                    continue
                self.log.limits_fired["submission_seconds"] += 1
                self.broken = (f"cell #{cell.number} ({cell.first_line!r}) was still running when the "
                                "submission's time limit ran out; make sure no cell loops forever")
                raise StudentCrashed(self.broken) from None
            except KernelDied:
                self.broken = (f"cell #{cell.number} ({cell.first_line!r}) ended the notebook's process "
                                "(sys.exit, os._exit, a crash or running out of memory)")
                raise StudentCrashed(self.broken) from None
            if result.execution_count is not None:
                self.exec_to_cell[result.execution_count] = cell
            if first_run:
                self._record(cell, result)

    def _record(self, cell: Cell, result: Execution) -> None:
        if result.status == "error":
            if result.error_name in MEMORY_ERRORS:
                self.log.limits_fired["memory"] += 1
            self.log.cell_errors.append(
                CellError(cell, result.error_name, result.error_value[:2000],
                          self.annotate(result.traceback)[-6000:]))

    def close(self) -> None:
        if self._early is not None:
            self._early.join()
        if self._ahead is not None:
            self._ahead.shutdown()
            self._ahead = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.kernel is not None:
            self.kernel.shutdown()
            self.kernel = None

    # -- requests -------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> Any:
        """Send one request to the runtime; return the decoded ``ok`` value, or raise the
        student's error through the proxy."""
        from coursekit.proxy import decode_reply, handle_record  # the proxy owns handle objects

        self.ensure_running()
        payload = wire.dumps({"op": op, **fields}, handle_record).encode("utf-8")
        timeout = self.remaining()
        if timeout <= 0:
            raise self._timed_out()
        self._request_id += 1
        deadline = time.monotonic() + timeout
        try:
            self.channel.send(self._request_id, payload, deadline)
            reply = self._reply_to(self._request_id, deadline)
        except ChannelTimeout:
            self._recover(self._request_id)
            raise self._timed_out() from None
        except ChannelClosed:
            self._lose_kernel()
            raise StudentCrashed("your code ended the notebook's process (sys.exit, os._exit, a crash, "
                                 "or running out of memory); it was restarted for the next tests") from None
        try:
            text = reply.decode("utf-8")
        except UnicodeDecodeError:
            raise wire.WireError("the reply from the notebook's process is not UTF-8 text") from None
        return decode_reply(self, text)

    def _reply_to(self, request_id: int, deadline: float) -> bytes:
        """The reply to this request; the late replies of requests given up on are dropped."""
        while True:
            answered, payload = self.channel.receive(deadline)
            if answered == request_id:
                return payload

    def _recover(self, request_id: int) -> None:
        """Interrupt the call in flight (a KeyboardInterrupt in the student's code). If it
        does not answer within a few seconds, the kernel is killed: the next request
        restarts it, with the notebook re-run."""
        try:
            self.kernel.interrupt()
            self._reply_to(request_id, time.monotonic() + RECOVER_SECONDS)
        except (ChannelTimeout, ChannelClosed, OSError, RuntimeError):
            self._lose_kernel()

    def _lose_kernel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.kernel is not None:
            self.kernel.shutdown()

    def _timed_out(self) -> StudentTimeout:
        """The error for a request past its deadline, counted against the limit that set it."""
        if time.monotonic() >= self.submission_deadline:
            self.log.limits_fired["submission_seconds"] += 1
            return StudentTimeout("the submission's total time limit ran out")
        self.log.limits_fired["test_seconds"] += 1
        limit, reference = self.test_limit or (None, None)
        which = f"this test's time limit of {limit:g} s" if limit else "this test's time limit"
        needs = f" (the reference solution needs about {reference:.1f} s)" if reference else ""
        return StudentTimeout(f"your code did not finish within {which}{needs}: an infinite loop, or far too slow")

    def annotate(self, traceback_text: str) -> str:
        """Name notebook cells in a traceback: IPython prints ``In[7]``, a student
        needs the cell's position."""
        def cell_for(match: re.Match) -> str:
            cell = self.exec_to_cell.get(int(match.group(1)))
            return f"{match.group(0)} (cell #{cell.number})" if cell else match.group(0)
        return re.sub(r"In\s*\[(\d+)\]", cell_for, traceback_text)


def start_kernel(workdir: Path, env: dict[str, str], kernel_options: dict) -> StudentKernel:
    """A sandboxed kernel with the grader's runtime loaded, and nothing of a submission yet."""
    kernel = StudentKernel(str(workdir), env, **kernel_options)
    try:
        kernel.start()
        kernel.execute(_RUNTIME_BOOT, timeout=120)
    except (KernelDied, KernelTimeout):
        kernel.shutdown()
        raise
    return kernel


def _accept(listener: socket.socket, deadline: float, alive) -> socket.socket:
    listener.settimeout(0.25)
    while time.monotonic() < deadline:
        try:
            return listener.accept()[0]
        except socket.timeout:
            if not alive():
                raise KernelDied("the notebook's process exited") from None
    raise ChannelTimeout()


def make_workdir() -> Path:
    return scratch_dir("student")
