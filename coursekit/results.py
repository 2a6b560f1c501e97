"""Scores and the files that hold them: results.json in Gradescope's schema, the
batch's grades.csv, all written atomically so an interrupted run never leaves a
half-written file behind."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from coursekit.config import Lab
from coursekit.feedback import split_hint, with_hint
from coursekit.feedback_page import render as render_feedback
from coursekit.outcomes import CaseOutcome, SessionLog
from coursekit.tasks import suite_tasks

RESULTS_FILE = "results.json"
FEEDBACK_FILE = "feedback.html"
GRADEBOOK_FILE = "grades.csv"
# How score_tests writes a test's output, which TestResult reads back for the instructor's report.
NOT_RUN_OUTPUT = "This test did not run."
_CASES_PASSED = re.compile(r"\d+/\d+ cases passed")
_CASE = re.compile(r"\[(.+?)\] ")
_SHARED = re.compile(r"\d+ cases: (.+)")   # failure_lines' one line for cases that failed alike


def write_atomic(path: Path, data: str | bytes) -> None:
    """Text (UTF-8) or bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class TestResult:
    """One hidden test function: its cases share its points."""
    __test__ = False  # not a pytest test class
    name: str
    score: float
    max_score: float
    status: str            # "passed" or "failed"
    output: str            # what failed and why, in the student's words, and the hint
    visibility: str
    seconds: float = 0.0

    @property
    def ran(self) -> bool:
        """False where no case ran: a test left out with --only, or a submission that could not be graded."""
        return not self.output.startswith(NOT_RUN_OUTPUT)

    def failed_cases(self) -> list[tuple[str, str]]:
        """Each failed case's (case id, message), read back from the output score_tests wrote
        (failure_lines' "[case] message" lines after the "k/n cases passed" line, the hint last); a
        message's further lines (the student's traceback) stay with it. Case id "" where the test has none."""
        if self.status == "passed" or not self.ran:
            return []
        lines = split_hint(self.output)[0].splitlines()
        if lines and _CASES_PASSED.fullmatch(lines[0]):
            lines = lines[1:]
        cases: list[list[str]] = []
        for line in lines:
            match = _CASE.match(line)
            if match:
                cases.append([match.group(1), line[match.end():]])
            elif cases:
                cases[-1][1] += "\n" + line
            else:
                cases.append(["", line])
        found = []
        for case, message in cases:
            shared = _SHARED.fullmatch(case)
            found += [(one, message) for one in (shared.group(1).split("; ") if shared else [case])]
        return found

    def to_json(self) -> dict:
        return {"name": self.name, "extra_data": {"seconds": self.seconds}, "score": self.score,
                "max_score": self.max_score, "status": self.status, "output": self.output,
                "visibility": self.visibility}

    @classmethod
    def from_json(cls, data: dict) -> TestResult:
        return cls(str(data["name"]), float(data["score"]), float(data["max_score"]), str(data["status"]),
                   str(data.get("output", "")), str(data.get("visibility", "visible")),
                   float(data.get("extra_data", {}).get("seconds", 0.0)))


@dataclass
class Results:
    """One submission's grade. On disk it is results.json in Gradescope's schema (the
    typed fields here, and what else a run records under extra_data)."""
    lab: str
    score: float
    max_score: float
    tests: list[TestResult]
    problem: str = ""              # why it could not be graded, or not entirely
    output: str = ""               # what the student is told about the notebook itself
    execution_time: float = 0.0
    timings: dict = field(default_factory=dict)   # where the time went: total, startup, notebook, tests
    key: str = ""                  # the content key a rerun compares (coursekit.keys); "" never matches
    extra: dict = field(default_factory=dict)     # the rest: student, sandbox, environment, ...

    def to_json(self) -> dict:
        extra = {"lab": self.lab, "max_score": self.max_score, "problem": self.problem, "seconds": self.timings,
                 **({"key": self.key} if self.key else {}), **self.extra}
        return {"score": self.score, "execution_time": self.execution_time, "output": self.output,
                "tests": [t.to_json() for t in self.tests], "extra_data": extra}

    @classmethod
    def from_json(cls, data: dict) -> Results:
        extra = dict(data["extra_data"])
        fields = {name: extra.pop(name, default) for name, default in
                  (("lab", ""), ("max_score", 0.0), ("problem", ""), ("seconds", {}), ("key", ""))}
        return cls(lab=str(fields["lab"]), score=float(data["score"]), max_score=float(fields["max_score"]),
                   tests=[TestResult.from_json(t) for t in data["tests"]], problem=str(fields["problem"]),
                   output=str(data.get("output", "")), execution_time=float(data.get("execution_time", 0.0)),
                   timings=dict(fields["seconds"]), key=str(fields["key"]), extra=extra)


