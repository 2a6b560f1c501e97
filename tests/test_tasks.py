"""Which hidden tests grade which notebook task: read from the "Task N:" headings and
the names each test reaches, recorded by `course release`, found stale by `course check`."""
from __future__ import annotations

import shutil
from pathlib import Path

import nbformat

from coursekit.check import check_recorded
from coursekit.config import load_course
from coursekit.tasks import TASKS_FILE, suite_tasks, task_map

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


def _notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()

    def solution(source: str) -> nbformat.NotebookNode:
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["nbgrader"] = {"solution": True, "grade": False, "grade_id": source.split()[1]}
        return cell
    nb.cells = [nbformat.v4.new_code_cell("import torch\nshared = 1"),
                nbformat.v4.new_markdown_cell("## Task 1: `double(x)`"), solution("def double(x):\n    return 2 * x"),
                nbformat.v4.new_code_cell("assert double(1) == 2  # a self-check defines nothing graded\ny = 3"),
                nbformat.v4.new_markdown_cell("Some prose.\n\n### Task 2. The model"), solution("class Model:\n    pass"),
                nbformat.v4.new_markdown_cell("## Task 3: training"), solution("def train(model):\n    return model")]
    nbformat.write(nb, path)
    return path


def test_each_test_goes_to_the_task_whose_names_it_reaches(tmp_path):
    (tmp_path / "test_lab.py").write_text(SUITE)
    tasks = task_map(_notebook(tmp_path / "lab.ipynb"), tmp_path)
    assert [(t.number, t.title, t.names) for t in tasks] == [
        (1, "`double(x)`", {"double"}), (2, "The model", {"Model"}), (3, "training", {"train"})]
    by_test = {test: task.number for task in tasks for test in task.tests}
    assert by_test == {"test_double": 1, "test_model_through_a_function": 2, "test_model_uses_double": 2,
                       "test_training_through_a_fixture": 3}   # test_library_only reaches no task: "Other"


def test_lab_01s_record_names_every_test_once_and_in_its_task():
    lab = COURSE.lab("01_attention")
    tasks = suite_tasks(lab.suite_dir)
    recorded = [test for task in tasks for test in task.tests]
    assert sorted(recorded) == sorted(lab.tests)
    by_test = {test: task.number for task in tasks for test in task.tests}
    assert by_test["test_make_padding_mask"] == 2 and by_test["test_plot_attention_heatmap"] == 5
    assert by_test["test_mha_calls_student_sdpa"] == 4   # reaches Task 1's function too: the later task


def test_a_suite_change_makes_the_record_stale(tmp_path):
    """A new test of Task 3 in the suite: `course check` says to run `course release`."""
    lab = COURSE.lab("01_attention")
    for folder in ("source", "autograder"):
        shutil.copytree(ROOT / folder / lab.id, tmp_path / folder / lab.id)
    suite = tmp_path / "autograder" / lab.id / f"test_{lab.id}.py"
    suite.write_text(suite.read_text() + "\n\ndef test_more_causal(student):\n    student.make_causal_mask(3)\n")
    copy = type(lab)(**{**lab.__dict__, "root": tmp_path})
    course = type(COURSE)(**{**COURSE.__dict__, "root": tmp_path, "labs": {lab.id: copy}})
    problems = check_recorded(course, copy)
    stale = (f"{lab.id}: autograder/{lab.id}/{TASKS_FILE} is not the tasks of the source notebook and its suite; "
             f"run `course release {lab.id}`")
    assert problems == [stale]
