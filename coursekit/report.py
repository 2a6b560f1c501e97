"""``course report OUT``: where a class struggles, lab by lab, from a results folder alone.

Everything here is counted from what `course grade` wrote (results.json and grades.csv),
which holds only what students may read: their scores, the messages of their failed cases,
the cells that raised, the limits that stopped their code. No suite is read or run.
Rendering the page is coursekit.report_page's job.
"""
from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coursekit.config import Course
from coursekit.export import Graded, graded_results
from coursekit.results import GRADEBOOK_FILE, Results, read_gradebook

SCORE_BINS = 10                  # of 10 percentage points each; the last holds 100%
TIME_PARTS = ("total", "startup", "notebook", "tests", "slowest_cell")   # Results.timings' keys
SLOWEST = 5
# A number in a message (a difference, an index, a size, a line): it differs from student to
# student, so it must not split a group. Digits inside a word (float32, d_k2) are not numbers.
_VALUE = re.compile(r"(?<![\w.])[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?!\w)|\b(?:nan|inf)\b")
VARIES = "…"                     # where a grouped message's numbers differ between students


class ReportError(ValueError):
    pass


@dataclass(frozen=True)
class TestRate:
    __test__ = False  # not a pytest test class
    name: str
    points: float
    ran: int          # submissions it ran for (not those graded with --only without it, nor ungradable ones)
    passed: int       # of those, every case passed
    mean_points: float

    @property
    def rate(self) -> float | None:
        return self.passed / self.ran if self.ran else None


@dataclass(frozen=True)
class FailureGroup:
    """Failed cases of one test whose messages differ only in numbers."""
    message: str                 # the message's first line; numbers that differ shown as VARIES
    students: tuple[str, ...]
    cases: tuple[str, ...]       # the test's case ids it was seen in ("" for a test without cases)


@dataclass(frozen=True)
class CellTrouble:
    """A notebook cell that raised, recognised by its first line (its position moves when a
    student adds cells)."""
    first_line: str
    numbers: tuple[int, ...]     # its positions (cell #) in the notebooks where it raised
    errors: tuple[tuple[str, int], ...]   # (exception name, students), most frequent first
    students: tuple[str, ...]


@dataclass(frozen=True)
class LimitFired:
    limit: str                   # course.yaml's name (test_seconds, ...), "memory" or "restarts"
    times: int
    students: tuple[str, ...]


@dataclass(frozen=True)
class TimeSpread:
    part: str                    # a key of Results.timings
    count: int
    median: float
    p90: float
    max: float


@dataclass(frozen=True)
class StudentProblem:
    student: str
    score: float | None          # None: no results (the lab could not be told)
    why: str


@dataclass
class LabReport:
    lab_id: str
    title: str
    max_score: float
    percents: list[float]        # every submission's score, in percent of its maximum
    histogram: list[int]         # submissions per score bin (bin_labels)
    tests: list[TestRate]        # the hardest first
    failures: dict[str, list[FailureGroup]]   # per test, the most frequent first
    cells: list[CellTrouble]     # the most frequent first
    unrecorded: int              # graded submissions whose results predate the record of cells and limits
    grading_seconds: list[float]   # each graded submission's total
    times: list[TimeSpread]
    slowest: list[tuple[str, float]]
    limits: list[LimitFired]
    problems: list[StudentProblem]

    @property
    def submissions(self) -> int:
        return len(self.percents)


def bin_labels() -> list[str]:
    width = 100 // SCORE_BINS
    return [f"{lo}–{lo + width}%" for lo in range(0, 100, width)]


def lab_reports(course: Course, out: Path, lab_id: str | None = None, progress: bool = False) -> list[LabReport]:
    """One report per lab graded into `out` (or only `lab_id`'s)."""
    by_lab: dict[str, list[Graded]] = defaultdict(list)
    for graded in graded_results(out, progress):
        by_lab[graded.results.lab].append(graded)
    if lab_id is not None and lab_id not in by_lab:
        raise ReportError(f"{out}: no results of lab {lab_id!r} in this folder (it holds {', '.join(sorted(by_lab))}); "
                          "grade it first, or leave out --lab")
    lost = _without_a_lab(out)
    return [lab_report(course, lab, by_lab[lab], lost) for lab in sorted(by_lab) if lab_id in (None, lab)]


