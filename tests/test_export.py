"""`course export`: Canvas's gradebook import CSV and the per-test CSV, from a results folder."""
from __future__ import annotations

import csv
import io

import pytest

from coursekit.cli import main
from coursekit.export import CANVAS_COLUMNS
from coursekit.results import Results, TestResult, save_submission


@pytest.fixture
def out(tmp_path, toy_course):
    lab = toy_course.lab("toy")
    for student, score in (("alice", 8.0), ("bob", 3.5), ("mallory", 11.0)):
        tests = [TestResult("test_double", min(score, 3), 3, "passed", "", "visible")]
        save_submission(tmp_path / "out" / student, lab,
                        Results("toy", score, lab.max_score, tests, extra={"student": student}))
    return tmp_path / "out"


def rows(path):
    return list(csv.reader(io.StringIO(path.read_text())))


def test_canvas_csv_with_a_roster(out, tmp_path, toy_course, capsys):
    roster = tmp_path / "roster.csv"
    roster.write_text("Student,ID,SIS User ID,SIS Login ID,Section\n"
                      "    Points Possible,,,,\n"
                      "\"Liddell, Alice\",101,s1,alice,A\n\"Builder, Bob\",102,s2,bob,A\n\"Doe, Carol\",103,s3,carol,B\n")
    assert main(["--course", str(toy_course.path), "export", str(out), "--roster", str(roster)]) == 0
    table = rows(out / "canvas.csv")
    titles = [lab.title for lab in toy_course.labs.values()]
    assert table[0] == CANVAS_COLUMNS + titles
    assert table[1][0].strip() == "Points Possible" and table[1][5] == f"{toy_course.lab('toy').max_score:g}"
    by_login = {row[3]: row for row in table[2:]}
    assert by_login["alice"][:5] == ["Liddell, Alice", "101", "s1", "alice", "A"] and by_login["alice"][5] == "8"
    assert by_login["bob"][5] == "3.5"
    assert by_login["carol"][5] == ""                  # in the roster, no submission: empty, not 0
    assert "mallory" not in by_login                   # graded, not in the roster: left out, and said
    assert "mallory" in capsys.readouterr().err


def test_canvas_csv_without_a_roster_lists_every_graded_student(out, toy_course):
    assert main(["--course", str(toy_course.path), "export", str(out)]) == 0
    table = rows(out / "canvas.csv")
    assert [row[0] for row in table[2:]] == ["alice", "bob", "mallory"]
    assert [row[5] for row in table[2:]] == ["8", "3.5", "11"]


def test_per_test_csv(out, toy_course):
    assert main(["--course", str(toy_course.path), "export", str(out), "--format", "csv"]) == 0
    table = rows(out / "tests.csv")
    assert table[0] == ["student", "lab", "test", "score", "max_score", "status", "submitted", "days_late",
                        "late_penalty_percent"]
    assert ["alice", "toy", "test_double", "3", "3", "passed", "", "0", "0"] in table  # no timestamp: not late


def test_a_folder_without_results_is_a_clear_error(tmp_path, toy_course, capsys):
    assert main(["--course", str(toy_course.path), "export", str(tmp_path)]) == 2
    assert "no graded submissions" in capsys.readouterr().err
