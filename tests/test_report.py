"""`course report`: the instructor's page of where a class struggles, checked against the
results it is made from. One small class of lab 01 is graded once for the module: the
reference, the release stub and two mutants (these three on the tests the mutants must lose,
so that each test's pass rate counts only those it ran for), one mutant arriving in a zip
with a refused entry, a student who submitted nothing and a notebook of no known lab."""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import importlib
import re
import statistics
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from coursekit.batch import Submission, discover, grade_batch
from coursekit.cli import main
from coursekit.config import LatePolicy, load_course
from coursekit.export import graded_results
from coursekit.late import DAY, assess
from coursekit.outcomes import CaseOutcome
from coursekit.report import lab_reports
from coursekit.report_page import REPORT_FOLDER
from coursekit.results import Results, TestResult, save_submission, score_tests

COURSE = load_course(Path(__file__).resolve().parent.parent / "course.yaml")
LAB = COURSE.lab("01_attention")
MUTANTS = {m.name: m for m in importlib.import_module(f"mutants.{LAB.id}").MUTANTS}
GRADED_MUTANTS = ("inverted_mask", "mask_after_softmax")
# The stub on the same tests as the mutants: it fails every test it runs, and costs less.
STUB_TESTS = tuple(sorted({t for name in GRADED_MUTANTS for t in MUTANTS[name].loses}))
SELF_CHECK_1 = "# Self-check for Task 1 (cheap; the hidden tests check much more)."


