"""What grading one submission observed, as plain records: each test case's outcome
and the student's process's log (cells that raised, restarts, where the time went).
Results are built from these; nothing here runs or imports the student's side."""
from __future__ import annotations

import re
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


# A frame of IPython's traceback in a notebook cell, as the grader annotates it
# ("Cell In[7] (cell #17), line 10"), and the line it marks ("---> 10 raise ...").
_CELL_FRAME = re.compile(r"^[ \t]*Cell In\s*\[\d+\] \(cell #(\d+)\), line (\d+)", re.MULTILINE)
_MARKED_LINE = re.compile(r"^-+>\s*\d+\s?(.*)$", re.MULTILINE)


@dataclass
class CellError:
    cell: Cell
    name: str
    value: str
    traceback: str

    def describe(self) -> str:
        return f"cell #{self.cell.number} ({self.cell.first_line!r}) raised {self.name}: {self.value}"

    def student_line(self) -> dict:
        """Where in the student's own code it raised: the innermost frame in a notebook
        cell (which may be another cell, where a function was defined) and its line."""
        frames = list(_CELL_FRAME.finditer(self.traceback))
        if not frames:
            return {}
        last = frames[-1]
        number, line = int(last.group(1)), int(last.group(2))
        frame_end = self.traceback.find("\n\n", last.end())   # IPython separates frames by a blank line
        marked = _MARKED_LINE.search(self.traceback, last.end(), frame_end if frame_end >= 0 else len(self.traceback))
        if marked:
            code = marked.group(1).strip()
        elif number == self.cell.number and 0 < line <= len(self.cell.source.splitlines()):
            code = self.cell.source.splitlines()[line - 1].strip()   # a SyntaxError marks no line
        else:
            code = ""
        return {"cell": number, "line": line, "code": code}

    def to_json(self) -> dict:
        """For the student's feedback page: what it shows, the traceback folded away."""
        return {"cell": self.cell.number, "first_line": self.cell.first_line, "error": self.name,
                "message": self.value, "at": self.student_line(), "traceback": self.traceback}


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
