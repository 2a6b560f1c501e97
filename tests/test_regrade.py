"""Regrades: a rerun after a change to a lab says what it would regrade and why
(`course grade --dry-run`, which grades nothing), keeps the results it replaces under
history/, and reports who moved, by how much, on which test, and why.

One toy notebook. Its first grading is written directly (test_double passed, as a
grading --only test_double records it, under the key that grading would have): the
dry runs grade nothing, and the one real grading is the regrade after its points change."""
from __future__ import annotations

import csv
import shutil

import nbformat
import pytest
import yaml

from coursekit.cli import main
from coursekit.config import load_course
from coursekit.keys import key_of, key_parts
from coursekit.outcomes import CaseOutcome
from coursekit.regrade import HISTORY_DIR, REPORT_PREFIX, keep_previous
from coursekit.results import RESULTS_FILE, build_results, read_results, save_submission
from coursekit.runners import LocalRunner

from .conftest import TOY, TOY_CELLS, toy_notebook

ONLY = ["--only", "test_double"]


def course_grade(root, *extra):
    return main(["--course", str(root / "course" / "course.yaml"), "grade", str(root / "alice.ipynb"),
                 "--out", str(root / "out"), "--workers", "1", *ONLY, *extra])


def edit_course(root, edit):
    path = root / "course" / "course.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config["labs"][0])
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def graded_once(tmp_path_factory):
    """The course, alice's notebook and the results folder after a first grading (left untouched)."""
    root = tmp_path_factory.mktemp("regrade")
    shutil.copytree(TOY, root / "course")
    nbformat.write(toy_notebook(TOY_CELLS[:3]), root / "alice.ipynb")
    write_graded(load_course(root / "course" / "course.yaml").lab("toy"), root / "alice.ipynb", root / "out" / "alice")
    return root


def write_graded(lab, notebook, folder):
    """The results a grading of `notebook` --only test_double gives (test_double passes)."""
    parts = key_parts(lab, notebook, ("test_double",))
    outcomes = [CaseOutcome("test_double", f"n{n}", True, "", 0.1) for n in (1, 3, 5)]
    save_submission(folder, lab, build_results(lab, outcomes, None, 1.0, {
        "key": key_of(parts), "key_parts": parts, "student": "alice", "only_tests": ["test_double"]}))


@pytest.fixture
def copy(graded_once, tmp_path):
    """A copy of the graded course to change."""
    shutil.copytree(graded_once, tmp_path, dirs_exist_ok=True)
    return tmp_path


@pytest.fixture
def no_worker(monkeypatch):
    def refuse(self, job):
        raise AssertionError("a worker was started")
    monkeypatch.setattr(LocalRunner, "run", refuse)


def dry_run(root, capsys) -> str:
    capsys.readouterr()
    assert course_grade(root, "--dry-run") == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("change,reason", [
    (lambda root: None, "unchanged"),
    (lambda root: edit_course(root, lambda lab: lab["tests"].update(test_double=5)),
     "points changed (test_double 3 -> 5)"),
    (lambda root: edit_course(root, lambda lab: lab.update(limits={"test_seconds": 6})),
     "limits changed (test_seconds 4 -> 6)"),
    (lambda root: edit_course(root, lambda lab: lab["tests"].update(test_double={"points": 3, "timeout": 9})),
     "limits changed (test_double.timeout none -> 9)"),
    (lambda root: (root / "course" / "autograder" / "toy" / "test_toy.py").open("a").write("\n# edited\n"),
     "suite changed"),
    (lambda root: nbformat.write(toy_notebook(TOY_CELLS[:2]), root / "alice.ipynb"), "submission changed"),
    (lambda root: shutil.rmtree(root / "out"), "new"),
])
def test_dry_run_says_why_without_grading(copy, capsys, no_worker, change, reason):
    before = (copy / "out" / "alice" / RESULTS_FILE).read_bytes() if (copy / "out").exists() else None
    change(copy)
    out = dry_run(copy, capsys)
    assert f"alice    toy  {reason}" in out, out
    graded = 0 if reason == "unchanged" else 1
    assert f"{graded} of 1 submission(s) would be graded (dry run: nothing was graded)" in out
    if before is not None and (copy / "out").exists():
        assert (copy / "out" / "alice" / RESULTS_FILE).read_bytes() == before
        assert not (copy / "out" / "alice" / HISTORY_DIR).exists()


