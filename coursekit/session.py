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
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coursekit import wire
from coursekit.kernel import Execution, KernelDied, KernelTimeout, StudentKernel
from coursekit.notebook import Cell
from coursekit.sandbox import describe

MAX_RESTARTS = 3
_RUNTIME_BOOT = "import coursekit.runtime as _ck_rt; _ck_rt.install(get_ipython()); del _ck_rt"
_CALL = "__import__('coursekit.runtime').runtime.current.dispatch({payload!r})"
# A large request travels as a file: IPython tokenizes every cell it runs, which
# costs seconds per megabyte of string literal.
_CALL_FILE = "__import__('coursekit.runtime').runtime.current.dispatch_file({path!r})"
INLINE_LIMIT = 32 * 1024


class StudentTimeout(AssertionError):
    """A call into the student's code ran past the time limit."""


class StudentCrashed(AssertionError):
    """The student's process died or could not be (re)started."""


@dataclass
class CellError:
    cell: Cell
    name: str
    value: str
    traceback: str

    def describe(self) -> str:
        return f"cell #{self.cell.number} ({self.cell.first_line!r}) raised {self.name}: {self.value}"


@dataclass
class SessionLog:
    cell_errors: list[CellError] = field(default_factory=list)
    restarts: int = 0
    startup_seconds: float = 0.0    # starting the kernel and loading the runtime, every (re)start
    notebook_seconds: float = 0.0   # running the notebook's cells, every (re)start
    wait_seconds: float = 0.0       # what tests spent waiting for the kernel to be ready


class GradingSession:
    def __init__(self, cells: list[Cell], workdir: Path, env: dict[str, str], submission_seconds: float,
                 kernel_options: dict | None = None, cell_seconds: float | None = None):
        self.cells = cells
        self.cell_seconds = cell_seconds or submission_seconds
        self.skipped: set[int] = set()  # cells interrupted at their limit: not run again after a restart
        self.workdir = workdir
        self.env = env
        self.kernel_options = kernel_options or {}  # limits and user, for StudentKernel
        self.started = time.monotonic()
        self.submission_deadline = self.started + submission_seconds
        self.test_deadline: float | None = None
        self.kernel: StudentKernel | None = None
        self.generation = 0           # bumped on every (re)start: handles of older generations are dead
        self.exec_to_cell: dict[int, Cell] = {}
        self.log = SessionLog()
        self.broken: str | None = None  # why grading cannot go on, once it cannot
        self.sandbox = "the student's process never started"
        self._early: threading.Thread | None = None

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
        if self.kernel is not None and self.kernel.is_alive():
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
        kernel = StudentKernel(str(self.workdir), self.env, **self.kernel_options)
        try:
            kernel.start()
            kernel.execute(_RUNTIME_BOOT, timeout=120)
        except (KernelDied, KernelTimeout) as exc:
            kernel.shutdown()
            self.broken = f"your notebook's process could not be started: {exc}"
            raise StudentCrashed(self.broken) from None
        finally:
            self.log.startup_seconds += time.monotonic() - began
        began = time.monotonic()
        try:
            self._run_cells(kernel)
        finally:
            self.log.notebook_seconds += time.monotonic() - began

    def _run_cells(self, kernel: StudentKernel) -> None:
        self.kernel = kernel
        self.sandbox = describe(kernel.sandbox)
        first_run = self.generation == 1
        for cell in self.cells:
            if cell.number in self.skipped:
                continue
            budget = self.submission_deadline - time.monotonic()
            if budget <= 0:
                self.broken = "the submission's time limit ran out while its cells were running"
                raise StudentCrashed(self.broken)
            try:
                result = kernel.execute(cell.source, timeout=min(budget, self.cell_seconds), store_history=True)
            except KernelTimeout:
                if budget > self.cell_seconds and kernel.is_alive():
                    # Interrupted at the cell's own limit and the kernel is still sound:
                    # the rest of the notebook can still be graded.
                    self.skipped.add(cell.number)
                    self.log.cell_errors.append(CellError(
                        cell, "TimeoutError", f"the cell ran past its limit of {self.cell_seconds:g} s and was "
                        "stopped; make sure no cell loops forever or trains for long (tag such a cell "
                        "'training')", ""))
                    continue
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
            self.log.cell_errors.append(
                CellError(cell, result.error_name, result.error_value[:2000],
                          self.annotate(result.traceback)[-6000:]))

    def close(self) -> None:
        if self._early is not None:
            self._early.join()
        if self.kernel is not None:
            self.kernel.shutdown()
            self.kernel = None

    # -- requests -------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> Any:
        """Send one request to the runtime; return the decoded ``ok`` value or the
        ``error`` record (a dict with key ``error``), for the proxy to raise."""
        from coursekit.proxy import decode_reply, handle_record  # the proxy owns handle objects

        self.ensure_running()
        payload = wire.dumps({"op": op, **fields}, handle_record)
        timeout = self.remaining()
        if timeout <= 0:
            raise StudentTimeout(self._timeout_message())
        try:
            result = self.kernel.execute(self._call_code(payload), timeout=timeout)
        except KernelTimeout:
            raise StudentTimeout(self._timeout_message()) from None
        except KernelDied:
            raise StudentCrashed("your code ended the notebook's process (sys.exit, os._exit, a crash, "
                                 "or running out of memory); it was restarted for the next tests") from None
        if not result.replies:
            raise StudentCrashed("the notebook's process gave no answer (did your code replace the "
                                 "grader's helpers or close its output?)")
        return decode_reply(self, result.replies[-1])

    def _call_code(self, payload: str) -> str:
        if len(payload) <= INLINE_LIMIT:
            return _CALL.format(payload=payload)
        fd, path = tempfile.mkstemp(dir=self.workdir, prefix=".request-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(payload)
        os.chmod(path, 0o644)  # the student's user reads it; the runtime deletes it
        return _CALL_FILE.format(path=path)

    def _timeout_message(self) -> str:
        if time.monotonic() >= self.submission_deadline:
            return "the submission's total time limit ran out"
        return "your code did not finish within this test's time limit (an infinite loop, or far too slow)"

    def annotate(self, traceback_text: str) -> str:
        """Name notebook cells in a traceback: IPython prints ``In[7]``, a student
        needs the cell's position."""
        def cell_for(match: re.Match) -> str:
            cell = self.exec_to_cell.get(int(match.group(1)))
            return f"{match.group(0)} (cell #{cell.number})" if cell else match.group(0)
        return re.sub(r"In\s*\[(\d+)\]", cell_for, traceback_text)


def student_environment(data_dir: Path, workdir: Path) -> dict[str, str]:
    """The student's process gets a minimal environment: nothing of the grader's
    beyond what Python and the libraries need to start, and a home of its own."""
    keep = ("PATH", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
            "LD_LIBRARY_PATH", "OMP_NUM_THREADS")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
        "COURSE_DATA_DIR": str(data_dir),
        "HOME": str(workdir),
        "TMPDIR": str(workdir),  # the rest of the file system is read-only to the student
        "MPLCONFIGDIR": str(workdir / ".matplotlib"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # No TF32 in the student's process either (coursekit.runtime.full_float32).
        "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "0",
        "NVIDIA_TF32_OVERRIDE": "0",
    })
    return env


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="course-student-"))
