"""Which hidden tests grade which of the notebook's tasks, for the student's feedback.

A task is a markdown heading "Task N: ..." in the source notebook; its names are the
functions, classes and variables its solution cells (up to the next task) define. A
test belongs to the task whose names it reaches as ``student.NAME``, directly or
through the suite's own functions and fixtures; a test reaching several tasks belongs to the
latest of them, since later tasks build on earlier ones (a test of generation calls
the model of an earlier task). A test reaching none is listed under "Other".

`course release` records the result beside the suite (TASKS_FILE), like the hints, so
every grader finds it with the suite; `course check` finds it stale when the notebook
or the suite moved on.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from coursekit.notebook import read_notebook

TASKS_FILE = "tasks.json"
TASK_HEADING = re.compile(r"^\s*#{1,6}\s*Task\s+(\d+)\s*[:.]\s*(.+?)\s*$", re.MULTILINE)
STUDENT = "student"   # the suites' fixture: the proxy to the student's notebook


@dataclass
class Task:
    number: int
    title: str
    names: set[str] = field(default_factory=set)   # what its solution cells define
    tests: list[str] = field(default_factory=list)


class TaskMapError(ValueError):
    """The notebook or the suite cannot be read for its tasks; the message names the file."""


def notebook_tasks(nb: nbformat.NotebookNode, where: str) -> list[Task]:
    tasks: list[Task] = []
    for number, cell in enumerate(nb.cells, start=1):
        if cell.cell_type == "markdown":
            tasks += [Task(int(m.group(1)), m.group(2)) for m in TASK_HEADING.finditer(cell.source)]
        elif cell.cell_type == "code" and tasks and cell.metadata.get("nbgrader", {}).get("solution"):
            try:
                tree = ast.parse(cell.source)
            except SyntaxError as exc:
                raise TaskMapError(f"{where}: cell #{number} is not valid Python ({exc.msg}, line {exc.lineno})") from None
            tasks[-1].names |= _defined_names(tree)
    return tasks


def _defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def suite_student_names(suite_dir: Path) -> dict[str, set[str]]:
    """Per test function of the suite, the student names it reaches (``student.NAME``),
    through the module's other functions and fixtures too."""
    reached: dict[str, set[str]] = {}
    for path in sorted(suite_dir.glob("test_*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as exc:
            raise TaskMapError(f"{path}: line {exc.lineno}: {exc.msg}") from None
        functions = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        direct = {name: _student_attributes(node) for name, node in functions.items()}
        calls = {name: _names_used(node) & set(functions) for name, node in functions.items()}
        for name in functions:
            if name.startswith("test"):
                seen, todo = set(), [name]
                while todo:
                    current = todo.pop()
                    if current not in seen:
                        seen.add(current)
                        todo += calls[current] - seen
                reached[name] = set().union(*(direct[f] for f in seen))
    return reached


def _student_attributes(node: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == STUDENT}


def _names_used(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names the function refers to, its parameters included (a parameter names a fixture)."""
    args = node.args
    params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    return params | {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def task_map(notebook: Path, suite_dir: Path) -> list[Task]:
    tasks = notebook_tasks(read_notebook(notebook), str(notebook))
    for test, names in sorted(suite_student_names(suite_dir).items()):
        owners = [task for task in tasks if task.names & names]
        if owners:
            owners[-1].tests.append(test)
    return tasks


def tasks_json(tasks: list[Task]) -> str:
    return json.dumps({"tasks": [{"number": t.number, "title": t.title, "tests": t.tests} for t in tasks]},
                      indent=1, ensure_ascii=False) + "\n"


def suite_tasks(suite_dir: Path) -> list[Task]:
    """The recorded tasks of a suite; none where the lab has no record (its tests are then all "Other")."""
    try:
        data = json.loads((suite_dir / TASKS_FILE).read_text(encoding="utf-8"))
        return [Task(int(t["number"]), str(t["title"]), tests=[str(name) for name in t["tests"]])
                for t in data["tasks"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
