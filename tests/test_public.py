"""public/<lab>/, what students may see of a suite: the graded names, and copies of the tests
course.yaml marks public with the code they use, never another test of the suite."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coursekit.check import check_leaks
from coursekit.config import ConfigError, load_course
from coursekit.public import copied_tests, public_copy, read_graded_names

COURSE = load_course(Path(__file__).resolve().parent.parent / "course.yaml")
LAB = COURSE.lab("01_attention")


def test_lab_01_names_its_graded_names_in_task_order():
    assert read_graded_names(LAB) == [
        {"name": "scaled_dot_product_attention", "task": "Task 1"}, {"name": "make_padding_mask", "task": "Task 2"},
        {"name": "make_causal_mask", "task": "Task 3"}, {"name": "MultiHeadAttention", "task": "Task 4"},
        {"name": "plot_attention", "task": "Task 5"}]


def test_the_public_copy_holds_the_public_tests_and_nothing_of_the_others():
    assert copied_tests(LAB) == set(LAB.public_tests) == {"test_sdpa_matches_pytorch", "test_make_padding_mask"}
    text = "\n".join(p.read_text() for p in LAB.public_dir.glob("*.py"))
    hidden = set(LAB.tests) - set(LAB.public_tests)
    assert hidden and not [name for name in hidden if name in text]
    assert "Hidden suite" not in text   # the suite's docstring describes every test's oracle


def test_the_leak_check_sees_a_hidden_test_in_public(tmp_path):
    root = tmp_path / "course"
    shutil.copytree(LAB.public_dir, root / "public" / LAB.id)
    with open(root / "public" / LAB.id / "test_01_attention.py", "a") as handle:
        handle.write("\n\ndef test_sdpa_masks(student):\n    pass\n")
    lab = type(LAB)(**{**LAB.__dict__, "root": root})
    course = type(COURSE)(**{**COURSE.__dict__, "root": root, "labs": {lab.id: lab}})
    assert check_leaks(course, lab) == [(f"{LAB.id}: public/{LAB.id}/ holds test_sdpa_masks, a test course.yaml "
                                         "does not mark public")]


SUITE = '''"""A suite."""
from pathlib import Path

import torch

DATA = Path(__file__).parent / "expected.json"
SIZES = [1, 2]


def shared(student):
    return student.f(torch.ones(2))


def test_public(student):
    assert shared(student).sum() == 2


def test_hidden(student):
    assert SIZES and DATA.exists()


def test_calls_a_hidden_one(student):
    test_hidden(student)
'''


@pytest.mark.parametrize("public,error", [
    ({"test_hidden"}, "reads files beside the suite"),
    ({"test_calls_a_hidden_one"}, "makes it use test_hidden, a test that is not public"),
])
def test_a_test_that_needs_the_hidden_suite_cannot_be_public(tmp_path, public, error):
    suite = tmp_path / "test_x.py"
    suite.write_text(SUITE)
    with pytest.raises(ConfigError, match=error):
        public_copy(suite, public, LAB)


def test_a_copy_keeps_what_its_test_uses_and_no_more(tmp_path):
    suite = tmp_path / "test_x.py"
    suite.write_text(SUITE)
    copy = public_copy(suite, {"test_public"}, LAB)
    assert "def shared(student)" in copy and "import torch" in copy and "def test_public" in copy
    assert "test_hidden" not in copy and "__file__" not in copy and "SIZES" not in copy and "A suite" not in copy
    compile(copy, "copy", "exec")
