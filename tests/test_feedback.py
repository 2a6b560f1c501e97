"""The student's feedback page: what it shows and in which order, each test as its
visibility allows, grouped by the notebook's tasks, everything from the student escaped."""
import datetime as dt
import re

from coursekit.feedback import split_hint, with_hint
from coursekit.feedback_page import render
from coursekit.notebook import Cell
from coursekit.outcomes import CaseOutcome, CellError
from coursekit.results import NOT_RUN_OUTPUT, Results, TestResult, failure_lines
from coursekit.tasks import Task

from .conftest import TOY

NOW = dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
TASKS = [Task("Task 1", "`double(x)`", ["test_one"]), Task("Task 2", "the `<model>`", ["test_two"])]

# What IPython prints for a cell that calls a function of an earlier cell, as the grader
# annotates it with the cells' positions.
TRACEBACK = """---------------------------------------------------------------------------
NotImplementedError                       Traceback (most recent call last)
Cell In[8] (cell #18), line 3
      1 # Self-check for Task 4.
      2 torch.manual_seed(0)
----> 3 mha = MultiHeadAttention(d_model=16, num_heads=4).eval()

Cell In[7] (cell #17), line 10, in MultiHeadAttention.__init__(self, d_model, num_heads)
      9         # YOUR CODE HERE
---> 10         raise NotImplementedError()

File /usr/lib/python3/site-packages/torch/nn/modules/module.py:1, in f()
----> 1 library_line()

NotImplementedError: <b>not yet</b>"""


def _results(visibility, **extra):
    return Results("lab", 1, 3, [TestResult("test_one", 1, 1, "passed", "", "visible"),
                                 TestResult("test_two", 0, 2, "failed", with_hint("<script>alert(1)</script>", "Mind <the> mask"),
                                            visibility)],
                   execution_time=1.0, timings={"total": 1.0, "notebook": 0.4, "tests": 0.5}, extra=extra)


def _cell_error():
    error = CellError(Cell(18, "# Self-check for Task 4.\n<img src=x onerror=alert(1)>"), "NotImplementedError",
                      "<b>not yet</b>", TRACEBACK)
    return error.to_json()


def _visible_text(page):
    return re.sub(r"<style>.*?</style>", "", page, flags=re.DOTALL)


def test_after_due_date_waits_for_the_due_date():
    before = render(_results("after_due_date"), "Lab", TASKS, due=NOW + dt.timedelta(days=1), now=NOW)
    after = render(_results("after_due_date"), "Lab", TASKS, due=NOW - dt.timedelta(days=1), now=NOW)
    assert "test_two" not in before and "1 / 1" in before and "Task 2" not in before
    assert "test_two" in after and "1 / 3" in after


def test_student_text_is_escaped():
    page = render(_results("visible", cell_errors=[_cell_error()]), "Lab", TASKS, now=NOW)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<img" not in page and "<b>not yet" not in page and "&lt;b&gt;not yet" in page
    assert "Mind &lt;the&gt; mask" in page and "the <code>&lt;model&gt;</code>" in page


def test_hidden_tests_are_never_shown():
    page = render(_results("hidden"), "Lab", TASKS, due=NOW - dt.timedelta(days=1), now=NOW)
    assert "test_two" not in page and "Task 2" not in page and "alert" not in page


def test_after_published_waits_for_the_grades_to_be_published():
    graded = render(_results("after_published"), "Lab", TASKS, due=NOW - dt.timedelta(days=1), now=NOW)
    published = render(_results("after_published"), "Lab", TASKS, now=NOW, published=True)
    assert "test_two" not in graded and "when grades are published" in graded
    assert "test_two" in published


def test_the_page_reads_score_tasks_failures_notebook_then_grading():
    page = render(_results("visible", cell_errors=[_cell_error()], restarts=1,
                           skipped_cells=[{"cell": 4, "tags": ["demo"]}, {"cell": 9, "tags": ["training"]}]),
                  "Lab", TASKS, now=NOW)
    order = [page.index(marker) for marker in ("id='score'", "id='tasks'", "id='failed'", "id='notebook'", "id='about'")]
    assert order == sorted(order)
    tasks = page[page.index("id='tasks'"):page.index("id='failed'")]
    assert re.search(r"class='task passed'.*✓ passed.*Task 1: <code>double\(x\)</code>.*1 / 1 points", tasks)
    assert re.search(r"class='task failed'.*✗ failed.*Task 2: .*0 / 2 points", tasks)
    failed = page[page.index("id='failed'"):page.index("id='notebook'")]
    assert "test_two" in failed and "test_one" not in failed
    assert "<p class='hint'><b>Hint:</b> Mind &lt;the&gt; mask</p>" in failed
    about = page[page.index("id='about'"):]
    assert "Cells #4 (tagged demo)" in about and "Cells #9 (tagged training)" in about
    assert "restarted 1 time after it hung" in page


