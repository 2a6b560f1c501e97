"""`course validate` on lab 01: the stub reports every task as not implemented, the reference
is clean, a graded function defined only in a demo cell is reported as such, and a notebook of
another lab is named for what it is. The three notebooks that run share this module's one
import of the engine; each runs once, in its own sandboxed kernel, as grading runs it. The stub
runs as in the student image: from its own folder, in a course without autograder/."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import nbformat
import pytest

from coursekit.cli import main
from coursekit.config import load_course
from coursekit.validate import format_report, validate

COURSE = load_course(Path(__file__).resolve().parent.parent / "course.yaml")
LAB = COURSE.lab("01_attention")
NAMES = ["scaled_dot_product_attention", "make_padding_mask", "make_causal_mask", "MultiHeadAttention",
         "plot_attention"]
DEMO_ONLY = "make_padding_mask"


def _in_a_demo_cell(folder: Path) -> Path:
    """The reference, with the cell that defines DEMO_ONLY tagged demo."""
    nb = nbformat.read(LAB.notebook_in("solutions"), as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(f"def {DEMO_ONLY}("))
    cell.metadata["tags"] = ["demo"]
    path = folder / LAB.notebook
    nbformat.write(nb, path)
    return path


def _student_image_course(root: Path) -> Path:
    """What the student image holds of the course: course.yaml, data/, public/ and release/."""
    shutil.copy(COURSE.path, root / "course.yaml")
    (root / "data").symlink_to(COURSE.root / "data")
    for folder in ("public", "release"):
        shutil.copytree(COURSE.root / folder / LAB.id, root / folder / LAB.id)
    return root / "course.yaml"


def _quiet(line: str) -> None:
    """Progress lines go nowhere: the reports are what these tests read."""


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    student_course = load_course(_student_image_course(tmp_path_factory.mktemp("student_image")))
    with contextlib.chdir(student_course.lab(LAB.id).notebook_in("release").parent):
        stub = validate(student_course, Path(LAB.notebook), progress=_quiet)
    demo = _in_a_demo_cell(tmp_path_factory.mktemp("demo_only"))
    return {"stub": stub, "reference": validate(COURSE, LAB.notebook_in("solutions"), progress=_quiet),
            "demo_only": validate(COURSE, demo, progress=_quiet)}


def test_the_stub_reports_every_task_as_not_implemented(reports):
    report = reports["stub"]
    assert [name for name, _, _ in report.names] == NAMES
    assert [task for _, task, _ in report.names] == [f"Task {i}" for i in range(1, 6)]
    for name, _, problem in report.names:
        assert problem.startswith("not implemented: cell #") and "NotImplementedError" in problem, (name, problem)
    # Each task's self-check raises, at the student's own `raise NotImplementedError()`.
    assert len(report.cells) == 5
    assert all("raised NotImplementedError" in c and "raise NotImplementedError()" in c for c in report.cells)
    assert [c.result.status for c in report.checks] == ["failed", "failed"]
    assert all("NotImplementedError" in f.message for c in report.checks for f in c.failures)
    assert report.exit_code == 1 and "problem(s)" in format_report(report)


def test_the_reference_is_clean(reports):
    report = reports["reference"]
    assert report.problems == 0 and report.exit_code == 0, format_report(report)
    assert [problem for _, _, problem in report.names] == [""] * 5
    assert sorted(c.result.name for c in report.checks) == sorted(LAB.public_tests) and len(report.checks) == 2
    assert all(c.result.status == "passed" and not c.failures for c in report.checks)
    assert report.run["skipped"] >= 1 and not report.wrong_lab and not report.notes
    assert "No problems found" in format_report(report)


def test_a_graded_function_defined_only_in_a_demo_cell_is_reported_as_such(reports):
    report = reports["demo_only"]
    problems = {name: problem for name, _, problem in report.names}
    assert problems.pop(DEMO_ONLY).startswith("defined only in cell #"), problems
    assert "tagged demo" in format_report(report)
    assert set(problems.values()) == {""}, problems
    # The grader never defines it: the public check that calls it fails on the missing name.
    failed = [c for c in report.checks if c.result.status != "passed"]
    assert [c.result.name for c in failed] == ["test_make_padding_mask"]
    assert all(f"does not define `{DEMO_ONLY}`" in f.message for f in failed[0].failures)
    assert report.exit_code == 1


def test_a_notebook_of_another_lab_is_named_and_not_run(tmp_path, capsys):
    other = COURSE.lab("02_transformer_block")
    folder = tmp_path / LAB.id
    folder.mkdir()
    shutil.copy(other.notebook_in("release"), folder / LAB.notebook)
    assert main(["validate", str(folder / LAB.notebook)]) == 1
    out = capsys.readouterr().out
    assert f"WRONG LAB: this notebook is lab {other.id}" in out and f"makes it lab {LAB.id}" in out
    assert "(the notebook was not run)" in out and "Graded names" not in out


def test_an_unreadable_notebook_is_a_user_error(tmp_path, capsys):
    broken = tmp_path / LAB.notebook
    broken.write_text("{not json")
    assert main(["validate", str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"course: {LAB.notebook} is not valid JSON")