def test_a_rerun_with_nothing_changed_keeps_no_history_and_writes_no_report(copy, no_worker):
    assert course_grade(copy) == 0
    assert not (copy / "out" / "alice" / HISTORY_DIR).exists()
    assert not list((copy / "out").glob(f"{REPORT_PREFIX}*.csv"))


def test_changed_points_regrade_keep_the_previous_results_and_report_the_move(copy, capsys):
    previous = (copy / "out" / "alice" / RESULTS_FILE).read_bytes()
    edit_course(copy, lambda lab: lab["tests"].update(test_double=5))
    capsys.readouterr()
    assert course_grade(copy) == 0
    printed = capsys.readouterr().out

    now = read_results(copy / "out" / "alice" / RESULTS_FILE)
    assert (now.score, now.max_score) == (5, 13)
    kept = list((copy / "out" / "alice" / HISTORY_DIR).glob(f"*-{RESULTS_FILE}"))
    assert len(kept) == 1 and kept[0].read_bytes() == previous    # the results before, byte for byte

    reports = list((copy / "out").glob(f"{REPORT_PREFIX}*.csv"))
    assert len(reports) == 1
    # The report and the results it kept carry the same time in their names.
    assert kept[0].name.split("-")[0] == reports[0].stem.removeprefix(REPORT_PREFIX)
    with open(reports[0], newline="") as handle:
        [row] = list(csv.DictReader(handle))
    assert (row["student"], row["lab"], row["reason"]) == ("alice", "toy", "points changed (test_double 3 -> 5)")
    assert (row["score_before"], row["score_after"], row["change"]) == ("3", "5", "+2")
    assert (row["max_before"], row["max_after"], row["tests"]) == ("11", "13", "test_double 3 -> 5")
    assert row["previous_results"] == str(kept[0])
    assert "1 moved" in printed and "3 -> 5" in printed and "+2" in printed
    # The grading recorded its key's parts: the next run knows it is up to date.
    assert now.extra["key_parts"]["points"]["test_double"] == 5
    assert "alice    toy  unchanged" in dry_run(copy, capsys)


def test_kept_results_are_never_overwritten(tmp_path):
    """Two regrades within the same second keep both results they replaced."""
    for score in ("1", "2"):
        (tmp_path / RESULTS_FILE).write_text(score)
        keep_previous(tmp_path, "20260101T120000Z")
    kept = sorted((tmp_path / HISTORY_DIR).iterdir())
    assert {p.name: p.read_text() for p in kept} == {f"20260101T120000Z-{RESULTS_FILE}": "1",
                                                     "20260101T120000Z-results-2.json": "2"}
    assert keep_previous(tmp_path / "nothing here", "20260101T120000Z") is None


def test_a_grade_that_becomes_a_zero_is_kept_and_reported(tmp_path, toy_course, capsys, no_worker):
    notebook = tmp_path / "submitted" / "alice" / "toy" / "toy.ipynb"
    notebook.parent.mkdir(parents=True)
    nbformat.write(toy_notebook(TOY_CELLS[:3]), notebook)
    write_graded(toy_course.lab("toy"), notebook, tmp_path / "out" / "alice" / "toy")
    previous = (tmp_path / "out" / "alice" / "toy" / RESULTS_FILE).read_bytes()
    notebook.unlink()   # the folder is still there, without its notebook
    assert main(["--course", str(toy_course.path), "grade", str(tmp_path / "submitted"), "--out",
                 str(tmp_path / "out"), *ONLY]) == 0
    [kept] = (tmp_path / "out" / "alice" / "toy" / HISTORY_DIR).iterdir()
    assert kept.read_bytes() == previous
    [report] = (tmp_path / "out").glob(f"{REPORT_PREFIX}*.csv")
    with open(report, newline="") as handle:
        [row] = list(csv.DictReader(handle))
    assert row["reason"].startswith("cannot be graded, scores 0: no notebook was found")
    assert (row["score_before"], row["score_after"], row["change"], row["tests"]) == ("3", "0", "-3", "test_double 3 -> 0")
