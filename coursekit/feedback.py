"""What a student may read of their grade, in the order they need it: the score, each
task of the notebook with its points, what failed and the hint, the notebook's own
problems, then how the grading went. coursekit.feedback_page renders it as feedback.html.

It is built from results.json alone, which already holds only what a student may
read (messages written for them, never test source or expected values), and it
shows each test as its visibility allows: `hidden` tests never, `after_due_date`
ones only once the lab's due date has passed, `after_published` ones only once the
instructor publishes grades (a page rendered at grading time is before that; Gradescope
shows them itself from results.json).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coursekit.late import Lateness

if TYPE_CHECKING:
    from coursekit.results import Results, TestResult
    from coursekit.tasks import Task

HINT = "\nHint: "   # how a failed test's output ends when the instructor wrote a hint for it
NOT_RUN = "not run"


def with_hint(output: str, hint: str) -> str:
    return f"{output}{HINT}{hint}"


def split_hint(output: str) -> tuple[str, str]:
    """A test's output without its hint, and the hint ("" where there is none)."""
    details, found, hint = output.rpartition(HINT)
    return (details, hint) if found else (output, "")


def shown(visibility: str, due: dt.datetime | None, now: dt.datetime, published: bool = False) -> bool:
    if visibility == "hidden":
        return False
    if visibility == "after_due_date":
        return due is not None and now >= due
    if visibility == "after_published":
        return published
    return True


@dataclass
class TestLine:
    """One hidden test as the student sees it."""
    __test__ = False  # not a pytest test class
    name: str
    task: str
    score: float
    max_score: float
    status: str          # "passed", "failed" or NOT_RUN
    details: str         # the failed cases, in words
    hint: str


@dataclass
class TaskLine:
    title: str
    tests: list[TestLine]

    @property
    def score(self) -> float:
        return sum(t.score for t in self.tests)

    @property
    def max_score(self) -> float:
        return sum(t.max_score for t in self.tests)

    @property
    def status(self) -> str:
        if all(t.status == NOT_RUN for t in self.tests):
            return NOT_RUN
        if all(t.status == "passed" for t in self.tests):
            return "passed"
        return "partly" if self.score > 0 else "failed"


@dataclass
class CellProblem:
    """A cell that raised when the grader ran the notebook."""
    cell: int
    first_line: str
    error: str
    message: str
    at: dict             # the student's own line: {"cell", "line", "code"}, or {} where unknown
    traceback: str


@dataclass
class Feedback:
    title: str
    score: float
    max_score: float
    problem: str                      # why grading stopped, or could not happen, and the batch's note
    tasks: list[TaskLine]
    late: str = ""                    # when it was handed in against the due date, and what that costs
    penalty: float = 0.0              # the points the late penalty takes off the score shown
    cell_problems: list[CellProblem] = field(default_factory=list)
    restarts: int = 0
    withheld: int = 0                 # tests shown later (after the due date, or when grades are published)
    skipped_cells: list[dict] = field(default_factory=list)   # {"cell", "tags"}: demo and training cells
    seconds: dict = field(default_factory=dict)
    only: bool = False                # the instructor graded only some tests (--only)

    @property
    def failed(self) -> list[TestLine]:
        return [t for task in self.tasks for t in task.tests if t.status == "failed"]

    @property
    def not_run(self) -> list[TestLine]:
        return [t for task in self.tasks for t in task.tests if t.status == NOT_RUN]


def gather(results: Results, title: str, tasks: list[Task], due: dt.datetime | None = None,
           now: dt.datetime | None = None, published: bool = False) -> Feedback:
    now = now or dt.datetime.now(dt.timezone.utc)
    visible = [t for t in results.tests if shown(t.visibility, due, now, published)]
    task_of = {name: task.heading for task in tasks for name in task.tests}
    other = "Other" if tasks else "Tests"
    lines = [_test_line(t, task_of.get(t.name, other)) for t in visible]
    groups = [task.heading for task in tasks] + [other]
    task_lines = [TaskLine(group, [t for t in lines if t.task == group]) for group in groups]
    extra = results.extra
    score, lateness = sum(t.score for t in visible), Lateness.from_json(extra.get("late"))
    return Feedback(
        title=title, score=score, max_score=sum(t.max_score for t in visible),
        problem="\n".join(line for line in (results.problem, extra.get("note", "")) if line),
        tasks=[task for task in task_lines if task.tests], late=lateness.describe(), penalty=lateness.penalty(score),
        cell_problems=[CellProblem(int(e["cell"]), str(e["first_line"]), str(e["error"]), str(e["message"]),
                                   dict(e.get("at") or {}), str(e["traceback"])) for e in extra.get("cell_errors", [])],
        restarts=int(extra.get("restarts", 0)), withheld=len(results.tests) - len(visible),
        skipped_cells=list(extra.get("skipped_cells", [])),
        seconds={"total": results.execution_time, **results.timings}, only=bool(extra.get("only_tests")))


def _test_line(test: TestResult, task: str) -> TestLine:
    """A test no case of which ran (left out with --only, or a submission that could not be
    graded at all) is "not run", not "failed"."""
    details, hint = split_hint(test.output)
    status = NOT_RUN if not test.ran else ("passed" if test.status == "passed" else "failed")
    return TestLine(test.name, task, test.score, test.max_score, status, details, hint)
