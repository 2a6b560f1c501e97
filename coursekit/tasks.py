"""Which hidden tests grade which of the notebook's tasks, for the student's feedback.

A task is a "## Task N: title" heading of the source notebook; it owns the graded names
its solution cells define (coursekit.public.graded_names). A test belongs to the task
whose names it reaches as `student.NAME`, directly or through the suite's own functions
and fixtures; a test reaching several tasks belongs to the latest of them, since later
tasks build on earlier ones (a test of generation calls the model of an earlier task).
A test reaching none is listed under "Other".

`course release` records the result beside the suite (TASKS_FILE), like the hints, so
every grader finds it with the suite; `course check` finds it stale when the notebook
or the suite moved on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from coursekit.notebook import nbformat, task_heading  # nbformat: see notebook.py

TASKS_FILE = "tasks.json"


@dataclass
class Task:
    label: str                  # "Task 3"
    title: str
    tests: list[str] = field(default_factory=list)

    @property
    def heading(self) -> str:
        return f"{self.label}: {self.title}"


def notebook_tasks(nb: nbformat.NotebookNode) -> list[Task]:
    """The notebook's tasks in order, without tests yet."""
    headings = [task_heading(line) for cell in nb.cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines()]
    return [Task(label, title) for label, title in dict(h for h in headings if h).items()]


def assign_tests(tasks: list[Task], task_of_name: dict[str, str], reached: dict[str, set[str]]) -> list[Task]:
    """Give each test (with the names it reaches) to the latest task owning one of them."""
    order = [task.label for task in tasks]
    for test, names in sorted(reached.items()):
        owners = {task_of_name[name] for name in names if task_of_name.get(name) in order}
        if owners:
            tasks[max(order.index(label) for label in owners)].tests.append(test)
    return tasks


def tasks_json(tasks: list[Task]) -> str:
    return json.dumps({"tasks": [{"task": t.label, "title": t.title, "tests": t.tests} for t in tasks]},
                      indent=1, ensure_ascii=False) + "\n"


def suite_tasks(suite_dir: Path) -> list[Task]:
    """The recorded tasks of a suite; none where the lab has no record (its tests are then all "Other")."""
    try:
        data = json.loads((suite_dir / TASKS_FILE).read_text(encoding="utf-8"))
        return [Task(str(t["task"]), str(t["title"]), [str(name) for name in t["tests"]]) for t in data["tasks"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
