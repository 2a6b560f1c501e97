"""``course export OUT``: the grades of a results folder for a learning-management system.

- ``--format canvas``: Canvas's gradebook import CSV. Its first columns are Canvas's own
  (Student, ID, SIS User ID, SIS Login ID, Section), then one column per lab, headed by the
  lab's title; the second row is Canvas's "Points Possible" row. With a roster (Canvas's
  gradebook export, or any CSV with those columns) the rows are the roster's students, matched
  on SIS Login ID, SIS User ID or ID, and a student with no submission gets an empty cell (not
  a zero); graded students missing from the roster are reported. Without one, every graded
  student is a row, named by the id they were graded under.
- ``--format csv``: one row per student, lab and hidden test, for analysis.

Both apply course.yaml's late policies and extensions as they are now (coursekit.late),
to the timestamp each result recorded: Canvas gets the score after the penalty (a
column is an assignment there, so the raw score is not sent), the per-test CSV the raw
test scores beside the submission's penalty.
"""
from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from coursekit.config import Course
from coursekit.late import Lateness, assess
from coursekit.results import RESULTS_FILE, Results, read_results

CANVAS_COLUMNS = ["Student", "ID", "SIS User ID", "SIS Login ID", "Section"]
ROSTER_KEYS = ("SIS Login ID", "SIS User ID", "ID")   # what a graded student's id may be in a roster


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class Graded:
    student: str
    results: Results

    def lateness(self, course: Course) -> Lateness:
        """The lab's late policy and the student's extension, as course.yaml says now."""
        recorded = Lateness.from_json(self.results.extra.get("late"))
        lab = course.labs.get(self.results.lab)
        return assess(lab, self.student, recorded.submitted) if lab else recorded

    def final_score(self, course: Course) -> float:
        return self.lateness(course).final(self.results.score)


def graded_results(out: Path, progress: bool = False) -> list[Graded]:
    """Every results.json under `out` (`<student>/results.json` or `<student>/<lab>/...`);
    `progress`: a bar on stderr, for the folders of large classes."""
    found, paths = [], sorted(out.rglob(RESULTS_FILE))
    for path in tqdm(paths, desc="reading results", unit="file", disable=not (progress and paths), file=sys.stderr):
        results = read_results(path)
        if results is not None and results.lab:
            student = str(results.extra.get("student") or path.parent.relative_to(out).parts[0])
            found.append(Graded(student, results))
    if not found:
        raise ExportError(f"{out}: no graded submissions (results.json) in this folder; "
                          "pass the --out folder of `course grade`")
    return found


def read_roster(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not any(key in rows[0] for key in ROSTER_KEYS):
        raise ExportError(f"{path}: a roster needs a header with one of {', '.join(ROSTER_KEYS)} "
                          "(Canvas's gradebook export has them)")
    # Canvas's own export has a "Points Possible" row (and sometimes a muted row) before the students.
    return [row for row in rows if (row.get("Student") or "").strip() not in ("Points Possible", "")
            or any((row.get(k) or "").strip() for k in ROSTER_KEYS)]


def canvas_csv(course: Course, graded: list[Graded], roster: list[dict[str, str]] | None) -> tuple[str, list[str]]:
    """The CSV text, and the warnings (graded students the roster does not list)."""
    labs = list(course.labs.values())
    scores: dict[str, dict[str, float]] = {}
    for g in graded:
        scores.setdefault(g.student, {})[g.results.lab] = g.final_score(course)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CANVAS_COLUMNS + [lab.title for lab in labs])
    writer.writerow(["    Points Possible", "", "", "", ""] + [f"{lab.max_score:g}" for lab in labs])
    warnings = []
    if roster is None:
        for student in sorted(scores):
            writer.writerow([student, "", "", student, ""] + [_cell(scores[student], lab.id) for lab in labs])
        return buffer.getvalue(), warnings
    matched = set()
    for row in roster:
        student = next((row[k].strip() for k in ROSTER_KEYS if (row.get(k) or "").strip() in scores), None)
        matched.add(student)
        writer.writerow([row.get(k, "") for k in CANVAS_COLUMNS]
                        + [_cell(scores.get(student, {}), lab.id) for lab in labs])
    missing = sorted(set(scores) - matched)
    if missing:
        warnings.append(f"{len(missing)} graded student(s) are not in the roster and were left out: "
                        + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    return buffer.getvalue(), warnings


def tests_csv(course: Course, graded: list[Graded]) -> str:
    """Raw test scores; the late columns are the submission's, the same on each of its rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["student", "lab", "test", "score", "max_score", "status", "submitted", "days_late",
                     "late_penalty_percent"])
    for g in sorted(graded, key=lambda g: (g.results.lab, g.student)):
        late = g.lateness(course)
        for test in g.results.tests:
            writer.writerow([g.student, g.results.lab, test.name, f"{test.score:g}", f"{test.max_score:g}",
                             test.status, late.submitted.isoformat() if late.submitted else "", late.days_late,
                             f"{late.percent:g}"])
    return buffer.getvalue()


def _cell(scores: dict[str, float], lab_id: str) -> str:
    return f"{scores[lab_id]:g}" if lab_id in scores else ""
