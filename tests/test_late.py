"""Late work: timestamps (nbgrader's timestamp.txt, or NAME.timestamp.txt beside a loose
notebook) against each student's due date, the lab's late policy on top of the raw
score, through grades.csv, the student's feedback, the Canvas and per-test exports and
nbgrader's gradebook. Grading is not what this is about: the results are written
directly, under the key a grading would give them, so the batch grades nothing."""
from __future__ import annotations

import csv
import io
import shutil

import nbformat
import pytest
import yaml

from coursekit.batch import discover, grade_batch
from coursekit.cli import main
from coursekit.config import load_course
from coursekit.gradebook import open_gradebook
from coursekit.keys import key_of, key_parts
from coursekit.late import parse_timestamp
from coursekit.results import RESULTS_FILE, Results, TestResult, read_results, save_submission
from coursekit.runners import Runner

from .conftest import TOY, TOY_CELLS, toy_notebook

RAW = 10.0   # every student's raw score, of the toy lab's 11
# student: (where the notebook is, its timestamp, what the late policy leaves of RAW, days late)
CASES = {
    "alice": ("loose", "2026-01-01 11:00:00.000000 UTC", 10.0, 0),       # on time
    "bob": ("nbgrader", "2026-01-02 13:00:00.123456 UTC", 8.0, 2),       # 1 day 1 hour: two started days, 20%
    "cleo": ("loose", "2026-01-06T12:00:00Z", 7.0, 5),                   # five days, 50%, capped at 30%
    "carol": ("nbgrader", "2026-01-04 11:00:00 UTC", 10.0, 0),           # late, but within her 3-day extension
    "frank": ("loose", "2026-01-10 13:00:00 UTC", 7.0, 7),               # past the cutoff, not past his (extended)
    "dave": ("nbgrader", "2026-01-09 12:00:00 UTC", 0.0, 8),             # past the cutoff: zero
    "erin": ("loose", None, 10.0, 0),                                    # no timestamp: never late
}


class NoGrading(Runner):
    def run(self, job):
        raise AssertionError(f"{job.notebook} was graded: its results were written to be reused")


@pytest.fixture(scope="module")
def late_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("late")
    shutil.copytree(TOY, root / "course")
    config = yaml.safe_load((root / "course" / "course.yaml").read_text())
    config["labs"][0].update(due="2026-01-01T12:00:00Z",
                             late={"percent_per_day": 10, "max_percent": 30, "cutoff": "2026-01-08T12:00:00Z"})
    config["extensions"] = {"carol": {"toy": 3}, "frank": {"toy": 3}}
    (root / "course" / "course.yaml").write_text(yaml.safe_dump(config))
    course = load_course(root / "course" / "course.yaml")
    lab = course.lab("toy")
    out = root / "out"
    nb = toy_notebook(TOY_CELLS[:3])
    for student, (where, stamp, _, _) in CASES.items():
        if where == "nbgrader":
            notebook = root / "submitted" / student / "toy" / "toy.ipynb"
            stamp_file, folder = notebook.parent / "timestamp.txt", out / student / "toy"
        else:
            notebook = root / "loose" / f"{student}.ipynb"
            stamp_file, folder = root / "loose" / f"{student}.timestamp.txt", out / student
        notebook.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, notebook)
        if stamp:
            stamp_file.write_text(stamp + "\n")
        parts = key_parts(lab, notebook)
        tests = [TestResult("test_double", 3, 3, "passed", "", "visible"),
                 TestResult("test_module_forward_and_grads", RAW - 3, 8, "failed", "", "visible")]
        save_submission(folder, lab, Results("toy", RAW, lab.max_score, tests, key=key_of(parts),
                                             extra={"student": student, "key_parts": parts}))
    submissions = discover(course, [root / "submitted", root / "loose"], None)
    rows = grade_batch(course, submissions, out, progress=False, gradebook=True, runner=NoGrading())
    return course, out, {row["student"]: row for row in rows}


def test_timestamps_are_read_in_nbgraders_format_and_iso():
    assert parse_timestamp("2026-01-02 13:00:00.123456 UTC").isoformat() == "2026-01-02T13:00:00.123456+00:00"
    assert parse_timestamp("2026-01-02 14:00:00 +0100").isoformat() == "2026-01-02T13:00:00+00:00"
    assert parse_timestamp("2026-01-02 08:00:00 America/New_York").isoformat() == "2026-01-02T13:00:00+00:00"
    assert parse_timestamp("2026-01-02T13:00:00").isoformat() == "2026-01-02T13:00:00+00:00"   # no zone: UTC
    for wrong in ("yesterday", "12", "2026-01-02 13:00:00 Mars/Olympus"):
        with pytest.raises(ValueError):
            parse_timestamp(wrong)


