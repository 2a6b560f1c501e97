"""The student's feedback page follows each test's visibility."""
import datetime as dt

from coursekit.feedback import render
from coursekit.results import Results, TestResult

NOW = dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)


def _results(visibility):
    return Results("lab", 1, 3, [TestResult("test_one", 1, 1, "passed", "", "visible"),
                                 TestResult("test_two", 0, 2, "failed", "<script>alert(1)</script>", visibility)],
                   execution_time=1.0)


def test_after_due_date_waits_for_the_due_date():
    before = render(_results("after_due_date"), "Lab", due=NOW + dt.timedelta(days=1), now=NOW)
    after = render(_results("after_due_date"), "Lab", due=NOW - dt.timedelta(days=1), now=NOW)
    assert "test_two" not in before and "1 / 1" in before
    assert "test_two" in after and "1 / 3" in after


def test_student_text_is_escaped():
    page = render(_results("visible"), "Lab", now=NOW)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_hidden_tests_are_never_shown():
    page = render(_results("hidden"), "Lab", due=NOW - dt.timedelta(days=1), now=NOW)
    assert "test_two" not in page


def test_after_published_waits_for_the_grades_to_be_published():
    graded = render(_results("after_published"), "Lab", due=NOW - dt.timedelta(days=1), now=NOW)
    published = render(_results("after_published"), "Lab", now=NOW, published=True)
    assert "test_two" not in graded and "when grades are published" in graded
    assert "test_two" in published


def test_results_round_trip_through_results_json():
    from coursekit.results import Results

    results = _results("hidden")
    results.key, results.extra, results.timings = "abc", {"student": "s", "note": ""}, {"total": 1.0}
    data = results.to_json()
    assert data["extra_data"]["key"] == "abc" and data["tests"][1]["visibility"] == "hidden"
    assert Results.from_json(data) == results