def save_submission(folder: Path, lab: Lab, results: Results) -> None:
    """results.json, then the student's feedback.html made from it."""
    page = render_feedback(results, f"{lab.title}: your results", suite_tasks(lab.suite_dir), lab.due)
    write_atomic(folder / FEEDBACK_FILE, page)
    write_atomic(folder / RESULTS_FILE, json.dumps(results.to_json(), indent=2, ensure_ascii=False) + "\n")


def read_results(path: Path) -> Results | None:
    """A results.json, or None where there is none or it is not one (a rerun regrades it)."""
    try:
        return Results.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def score_tests(lab: Lab, outcomes: list[CaseOutcome], hints: dict[str, str] | None = None) -> list[TestResult]:
    """One Gradescope test per test function; its cases share its points. A failed
    test gets the instructor's hint for it, if the lab has one."""
    tests = []
    for name, spec in lab.tests.items():
        cases = [o for o in outcomes if o.function == name]
        passed = sum(o.passed for o in cases)
        score = spec.points * passed / len(cases) if cases else 0.0
        failures = failure_lines([o for o in cases if not o.passed]) if cases else [NOT_RUN_OUTPUT]
        output = f"{passed}/{len(cases)} cases passed" if len(cases) > 1 else ""
        if failures:
            output = "\n".join([output, *failures]).strip()
            if (hints or {}).get(name):
                output = with_hint(output, hints[name])
        tests.append(TestResult(name, round(score, 4), spec.points,
                                "passed" if cases and passed == len(cases) else "failed", output, spec.visibility,
                                round(sum(o.seconds for o in cases), 3)))
    return tests


def failure_lines(failed: list[CaseOutcome]) -> list[str]:
    """One line per way of failing: cases that failed with the same message (a function
    left unwritten fails every case alike) share one line, prefixed by their ids."""
    by_message: dict[str, list[str]] = {}
    for outcome in failed:
        by_message.setdefault(outcome.message, []).append(outcome.case)
    lines = []
    for message, ids in by_message.items():
        ids = [i for i in ids if i]
        if len(ids) > 1:
            lines.append(f"[{len(ids)} cases: {'; '.join(ids)}] {message}")
        else:
            lines += [f"[{i}] {message}" for i in ids] or [message]
    return lines


def build_results(lab: Lab, outcomes: list[CaseOutcome], log: SessionLog | None, seconds: float,
                  extra: dict, problem: str = "", hints: dict[str, str] | None = None) -> Results:
    tests = score_tests(lab, outcomes, hints)
    lines = [line for line in (problem, extra.get("note", "")) if line]
    if log is not None:
        lines += [f"Your notebook's {e.describe()}\n{e.traceback}" for e in log.cell_errors]
        if log.restarts:
            lines.append(f"Your notebook's process was restarted {log.restarts} time(s) after it hung or crashed.")
    timing = {"total": round(seconds, 2)}
    extra = dict(extra)
    if log is not None:
        # Case seconds exclude the waits for the kernel's start and the notebook's run (the plugin).
        timing.update(startup=round(log.startup_seconds, 2), notebook=round(log.notebook_seconds, 2),
                      tests=round(sum(o.seconds for o in outcomes), 2), slowest_cell=round(log.slowest_cell_seconds, 2))
        # Structured for the instructor's report (coursekit.report), as cell_errors below is for both pages.
        extra["limits_fired"] = dict(sorted((log.limits_fired + Counter(restarts=log.restarts)).items()))
    key = str(extra.pop("key", ""))
    extra["unscored_tests"] = sorted({o.function for o in outcomes} - set(lab.tests))
    if log is not None:
        extra.update(cell_errors=[e.to_json() for e in log.cell_errors], restarts=log.restarts)
    return Results(lab=lab.id, score=round(sum(t.score for t in tests), 4), max_score=lab.max_score, tests=tests,
                   problem=problem, output="\n\n".join(lines), execution_time=round(seconds, 2), timings=timing,
                   key=key, extra=extra)


def failed_results(lab: Lab, message: str, seconds: float, extra: dict) -> Results:
    """The results of a submission that could not be graded at all."""
    return build_results(lab, [], None, seconds, extra, problem=message)


GRADEBOOK_COLUMNS = ["student", "lab", "score", "late_penalty", "final_score", "max_score", "percent", "submitted",
                     "days_late", "problem"]


def read_gradebook(path: Path) -> list[dict[str, str]]:
    """grades.csv's rows; none where there is no such file or it is not one."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [row for row in rows if {"student", "lab"} <= row.keys()]


def write_gradebook(path: Path, rows: list[dict]) -> None:
    """grades.csv: `score` is the raw score, `final_score` what the late penalty leaves
    of it, and `percent` is of the final score. Columns a row lacks (rows of an earlier
    run's file) are left empty; anything else a row carries is not the gradebook's."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=GRADEBOOK_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_atomic(path, buffer.getvalue())
