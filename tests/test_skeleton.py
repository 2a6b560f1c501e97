"""Every lab's source notebook follows one skeleton: the title
`# Lab NN — Title`, each graded piece under `## Task N: ...` (N = 1, 2, ... through the lab)
followed directly by a code cell starting `# Self-check for Task N`, the written questions
(manually graded answer cells) under `## Questions`, a `## Wrap-up` cell, and last a code cell
tagged `demo` (the grader skips it) that runs `!course validate <notebook>`."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from coursekit.config import load_course

COURSE = load_course(Path(__file__).resolve().parent.parent / "course.yaml")
LABS = list(COURSE.labs)
TASK = re.compile(r"^## Task (\d+): \S", re.M)
LEVEL2 = re.compile(r"^## .*", re.M)


def _grading(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def skeleton_problems(nb, lab_id: str, notebook: str) -> list[str]:
    """What in `nb` departs from the skeleton (empty when it follows it)."""
    problems = []
    cells = nb.cells
    number = lab_id.split("_", 1)[0]
    if not (cells and cells[0].cell_type == "markdown"
            and re.match(rf"# Lab {number} \u2014 \S", cells[0].source)):
        problems.append(f"the first cell should be the title '# Lab {number} \u2014 Title'")
    last = cells[-1]
    if not (last.cell_type == "code" and "demo" in last.metadata.get("tags", [])
            and f"!course validate {notebook}" in last.source.splitlines()):
        problems.append(f"the last cell should be a code cell tagged demo that runs '!course validate {notebook}'")
    if not (cells[-2].cell_type == "markdown" and cells[-2].source.startswith("## Wrap-up")):
        problems.append("the cell before the last should be the '## Wrap-up' cell")
    heading = None      # the last level-2 heading seen
    tasks_seen = []
    for i, cell in enumerate(cells):
        g = _grading(cell)
        if cell.cell_type == "markdown":
            if g.get("solution") and g.get("grade"):
                if heading != "## Questions":
                    problems.append(f"cell {i} (answer {g.get('grade_id')}) is not under '## Questions'")
                elif cells[i - 1].cell_type != "markdown" or _grading(cells[i - 1]):
                    problems.append(f"cell {i} (answer {g.get('grade_id')}) should follow its question's prompt")
                continue
            for line in LEVEL2.findall(cell.source):
                heading = line.strip()
                task = TASK.match(heading)
                if task:
                    tasks_seen.append(int(task.group(1)))
            continue
        if cell.cell_type == "code" and g.get("solution") and not g.get("grade"):
            task = TASK.match(heading or "")
            if not task:
                problems.append(f"solution cell {i} ({g.get('grade_id')}) is not under a '## Task N: ...' heading")
                continue
            nxt = cells[i + 1] if i + 1 < len(cells) else None
            if nxt is not None and nxt.cell_type == "code" and _grading(nxt).get("solution"):
                continue  # the task's next solution cell
            if nxt is None or nxt.cell_type != "code" or not nxt.source.startswith(
                    f"# Self-check for Task {task.group(1)}"):
                problems.append(f"solution cell {i} ({g.get('grade_id')}) should be followed directly by "
                                f"'# Self-check for Task {task.group(1)}'")
    if tasks_seen != list(range(1, len(tasks_seen) + 1)):
        problems.append(f"the tasks should be numbered 1, 2, ... in order; found {tasks_seen}")
    return problems


@pytest.mark.parametrize("lab_id", LABS)
def test_notebook_follows_the_skeleton(lab_id):
    lab = COURSE.lab(lab_id)
    assert skeleton_problems(nbformat.read(lab.notebook_in("source"), as_version=4), lab_id, lab.notebook) == []


def test_the_skeleton_check_sees_a_departure():
    lab = COURSE.lab(LABS[0])
    nb = nbformat.read(lab.notebook_in("source"), as_version=4)
    nb.cells[0].source = nb.cells[0].source.replace("# Lab ", "# Lab number ", 1)
    nb.cells[-2].source = "## Summary\n"
    nb.cells[-1].metadata["tags"] = []   # the grader would run `course validate` inside the grading
    checks = [i for i, c in enumerate(nb.cells) if c.source.startswith("# Self-check for Task")]
    nb.cells[checks[0]].source = "# Self-check\n" + nb.cells[checks[0]].source
    problems = skeleton_problems(nb, lab.id, lab.notebook)
    assert len(problems) == 4, problems