def lab_report(course: Course, lab_id: str, graded: list[Graded], lost: Sequence[StudentProblem] = ()) -> LabReport:
    """`lost`: submissions whose lab could not be told (they belong to every lab's report)."""
    graded = sorted(graded, key=lambda g: g.student)
    lab = course.labs.get(lab_id)
    percents = [100 * g.results.score / g.results.max_score if g.results.max_score else 0.0 for g in graded]
    histogram = [0] * SCORE_BINS
    for percent in percents:
        histogram[min(SCORE_BINS - 1, max(0, int(percent * SCORE_BINS // 100)))] += 1
    ran = [g for g in graded if _ran(g.results)]
    timed = [(g.student, float(g.results.timings["total"])) for g in ran if "total" in g.results.timings]
    return LabReport(
        lab_id=lab_id, title=lab.title if lab else lab_id,
        max_score=lab.max_score if lab else max(g.results.max_score for g in graded),
        percents=percents, histogram=histogram, tests=_test_rates(graded), failures=_failures(graded),
        cells=_cells(graded), unrecorded=sum("cell_errors" not in g.results.extra for g in ran),
        grading_seconds=[seconds for _, seconds in timed], times=_times(ran),
        slowest=sorted(timed, key=lambda item: -item[1])[:SLOWEST],
        limits=_limits(graded), problems=_problems(course, graded) + list(lost))


def _ran(results: Results) -> bool:
    """Graded at all: a submission that could not be graded has no test that ran."""
    return any(t.ran for t in results.tests)


def _test_rates(graded: list[Graded]) -> list[TestRate]:
    ran: dict[str, list] = {}
    points: dict[str, float] = {}
    for g in graded:
        for test in g.results.tests:
            ran.setdefault(test.name, [])
            points[test.name] = test.max_score
            if test.ran:
                ran[test.name].append(test)
    rates = [TestRate(name, points[name], len(tests), sum(t.status == "passed" for t in tests),
                      statistics.fmean(t.score for t in tests) if tests else 0.0) for name, tests in ran.items()]
    # Hardest first; a test that ran for nobody says nothing, so it goes last.
    return sorted(rates, key=lambda r: (r.rate is None, r.rate or 0.0,
                                        r.mean_points / r.points if r.points else 0.0, r.name))


def _failures(graded: list[Graded]) -> dict[str, list[FailureGroup]]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for g in graded:
        for test in g.results.tests:
            for case, message in test.failed_cases():
                first_line = message.split("\n", 1)[0].strip()
                key = _VALUE.sub("\0", first_line)
                group = groups[test.name].setdefault(key, {"students": set(), "cases": set(), "lines": set()})
                group["students"].add(g.student)
                group["cases"].add(case)
                group["lines"].add(first_line)
    return {test: sorted((FailureGroup(_merge_numbers(sorted(group["lines"])), tuple(sorted(group["students"])),
                                       tuple(sorted(group["cases"]))) for group in by_key.values()),
                         key=lambda f: (-len(f.students), -len(f.cases), f.message))
            for test, by_key in groups.items()}


def _merge_numbers(lines: list[str]) -> str:
    """One line for messages that differ only in their numbers: a number they share is
    kept, one that differs is shown as VARIES."""
    parts = [_VALUE.split(line) for line in lines]
    values = [_VALUE.findall(line) for line in lines]
    merged = [parts[0][0]]
    for i, text in enumerate(parts[0][1:]):
        seen = {v[i] for v in values}
        merged += [seen.pop() if len(seen) == 1 else VARIES, text]
    return "".join(merged)


def _cells(graded: list[Graded]) -> list[CellTrouble]:
    found: dict[str, dict] = {}
    for g in graded:
        for error in g.results.extra.get("cell_errors", []):
            first_line = error.get("first_line") or f"cell #{error.get('cell')}"
            cell = found.setdefault(first_line, {"numbers": set(), "errors": defaultdict(set), "students": set()})
            cell["numbers"].add(int(error.get("cell", 0)))
            cell["errors"][str(error.get("error", ""))].add(g.student)
            cell["students"].add(g.student)
    cells = [CellTrouble(line, tuple(sorted(c["numbers"])),
                         tuple(sorted(((name, len(s)) for name, s in c["errors"].items()), key=lambda e: (-e[1], e[0]))),
                         tuple(sorted(c["students"]))) for line, c in found.items()]
    return sorted(cells, key=lambda c: (-len(c.students), c.numbers, c.first_line))


def _times(graded: list[Graded]) -> list[TimeSpread]:
    spreads = []
    for part in TIME_PARTS:
        values = sorted(float(g.results.timings[part]) for g in graded if part in g.results.timings)
        if values:
            spreads.append(TimeSpread(part, len(values), statistics.median(values),
                                      values[math.ceil(0.9 * len(values)) - 1], values[-1]))
    return spreads


def _limits(graded: list[Graded]) -> list[LimitFired]:
    times: Counter = Counter()
    students: dict[str, set[str]] = defaultdict(set)
    for g in graded:
        for limit, count in g.results.extra.get("limits_fired", {}).items():
            times[limit] += int(count)
            students[limit].add(g.student)
    return sorted((LimitFired(limit, times[limit], tuple(sorted(students[limit]))) for limit in times),
                  key=lambda f: (-len(f.students), -f.times, f.limit))


def _problems(course: Course, graded: list[Graded]) -> list[StudentProblem]:
    """Not gradable (or not entirely), scored zero (or zero once late work's policy applies, as
    course.yaml says now), or told about their submission (files refused from a zip, another
    lab's notebook)."""
    problems = []
    for g in graded:
        late_zero = g.results.score > 0 and g.lateness(course).past_cutoff
        reasons = [g.results.problem or ("scored 0" if g.results.score == 0 else ""),
                   "handed in past the late cutoff: 0 after the late policy" if late_zero else "",
                   str(g.results.extra.get("note") or "")]
        if any(reasons):
            problems.append(StudentProblem(g.student, g.results.score, "; ".join(filter(None, reasons))))
    return problems


def _without_a_lab(out: Path) -> list[StudentProblem]:
    """Submissions grades.csv lists without a lab: no results.json was written for them."""
    return [StudentProblem(row["student"], None, row.get("problem") or "its lab could not be told")
            for row in read_gradebook(out / GRADEBOOK_FILE) if not row["lab"]]
