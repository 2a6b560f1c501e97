"""The engine end to end on the toy lab: a submission runs in its own kernel, each
test case is scored, hangs and crashes cost only the tests that hit them, and a
batch resumes without regrading what it already did."""
from __future__ import annotations

import csv
import json

import pytest

from coursekit.batch import discover, grade_batch
from coursekit.results import RESULTS_FILE

from .conftest import TOY_CELLS, toy_notebook


@pytest.fixture(scope="module")
def graded_toy(toy_course, tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    nb_path = folder / "alice.ipynb"
    import nbformat

    nbformat.write(toy_notebook(), nb_path)
    out = folder / "out"
    rows = grade_batch(toy_course, discover(toy_course, [nb_path], None), out, progress=False)
    results = json.loads((out / "alice" / RESULTS_FILE).read_text())
    return rows, results, out


def _test(results, name):
    return next(t for t in results["tests"] if t["name"] == name)


def test_results_follow_gradescope_schema(graded_toy, toy_course):
    _, results, _ = graded_toy
    assert set(results) >= {"score", "execution_time", "tests", "output"}
    for test in results["tests"]:
        assert set(test) >= {"name", "score", "max_score", "status", "output", "visibility"}
        assert test["status"] in ("passed", "failed")
    assert [t["name"] for t in results["tests"]] == list(toy_course.lab("toy").tests)
    assert _test(results, "test_hostile_return")["visibility"] == "hidden"


def test_correct_functions_score_and_broken_ones_do_not(graded_toy):
    _, results, _ = graded_toy
    assert _test(results, "test_double")["score"] == 3
    assert _test(results, "test_double_rejects_strings")["score"] == 1
    assert _test(results, "test_module_forward_and_grads")["score"] == 2, _test(results, "test_module_forward_and_grads")
    assert results["score"] == 6


def test_a_failed_test_shows_the_source_notebooks_hint(graded_toy):
    _, results, _ = graded_toy
    assert "Hint: slow() must return 1 without looping forever." in _test(results, "test_slow_function")["output"]
    assert "Hint:" not in _test(results, "test_double")["output"]  # passed: no hint needed


def test_a_hang_fails_only_its_test(graded_toy):
    _, results, _ = graded_toy
    slow = _test(results, "test_slow_function")
    assert slow["score"] == 0 and "time limit" in slow["output"]


def test_a_crash_fails_its_test_and_the_process_is_restarted(graded_toy):
    _, results, _ = graded_toy
    crash = _test(results, "test_after_crash")
    assert crash["score"] == 0 and "ended the notebook's process" in crash["output"]
    # The tests after the crash ran on a restarted kernel and passed.
    assert _test(results, "test_module_forward_and_grads")["status"] == "passed"
    assert "restarted" in results["output"]


def test_a_tests_seconds_leave_out_the_restart_it_waited_for(graded_toy):
    # test_double's first case waits for the restart after the crash (a kernel start and the
    # notebook's run again); its three cases themselves take milliseconds. Counting the wait in
    # (once or, as a sign error once did, twice) inflated the reference timings the limits derive from.
    _, results, _ = graded_toy
    timings = results["extra_data"]["seconds"]
    # The kernel started and the notebook ran twice: at the start and after the crash.
    restart = (timings["startup"] + timings["notebook"]) / 2
    double = _test(results, "test_double")["extra_data"]["seconds"]
    assert double < restart / 2, (double, timings)


def test_missing_name_is_explained(graded_toy):
    _, results, _ = graded_toy
    output = _test(results, "test_missing_function")["output"]
    assert "does not define `not_defined_anywhere`" in output
    assert "cell #6" in output  # the broken cell is pointed at


def test_broken_cell_is_recorded_and_training_cells_are_skipped(graded_toy):
    _, results, _ = graded_toy
    assert "cell #6" in results["output"] and "this cell is broken" in results["output"]
    # The training cell sleeps 600 s: had it run, the 120 s submission limit would have stopped grading.
    assert results["execution_time"] < 120
    assert results["extra_data"]["problem"] == ""


def test_limits_that_fired_and_cells_that_raised_are_recorded_for_the_instructor(graded_toy):
    extra = graded_toy[1]["extra_data"]
    # The hang (its test's limit), the crash (a restart) and the hog (out of memory), as `course report` reads them.
    assert extra["limits_fired"] == {"memory": 1, "restarts": 1, "test_seconds": 1}
    [error] = extra["cell_errors"]
    assert {k: error[k] for k in ("cell", "first_line", "error", "message", "at")} == {
        "cell": 6, "first_line": "raise RuntimeError('this cell is broken')", "error": "RuntimeError",
        "message": "this cell is broken", "at": {"cell": 6, "line": 1, "code": "raise RuntimeError('this cell is broken')"}}


def test_memory_is_capped(graded_toy):
    _, results, _ = graded_toy
    hog = _test(results, "test_memory_hog")
    assert hog["score"] == 0 and "MemoryError" in hog["output"]


def test_an_object_that_claims_equality_does_not_pass(graded_toy):
    _, results, _ = graded_toy
    hostile = _test(results, "test_hostile_return")
    assert hostile["score"] == 0 and "expected a torch.Tensor" in hostile["output"]


def test_feedback_never_shows_test_source(graded_toy):
    _, results, _ = graded_toy
    text = json.dumps(results)
    for line in ("assert_close(result.grads[0]", "lab_settings[\"scale\"]", "oracle = torch.nn.Linear"):
        assert line not in text


def test_gradebook_and_resume(graded_toy, toy_course):
    rows, _, out = graded_toy
    with open(out / "grades.csv", newline="") as handle:
        book = list(csv.DictReader(handle))
    assert len(book) == 1
    row = book[0]
    assert (row["student"], row["lab"], float(row["score"]), float(row["max_score"]), row["problem"]) == \
        ("alice", "toy", 6.0, 11.0, "")
    # A rerun over the same folder regrades nothing: results.json is left as it was.
    results_path = out / "alice" / RESULTS_FILE
    before = results_path.stat().st_mtime_ns
    sub = discover(toy_course, [out.parent / "alice.ipynb"], None)
    again = grade_batch(toy_course, sub, out, progress=False)
    assert results_path.stat().st_mtime_ns == before
    assert again[0]["score"] == rows[0]["score"]


def test_changed_submission_is_regraded(toy_course, tmp_path, write_notebook):
    cells = [TOY_CELLS[0], ("def double(x):\n    return [x]", None)]
    path = write_notebook(toy_notebook(cells), "bob.ipynb")
    out = tmp_path / "out"
    first = grade_batch(toy_course, discover(toy_course, [path], None), out, progress=False)
    assert first[0]["score"] == 0
    write_notebook(toy_notebook([TOY_CELLS[0], TOY_CELLS[1]]), "bob.ipynb")
    second = grade_batch(toy_course, discover(toy_course, [path], None), out, progress=False)
    assert second[0]["score"] == 4  # test_double and test_double_rejects_strings


@pytest.mark.parametrize("content,expected", [
    (b"this is not json", "not valid JSON"),
    (b'{"hello": "world"}', "not a Jupyter notebook"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
])
def test_unreadable_submissions_get_a_message_and_zero(toy_course, tmp_path, content, expected):
    path = tmp_path / "broken.ipynb"
    path.write_bytes(content)
    rows = grade_batch(toy_course, discover(toy_course, [path], "toy"), tmp_path / "out", progress=False)
    assert rows[0]["score"] == 0 and expected in rows[0]["problem"]


def test_feedback_page_shows_what_a_student_may_see(graded_toy):
    _, results, out = graded_toy
    page = (out / "alice" / "feedback.html").read_text()
    assert page.startswith("<!doctype html>") and "test_double" in page and "this cell is broken" in page
    assert "test_hostile_return" not in page  # hidden in course.yaml
    assert "1 more test will be shown later" in page
    assert "oracle" not in page and "lab_settings" not in page


def test_a_pytest_plugin_installed_on_the_machine_does_not_run_in_grading(toy_course, tmp_path, write_notebook,
                                                                          monkeypatch):
    """Only pytest's own plugins and the engine's grade: one installed beside them (here one that
    would drop every test) changes nothing."""
    site = tmp_path / "site"
    (site / "drop_all_tests-1.0.dist-info").mkdir(parents=True)
    (site / "drop_all_tests-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: drop-all-tests\nVersion: 1.0\n", encoding="utf-8")
    (site / "drop_all_tests-1.0.dist-info" / "entry_points.txt").write_text(
        "[pytest11]\ndrop_all_tests = drop_all_tests\n", encoding="utf-8")
    (site / "drop_all_tests.py").write_text(
        "def pytest_collection_modifyitems(items):\n    items.clear()\n", encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(site))
    path = write_notebook(toy_notebook([TOY_CELLS[0], TOY_CELLS[1]]), "carol.ipynb")
    rows = grade_batch(toy_course, discover(toy_course, [path], None), tmp_path / "out", progress=False)
    assert rows[0]["score"] == 4  # test_double and test_double_rejects_strings
