"""What grading one submission observed, as plain records: each test case's outcome
and the student's process's log (cells that raised, restarts, where the time went).
Results are built from these; nothing here runs or imports the student's side."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from coursekit.notebook import Cell

# The names a student's exception has when its process ran out of memory: Python's own (the
# address-space cap on CPU) and torch's for a GPU.
MEMORY_ERRORS = frozenset({"MemoryError", "OutOfMemoryError"})


@dataclass
class CaseOutcome:
    function: str       # the test function: the unit that carries points
    case: str           # the parametrized case id, "" when there is none
    passed: bool
    message: str
    seconds: float


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
    slowest_cell_seconds: float = 0.0   # the slowest cell of the notebook's first run
    # Each limit that stopped the student's code, by course.yaml's name for it (test_seconds,
    # cell_seconds, submission_seconds) or "memory", and how many times: for the instructor.
    limits_fired: Counter = field(default_factory=Counter)