class Tables(HTMLParser):
    """Each <table id=...> of a page as rows of cell texts (whitespace collapsed)."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._rows: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._rows = self.tables.setdefault(dict(attrs).get("id", ""), [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._rows[-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._rows = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table_id: str) -> list[list[str]]:
        return self.tables[table_id][1:]   # without the header


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    out = root / "out"
    source = nbformat.read(LAB.notebook_in("source"), as_version=4)
    inverted = nbformat.writes(MUTANTS["inverted_mask"].apply(source)).encode()
    with zipfile.ZipFile(root / "inverted_mask.zip", "w") as zf:
        zf.writestr(LAB.notebook, inverted)
        zf.writestr("../escaped.ipynb", inverted)
    nbformat.write(MUTANTS["mask_after_softmax"].apply(source), root / "mask_after_softmax.ipynb")
    nbformat.write(nbformat.v4.new_notebook(), root / "mystery.ipynb")   # no lab in it, no lab's name
    (root / "submitted" / "carol" / LAB.id).mkdir(parents=True)           # submitted nothing
    found = discover(COURSE, [root / "inverted_mask.zip", root / "mask_after_softmax.ipynb", root / "mystery.ipynb",
                              root / "submitted"], None, unpack_dir=out / ".unpacked")
    subs = [dataclasses.replace(s, only=tuple(MUTANTS[s.name].loses)) if s.name in MUTANTS else s for s in found]
    subs += [Submission("reference", LAB.notebook_in("source"), LAB),
             Submission("release-stub", LAB.notebook_in("release"), LAB, only=STUB_TESTS)]
    assert sum(s.notebook is not None and s.lab is not None and not s.problem for s in subs) == 4
    grade_batch(COURSE, subs, out, workers=2, progress=False)
    assert main(["--course", str(COURSE.path), "report", str(out), "--lab", LAB.id]) == 0
    page = (out / REPORT_FOLDER / f"{LAB.id}.html").read_text(encoding="utf-8")
    results = {g.student: g.results for g in graded_results(out)}
    return out, results, page, Tables(page)


def test_the_class_is_what_the_report_is_made_of(graded_class):
    _, results, _, _ = graded_class
    assert sorted(results) == ["carol", "inverted_mask", "mask_after_softmax", "reference", "release-stub"]
    assert results["reference"].score == LAB.max_score
    assert results["carol"].problem and not any(t.ran for t in results["carol"].tests)


def test_histogram_counts_every_submission_by_its_score(graded_class):
    _, results, _, tables = graded_class
    expected = [0] * 10
    for r in results.values():
        expected[min(9, int(10 * r.score / r.max_score))] += 1
    assert [int(row[1]) for row in tables.rows("scores")] == expected
    assert tables.rows("scores")[-1] == ["90–100%", "1"]        # the reference alone
    assert sum(expected) == 5


def test_pass_rates_count_only_where_a_test_ran_hardest_first(graded_class):
    _, results, _, tables = graded_class
    rows = {row[0]: row for row in tables.rows("tests")}
    assert set(rows) == set(LAB.tests)
    for name in LAB.tests:
        ran = [t for r in results.values() for t in r.tests if t.name == name and t.ran]
        passed = sum(t.status == "passed" for t in ran)
        assert rows[name][2] == f"{passed} / {len(ran)}", name
        assert rows[name][3] == f"{100 * passed / len(ran):.0f}%", name
    # Both mutants and the stub fail it, the reference passes; carol's did not run.
    assert rows["test_sdpa_masks"][2:4] == ["1 / 4", "25%"]
    assert rows["test_sdpa_matches_pytorch"][2:4] == ["1 / 1", "100%"]     # the reference alone ran it
    rates = [int(row[3].rstrip("%")) for row in tables.rows("tests")]
    assert rates == sorted(rates)


def _failures(tables, test):
    return [row for row in tables.rows("failures") if row[0] == test]


def test_failures_are_grouped_across_students_whatever_their_numbers(graded_class):
    _, results, _, tables = graded_class
    message = "output (mask: 0/1 float mask) differs from the reference: max abs diff"
    group = next(row for row in _failures(tables, "test_sdpa_masks") if row[2].startswith(message))
    # Both mutants fail this case with other differences at other indices: one group of two, where
    # the numbers they share stay and those that differ are elided.
    assert group[1] == "2" and group[2].endswith("cases: 0/1 float mask inverted_mask, mask_after_softmax")
    assert re.match(re.escape(message) + r" … \(at index \(([\d…]+, ){2}[\d…]+\); \d+ of \d+ elements off; "
                    r"atol=2e-05, rtol=0.0001\)", group[2]), group[2]
    assert group[2].count("…") >= 1
    outputs = [next(t.output for t in results[s].tests if t.name == "test_sdpa_masks") for s in GRADED_MUTANTS]
    differences = [re.search(r"\[0/1 float mask\] " + re.escape(message) + r" (\S+)", o).group(1) for o in outputs]
    assert len(differences) == 2 and differences[0] != differences[1]
    # The stub's cases raise the same error: one group, one student, its traceback left out.
    stub = next(row for row in _failures(tables, "test_sdpa_fully_masked_rows") if "NotImplementedError" in row[2])
    assert stub[1] == "1" and stub[2] == ("Your code raised NotImplementedError cases: a whole batch element padded, "
                                          "causal with Lq > Lk, everything masked, one query row masked release-stub")
    # Groups are shown the most frequent first.
    counts = [int(row[1]) for row in _failures(tables, "test_mha_calls_student_sdpa")]
    assert counts == [2, 1]


def test_cells_that_raised_come_from_the_recorded_cell_errors(graded_class):
    _, results, _, tables = graded_class
    raised = {s for s, r in results.items() for e in r.extra.get("cell_errors", []) if e["first_line"] == SELF_CHECK_1}
    assert raised == {"inverted_mask", "mask_after_softmax", "release-stub"}
    first, cell, students, errors = tables.rows("cells")[0]
    assert first == SELF_CHECK_1 and students == "3"
    assert cell == ", ".join(map(str, sorted({e["cell"] for s in raised for e in results[s].extra["cell_errors"]
                                              if e["first_line"] == SELF_CHECK_1})))
    assert errors.startswith("AssertionError (2), NotImplementedError (1)")


def test_grading_times_and_no_limit_fired(graded_class):
    _, results, page, tables = graded_class
    graded = [r for r in results.values() if any(t.ran for t in r.tests)]
    total = next(row for row in tables.rows("times") if row[0] == "total")
    assert total[1] == str(len(graded)) == "4"
    assert total[2] == f"{statistics.median(r.timings['total'] for r in graded):.1f}"
    assert total[4] == f"{max(r.timings['total'] for r in graded):.1f}"
    assert all(r.extra["limits_fired"] == {} for r in graded)
    assert "No limit fired." in page


def test_students_with_a_problem(graded_class):
    tables = graded_class[3]
    problems = {row[0]: row for row in tables.rows("problems")}
    assert set(problems) == {"carol", "release-stub", "inverted_mask", "mystery"}
    assert problems["carol"][1] == "0" and "no notebook was found" in problems["carol"][2]
    assert problems["release-stub"][2] == "scored 0"
    assert "'../escaped.ipynb' was not unpacked" in problems["inverted_mask"][2]   # refused from its zip
    assert problems["mystery"][1] == "—" and "cannot tell which lab" in problems["mystery"][2]   # grades.csv only


def test_the_page_is_self_contained_with_each_plot_beside_it(graded_class):
    out, _, page, _ = graded_class
    embedded = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    plots = sorted((out / REPORT_FOLDER).glob(f"{LAB.id}-*.png"))
    assert [p.name.removeprefix(f"{LAB.id}-") for p in plots] == ["cells.png", "scores.png", "tests.png", "times.png"]
    assert sorted(base64.b64decode(data) for data in embedded) == sorted(p.read_bytes() for p in plots)
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in plots)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert all(ref.startswith("data:image/png;base64,") for ref in re.findall(r"(?:src|href)=['\"]?([^'\" >]*)", page))


def test_a_lab_the_folder_does_not_hold_is_a_clear_error(graded_class, capsys):
    out = graded_class[0]
    assert main(["--course", str(COURSE.path), "report", str(out), "--lab", "02_transformer_block"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]   # after the progress bar
    assert last.startswith(f"course: {out}: no results of lab '02_transformer_block'") and "01_attention" in last


def test_a_folder_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["--course", str(COURSE.path), "report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"course: {tmp_path}: no graded submissions" in err
    assert not (tmp_path / REPORT_FOLDER).exists()


def test_limits_that_fired_and_results_from_before_they_were_recorded(tmp_path, toy_course):
    lab = toy_course.lab("toy")
    ran = [TestResult("test_double", 0, 3, "failed", "your code did not finish within this test's time limit",
                      "visible", 4.0)]
    fired = {"alice": {"test_seconds": 2, "restarts": 1}, "bob": {"test_seconds": 1, "memory": 1}}
    for student, limits in fired.items():
        save_submission(tmp_path / student, lab, Results("toy", 0, lab.max_score, ran, timings={"total": 9.0},
                                                         extra={"student": student, "limits_fired": limits,
                                                                "cell_errors": []}))
    save_submission(tmp_path / "old", lab, Results("toy", 3, lab.max_score, ran, extra={"student": "old"}))
    assert main(["--course", str(toy_course.path), "report", str(tmp_path)]) == 0
    page = (tmp_path / REPORT_FOLDER / "toy.html").read_text(encoding="utf-8")
    limits = {row[0]: row[1:] for row in Tables(page).rows("limits")}
    assert limits == {"test_seconds": ["2", "3", "alice, bob"], "memory": ["1", "1", "bob"],
                      "restarts": ["1", "1", "alice"]}
    assert "1 graded submission(s) were graded before the grader recorded its cells" in page


def test_a_zero_after_the_late_cutoff_is_a_problem(tmp_path, toy_course):
    due = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    lab = dataclasses.replace(toy_course.lab("toy"), due=due, late=LatePolicy(10, cutoff=due + 3 * DAY),
                              extensions={"carol": 5})
    course = dataclasses.replace(toy_course, labs={"toy": lab})
    ran = [TestResult("test_double", 3, 3, "passed", "", "visible")]
    for student in ("bob", "carol", "dave"):   # carol's extension covers it; dave was on time
        submitted = due + (0 if student == "dave" else 5) * DAY
        save_submission(tmp_path / student, lab, Results("toy", 3, lab.max_score, ran, extra={
            "student": student, "late": assess(lab, student, submitted).to_json()}))
    [report] = lab_reports(course, tmp_path)
    assert [(p.student, p.score, p.why) for p in report.problems] == [
        ("bob", 3, "handed in past the late cutoff: 0 after the late policy")]


def test_failed_cases_read_back_what_score_tests_wrote(toy_course):
    lab = toy_course.lab("toy")
    traceback = "Your code raised ValueError: bad\n  cell #3, line 2, in double\n    raise ValueError('bad')"
    outcomes = [CaseOutcome("test_double", "a", True, "", 0.1), CaseOutcome("test_double", "b", False, traceback, 0.1),
                CaseOutcome("test_double", "c", False, "differs: max abs diff 0.5", 0.1),
                CaseOutcome("test_slow_function", "", False, "your code did not finish", 0.1)]
    tests = {t.name: t for t in score_tests(lab, outcomes, {"test_double": "double it"})}
    assert tests["test_double"].output.endswith("Hint: double it")
    assert tests["test_double"].failed_cases() == [("b", traceback), ("c", "differs: max abs diff 0.5")]
    assert tests["test_slow_function"].failed_cases() == [("", "your code did not finish")]
    assert not tests["test_after_crash"].ran and tests["test_after_crash"].failed_cases() == []