def test_grades_csv_keeps_the_raw_score_and_applies_the_penalty_on_top(late_batch):
    _, out, _ = late_batch
    with open(out / "grades.csv", newline="") as handle:
        book = {row["student"]: row for row in csv.DictReader(handle)}
    assert set(book) == set(CASES)
    for student, (_, stamp, final, days) in CASES.items():
        row = book[student]
        assert float(row["score"]) == RAW, student
        assert (float(row["final_score"]), int(row["days_late"])) == (final, days), student
        assert float(row["late_penalty"]) == pytest.approx(RAW - final), student
        assert float(row["percent"]) == round(100 * final / 11, 1), student
        assert bool(row["submitted"]) == bool(stamp), student


def test_the_batch_grades_nothing_and_results_json_keeps_the_raw_score(late_batch):
    _, out, rows = late_batch
    assert rows["dave"]["score"] == RAW and rows["dave"]["final_score"] == 0
    recorded = read_results(out / "dave" / "toy" / RESULTS_FILE)
    assert recorded.score == RAW
    assert recorded.extra["late"]["past_cutoff"] and recorded.extra["late"]["penalty_percent"] == 100


def test_feedback_says_when_it_was_handed_in_and_what_lateness_costs(late_batch):
    _, out, _ = late_batch
    page = lambda *folder: out.joinpath(*folder, "feedback.html").read_text()  # noqa: E731
    assert "Submitted 2026-01-01 11:00 UTC, on time" in page("alice")
    assert "2 day(s) after the due date (2026-01-01 12:00 UTC): a late penalty of 20% of your score" in page("bob", "toy")
    assert "on time (due 2026-01-04 12:00 UTC, with your 3-day extension)" in page("carol", "toy")
    assert "past the last date late work is accepted: it scores 0" in page("dave", "toy")
    assert "Submitted" not in page("erin")


def test_canvas_gets_the_score_after_the_penalty(late_batch, capsys):
    course, out, _ = late_batch
    assert main(["--course", str(course.path), "export", str(out)]) == 0
    table = list(csv.reader(io.StringIO((out / "canvas.csv").read_text())))
    toy_column = table[0].index(course.lab("toy").title)
    assert {row[0]: float(row[toy_column]) for row in table[2:]} == {s: final for s, (_, _, final, _) in CASES.items()}


def test_the_per_test_export_has_raw_scores_and_the_penalty(late_batch):
    course, out, _ = late_batch
    assert main(["--course", str(course.path), "export", str(out), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO((out / "tests.csv").read_text())))
    bob = [row for row in rows if row["student"] == "bob"]
    assert [(r["test"], r["score"]) for r in bob] == [("test_double", "3"), ("test_module_forward_and_grads", "7")]
    assert {(r["days_late"], r["late_penalty_percent"]) for r in bob} == {("2", "20")}


def test_an_extension_granted_later_applies_without_a_regrade(late_batch, tmp_path):
    """The export follows course.yaml as it is now; `course grade` then refreshes the rest."""
    course, out, _ = late_batch
    config = yaml.safe_load(course.path.read_text())
    config["extensions"]["bob"] = {"toy": 2}
    edited = tmp_path / "course.yaml"
    edited.write_text(yaml.safe_dump(config))
    assert main(["--course", str(edited), "export", str(out), "--to", str(tmp_path / "canvas.csv")]) == 0
    table = list(csv.reader(io.StringIO((tmp_path / "canvas.csv").read_text())))
    assert next(row for row in table if row[0] == "bob")[5] == "10"


def test_nbgraders_gradebook_has_the_timestamp_extension_and_penalty(late_batch):
    course, _, _ = late_batch
    with open_gradebook(course) as book:
        bob, carol = book.find_submission("toy", "bob"), book.find_submission("toy", "carol")
        assert bob.total_seconds_late > 0 and bob.extension is None
        # nbgrader's own due date includes the extension: carol is on time there too.
        assert carol.extension.days == 3 and carol.total_seconds_late == 0
        assert book.find_submission_notebook("toy", "toy", "bob").late_submission_penalty == pytest.approx(2.0)
        assert book.find_submission_notebook("toy", "toy", "carol").late_submission_penalty == 0
        assert book.find_submission_notebook("toy", "toy", "dave").late_submission_penalty == pytest.approx(RAW)


def test_a_timestamp_that_is_not_one_is_a_clear_error(tmp_path, toy_course, write_notebook, capsys):
    write_notebook(toy_notebook(TOY_CELLS[:1]), "zoe.ipynb")
    (tmp_path / "zoe.timestamp.txt").write_text("last tuesday")
    assert main(["--course", str(toy_course.path), "grade", str(tmp_path / "zoe.ipynb"), "--out",
                 str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("course: ") and "zoe.timestamp.txt" in err and "2026-12-01 23:59:00 UTC" in err