def test_a_cell_that_raised_is_folded_with_the_students_own_line():
    page = render(_results("visible", cell_errors=[_cell_error()]), "Lab", TASKS, now=NOW)
    notebook = page[page.index("id='notebook'"):page.index("id='about'")]
    summary, traceback = re.search(r"<details class='problem'><summary>(.*)</summary>(.*)</details>", notebook,
                                   re.DOTALL).groups()
    assert "<b>Cell #18</b>" in summary and "NotImplementedError" in summary
    # The innermost frame in a notebook cell, not the library's frame after it.
    assert "at cell #17, line 10: <code>raise NotImplementedError()</code>" in summary
    assert "library_line" not in summary and "library_line" in traceback
    assert "<details class='problem' open" not in page


def test_student_line_of_a_syntax_error_comes_from_the_cell():
    error = CellError(Cell(5, "x = 1\ndef f(:\n    pass"), "SyntaxError", "invalid syntax",
                      "  Cell In[3] (cell #5), line 2\n    def f(:\n          ^\nSyntaxError: invalid syntax\n")
    assert error.student_line() == {"cell": 5, "line": 2, "code": "def f(:"}
    assert CellError(Cell(6, "x"), "TimeoutError", "ran past the limit", "").student_line() == {}


def test_tests_without_a_task_go_under_other_and_without_tasks_under_tests():
    results = _results("visible")
    results.tests.append(TestResult("test_three", 0, 1, "failed", "wrong", "visible"))
    assert "<b>Other</b>" in render(results, "Lab", TASKS, now=NOW)
    untasked = render(results, "Lab", [], now=NOW)
    assert "<b>Tests</b>" in untasked and "Task 1" not in untasked


def test_tests_left_out_with_only_are_not_run_not_failed():
    results = _results("visible", only_tests=["test_one"])
    results.tests[1] = TestResult("test_two", 0, 2, "failed", NOT_RUN_OUTPUT, "visible")   # as score_tests writes it
    page = render(results, "Lab", TASKS, now=NOW)
    assert "– not run" in page and "What failed" in page
    failed = page[page.index("id='failed'"):page.index("id='about'")]
    assert "test_two" not in failed and "Nothing: every test shown here passed." in failed
    assert "Not run in this grading" in page[page.index("id='about'"):]


def test_a_submission_that_could_not_be_graded_shows_its_tests_as_not_run():
    from coursekit.config import load_course
    from coursekit.results import failed_results

    lab = load_course(TOY / "course.yaml").lab("toy")
    page = render(failed_results(lab, "Grading failed: the notebook's process could not start.", 0.0, {}),
                  "Lab", [], now=NOW)
    assert "Grading failed: the notebook&#x27;s process could not start." in page
    tasks = page[page.index("id='tasks'"):page.index("id='failed'")]
    shown = [name for name, spec in lab.tests.items() if spec.visibility == "visible"]
    assert "✗ failed" not in tasks and tasks.count(", not run</span>") == len(shown)
    assert "No test ran: see why above." in page
    assert "Not run in this grading (the grading stopped before them)" in page


def test_the_page_stands_alone_and_fits_a_phone():
    page = render(_results("visible", cell_errors=[_cell_error()]), "Lab", TASKS, now=NOW)
    assert "<meta name='viewport' content='width=device-width, initial-scale=1'>" in page
    assert not re.search(r"<script|<link|@import|url\(|src=['\"]|https?://", _visible_text(page))


def test_late_work_says_when_and_shows_the_score_after_the_penalty():
    late = {"submitted": "2026-11-24T10:00:00+00:00", "due": "2026-11-22T12:00:00+00:00", "days_late": 2,
            "penalty_percent": 20, "past_cutoff": False}
    page = render(_results("visible", late=late), "Lab", TASKS, now=NOW)
    header = page[page.index("id='score'"):page.index("id='tasks'")]
    assert "2 day(s) after the due date (2026-11-22 12:00 UTC): a late penalty of 20% of your score" in header
    assert "After the late penalty: <b>0.8 / 3</b> points." in header
    on_time = render(_results("visible", late={**late, "days_late": 0, "penalty_percent": 0}), "Lab", TASKS, now=NOW)
    assert "After the late penalty" not in on_time


def test_cases_failing_alike_share_one_line():
    lines = failure_lines([CaseOutcome("t", f"n={n}", False, "raised NotImplementedError", 0) for n in (1, 2, 3)]
                         + [CaseOutcome("t", "n=4", False, "off by one", 0)])
    assert lines == ["[3 cases: n=1; n=2; n=3] raised NotImplementedError", "[n=4] off by one"]
    assert failure_lines([CaseOutcome("t", "", False, "wrong", 0)]) == ["wrong"]


def test_hint_round_trips_through_a_tests_output():
    assert split_hint(with_hint("0/2 cases passed\n[a] wrong", "look at a")) == ("0/2 cases passed\n[a] wrong", "look at a")
    assert split_hint("wrong") == ("wrong", "")


def test_results_round_trip_through_results_json():
    results = _results("hidden")
    results.key, results.extra, results.timings = "abc", {"student": "s", "note": ""}, {"total": 1.0}
    data = results.to_json()
    assert data["extra_data"]["key"] == "abc" and data["tests"][1]["visibility"] == "hidden"
    assert Results.from_json(data) == results
