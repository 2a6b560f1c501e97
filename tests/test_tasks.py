"""Which hidden tests grade which notebook task: read from the "## Task N:" headings and
the names each test reaches, recorded by `course release`, found stale by `course check`."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nbformat

from coursekit.check import check_recorded
from coursekit.config import load_course
from coursekit.release import write_tasks
from coursekit.tasks import TASKS_FILE, suite_tasks

ROOT = Path(__file__).resolve().parent.parent
COURSE = load_course(ROOT / "course.yaml")

SUITE = '''
import pytest

def make_model(student, n):
    return student.Model(n)

@pytest.fixture
def trained(student):
    return student.train(make_model(student, 2))

def test_double(student):
    assert student.double(2) == 4

def test_model_through_a_function(student):
    assert make_model(student, 3)

def test_training_through_a_fixture(trained):
    assert trained

def test_model_uses_double(student):
    assert student.Model(1)(student.double(1))

def test_library_only(student):
    assert student.lib.torch
'''


def _solution(source: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["nbgrader"] = {"solution": True, "grade": False, "grade_id": source.split()[1]}
    return cell


def test_each_test_goes_to_the_task_whose_names_it_reaches(tmp_path):
    lab = dataclasses.replace(COURSE.lab("01_attention"), id="toy", notebook="toy.ipynb", root=tmp_path)
    lab.suite_dir.mkdir(parents=True)
    (lab.suite_dir / "test_toy.py").write_text(SUITE)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import torch"),
                nbformat.v4.new_markdown_cell("## Task 1: `double(x)`"), _solution("def double(x):\n    return 2 * x"),
                nbformat.v4.new_code_cell("assert double(1) == 2  # a self-check"),
                nbformat.v4.new_markdown_cell("Some prose.\n\n## Task 2: The model"), _solution("class Model:\n    pass"),
                nbformat.v4.new_markdown_cell("## Task 3: training"), _solution("def train(model):\n    return model")]
    lab.notebook_in("source").parent.mkdir(parents=True)
    nbformat.write(nb, lab.notebook_in("source"))
    write_tasks(tmp_path, lab)
    tasks = suite_tasks(lab.suite_dir)
    assert [(t.label, t.title) for t in tasks] == [("Task 1", "`double(x)`"), ("Task 2", "The model"), ("Task 3", "training")]
    by_test = {test: task.label for task in tasks for test in task.tests}
    assert by_test == {"test_double": "Task 1", "test_model_through_a_function": "Task 2",
                       "test_model_uses_double": "Task 2",   # reaches Tasks 1 and 2: the later one
                       "test_training_through_a_fixture": "Task 3"}   # test_library_only reaches no task: "Other"


def test_lab_01s_record_names_every_test_once_and_in_its_task():
    lab = COURSE.lab("01_attention")
    tasks = suite_tasks(lab.suite_dir)
    recorded = [test for task in tasks for test in task.tests]
    assert sorted(recorded) == sorted(lab.tests)
    by_test = {test: task.label for task in tasks for test in task.tests}
    assert by_test["test_make_padding_mask"] == "Task 2" and by_test["test_plot_attention_heatmap"] == "Task 5"
    assert by_test["test_mha_calls_student_sdpa"] == "Task 4"   # reaches Task 1's function too: the later task


def test_a_suite_change_makes_the_record_stale(tmp_path):
    """A new test of Task 3 in the suite: `course check` says to run `course release`."""
    lab = COURSE.lab("01_attention")
    for folder in ("source", "autograder"):
        shutil.copytree(ROOT / folder / lab.id, tmp_path / folder / lab.id)
    copy = dataclasses.replace(lab, root=tmp_path)
    course = dataclasses.replace(COURSE, root=tmp_path, labs={lab.id: copy})
    assert check_recorded(course, copy) == []
    suite = copy.suite_dir / f"test_{lab.id}.py"
    suite.write_text(suite.read_text() + "\n\ndef test_more_causal(student):\n    student.make_causal_mask(3)\n")
    stale = (f"{lab.id}: autograder/{lab.id}/{TASKS_FILE} is not the tasks of the source notebook and its suite; "
             f"run `course release {lab.id}`")
    assert check_recorded(course, copy) == [stale]
