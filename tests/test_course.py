"""The course as committed: course.yaml matches the suites, release/ and solutions/
are what nbgrader makes of source/ today, and release/ leaks nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from coursekit.check import check_leaks, check_points, check_provided, check_recorded, check_up_to_date
from coursekit.config import load_course

COURSE = load_course(Path(__file__).resolve().parent.parent / "course.yaml")
LABS = list(COURSE.labs)


@pytest.mark.parametrize("lab_id", LABS)
def test_points_match_the_suite(lab_id):
    assert check_points(COURSE.lab(lab_id)) == []


@pytest.mark.parametrize("lab_id", LABS)
def test_release_and_solutions_are_up_to_date(lab_id):
    assert check_up_to_date(COURSE, COURSE.lab(lab_id)) == []
    assert check_recorded(COURSE, COURSE.lab(lab_id)) == []


@pytest.mark.parametrize("lab_id", LABS)
def test_release_leaks_no_solution_and_no_hidden_test(lab_id):
    assert check_leaks(COURSE, COURSE.lab(lab_id)) == []
    assert COURSE.lab(lab_id).notebook_in("release").exists()


def test_the_leak_check_catches_a_leak(tmp_path):
    """Plant a solution line and a hidden-suite line in a copy of a released notebook:
    the check must see both."""
    import shutil

    import nbformat

    from coursekit.check import solution_lines

    lab = COURSE.lab(LABS[0])
    inside, outside = solution_lines(nbformat.read(lab.notebook_in("source"), as_version=4))
    leaked = max(inside - outside, key=len)
    suite_line = next(line.strip() for path in sorted(lab.suite_dir.glob("test_*.py"))
                      for line in path.read_text().splitlines()
                      if len(line.strip()) > 40 and line.strip() not in outside
                      and line.strip().startswith("assert "))
    root = tmp_path / "course"
    for folder in ("source", "release", "autograder"):
        shutil.copytree(COURSE.root / folder / lab.id, root / folder / lab.id)
    nb = nbformat.read(root / "release" / lab.id / lab.notebook, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(leaked + "\n" + suite_line))
    nbformat.write(nb, root / "release" / lab.id / lab.notebook)
    copy = type(lab)(**{**lab.__dict__, "root": root})
    course = type(COURSE)(**{**COURSE.__dict__, "root": root, "labs": {lab.id: copy}})
    problems = check_leaks(course, copy)
    assert any("solution code appears" in p for p in problems), problems
    assert any("a line of the hidden suite" in p for p in problems), problems


@pytest.mark.parametrize("lab_id", LABS)
def test_provided_code_is_the_earlier_labs_solution(lab_id):
    assert check_provided(COURSE, COURSE.lab(lab_id)) == []


def test_the_provided_code_check_catches_a_drifted_copy(tmp_path):
    """Lab 09 carries lab 06's sampling filters, declared in its metadata: change one
    character of the copy, or declare a name lab 06 does not have, and the check says so."""
    import shutil

    import nbformat

    lab, source = COURSE.lab("09_alignment"), COURSE.lab("06_gpt_decoding")
    assert "top_p_filter" in nbformat.read(lab.notebook_in("source"), as_version=4).metadata["course"]["provided"][source.id]
    root = tmp_path / "course"
    for one in (lab, source):
        shutil.copytree(COURSE.root / "source" / one.id, root / "source" / one.id)
    path = root / "source" / lab.id / lab.notebook
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "def top_p_filter(" in c.source)
    cell.source = cell.source.replace("remove_sorted[..., 0] = False", "remove_sorted[..., 1] = False")
    nb.metadata["course"]["provided"][source.id].append("nucleus_search")
    nbformat.write(nb, path)
    copies = {one.id: type(one)(**{**one.__dict__, "root": root}) for one in (lab, source)}
    course = type(COURSE)(**{**COURSE.__dict__, "root": root, "labs": copies})
    problems = check_provided(course, copies[lab.id])
    assert problems == [f"{lab.id}: its provided copy of {source.id}'s 'top_p_filter' differs from that lab's solution "
                        "(copy it again from its source notebook, without the solution markers)",
                        f"{lab.id}: {source.id} has no cell, function or class 'nucleus_search' to provide"], problems


def test_check_records_what_the_reference_needs_and_only_rewrites_on_a_new_limit(tmp_path):
    import json

    from coursekit.check import record_timings
    from coursekit.config import TIMINGS_FILE
    from coursekit.results import Results, TestResult

    lab = COURSE.lab(LABS[0])
    lab = type(lab)(**{**lab.__dict__, "root": tmp_path})
    lab.suite_dir.mkdir(parents=True)
    results = Results(lab.id, 1, 2, [TestResult("test_a", 1, 1, "passed", "", "visible", 0.4),
                                     TestResult("test_b", 0, 1, "failed", "", "visible", 3.2)],
                      timings={"slowest_cell": 2.3})
    assert "cell limit 50 s, test limits 30-70 s" in record_timings(lab, results)
    recorded = json.loads((lab.suite_dir / TIMINGS_FILE).read_text())
    assert recorded["slowest_cell_seconds"] == 2.3 and recorded["tests"] == {"test_a": 0.4, "test_b": 3.2}
    # Noise that leaves every limit where it was, or moves one by what a busy machine adds (70 s to
    # 92 s), leaves the file alone; a real change rewrites it.
    results.tests[1].seconds = 3.4
    assert record_timings(lab, results) == ""
    results.tests[1].seconds = 4.6
    assert record_timings(lab, results) == ""
    results.tests[1].seconds = 9.0
    assert "test limits 30-180 s" in record_timings(lab, results)
