"""``course validate NOTEBOOK``: what a student runs before submitting.

The notebook runs as grading runs it, in the grader's own sandboxed student process
(coursekit.worker.student_run): the cells in order, those tagged demo or training skipped.
The report says, in seconds:

- whether the notebook is the lab's: the lab comes from --lab, else the notebook's folder,
  else its file name, and the notebook's metadata (`course.lab`) must name the same lab;
- the cells that raise, each with the student's own line where the error came from;
- the lab's graded names (public/<lab>/, written by `course release`) that are missing,
  defined only in a cell the grader skips, or not implemented (their definition still
  raises NotImplementedError);
- the lab's public tests (course.yaml's `public: true`), from the copy under public/<lab>/:
  the hidden suite is never run.

Every one of these is a problem: the notebook would lose points as it is. `course
validate` exits 1 when there is one, 0 when there is none.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from coursekit.batch import submissions_root
from coursekit.config import ConfigError, Course, Lab
from coursekit.errors import MissingName, StudentCrashed, StudentTimeout
from coursekit.notebook import SKIPPED_TAGS, Cell, defined_names, notebook_lab, read_notebook
from coursekit.outcomes import CaseOutcome, CellError
from coursekit.proxy import Student
from coursekit.public import read_graded_names
from coursekit.results import TestResult, score_tests
from coursekit.worker import run_suite, student_run

DETAIL_LINES = 3   # of the message of a failed public test's first failed case
DETAIL_WIDTH = 200


@dataclass
class PublicCheck:
    result: TestResult             # scored as grading scores it
    failures: list[CaseOutcome]    # its failed cases, each with what the student is told


@dataclass
class Report:
    notebook: Path
    lab: Lab
    wrong_lab: str = ""                  # why the notebook is another lab's; nothing else is checked then
    notes: list[str] = field(default_factory=list)          # worth knowing, costs no points
    cells: list[str] = field(default_factory=list)          # the cells that raise
    names: list[tuple[str, str, str]] = field(default_factory=list)   # (name, task, problem or "")
    checks: list[PublicCheck] = field(default_factory=list)
    stopped: str = ""                    # why the student process could not go on
    run: dict = field(default_factory=dict)   # code cells run and skipped, seconds

    @property
    def problems(self) -> int:
        return (bool(self.wrong_lab) + len(self.cells) + sum(bool(p) for _, _, p in self.names)
                + sum(c.result.status != "passed" for c in self.checks) + bool(self.stopped))

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0


def validate(course: Course, notebook: Path, lab_id: str | None = None, progress=None) -> Report:
    """Run `notebook` as grading runs it and report what would lose points; `progress` gets a
    line per step (stderr by default)."""
    progress = progress or (lambda line: print(line, file=sys.stderr))
    nb = read_notebook(notebook)
    lab, wrong, notes = which_lab(course, notebook, nb, lab_id)
    report = Report(notebook, lab, wrong, notes)
    if wrong:
        return report
    graded = read_graded_names(lab)
    code = [Cell(n, c.source) for n, c in enumerate(nb.cells, start=1) if c.cell_type == "code"]
    skipped = {n: sorted(set(c.get("metadata", {}).get("tags", [])) & SKIPPED_TAGS)   # code cell -> its tags
               for n, c in enumerate(nb.cells, start=1) if c.cell_type == "code"}
    skipped = {n: tags for n, tags in skipped.items() if tags}
    progress(f"course validate: running {notebook.name} as the grader runs it (lab {lab.id}: "
             f"{len(code) - len(skipped)} code cells; {len(skipped)} tagged demo or training skipped)...")
    started = time.monotonic()
    # The notebook's own folder stays out of the student process's sight, as in grading:
    # a notebook that reads a file beside itself fails here as it would there.
    with student_run(course, lab, nb, [submissions_root(notebook.resolve())]) as (process, run):
        present = _look_up(run, [g["name"] for g in graded])
        public = lab.public_tests
        if public and not run.broken:
            progress(f"course validate: running the lab's {len(public)} public check(s)...")
            with contextlib.redirect_stdout(io.StringIO()):  # pytest's own report; the outcomes say it all
                plugin = run_suite(lab, run, process.device, lab.public_dir, tuple(public))
            scored = score_tests(dataclasses.replace(lab, tests={n: lab.tests[n] for n in public}), plugin.outcomes)
            report.checks = [PublicCheck(result, [o for o in plugin.outcomes if o.function == result.name
                                                  and not o.passed]) for result in scored]
    report.stopped = run.broken or ""
    report.cells = [_describe(error) for error in run.log.cell_errors]
    report.names = [(g["name"], g["task"], name_problem(g["name"], present.get(g["name"]), code, skipped,
                                                        run.log.cell_errors)) for g in graded]
    report.run = {"code_cells": len(code), "skipped": len(skipped), "seconds": round(time.monotonic() - started, 1)}
    return report


def which_lab(course: Course, notebook: Path, nb, lab_id: str | None) -> tuple[Lab, str, list[str]]:
    """(the lab the notebook is validated as, why it is another lab's or "", notes). The lab it
    is meant for comes from --lab, its folder (release/<lab>/, nbgrader's submitted/<student>/<lab>/)
    or its file name; the notebook's own metadata must agree."""
    own = notebook_lab(nb)
    by_file = next((lab for lab in course.labs.values() if lab.notebook == notebook.name), None)
    if lab_id:
        lab, how = course.lab(lab_id), f"--lab {lab_id}"
    elif notebook.resolve().parent.name in course.labs:
        lab, how = course.labs[notebook.resolve().parent.name], f"its folder {notebook.resolve().parent.name}/"
    elif by_file:
        lab, how = by_file, f"its file name {notebook.name}"
    elif own in course.labs:
        lab, how = course.labs[own], "its metadata"
    else:
        raise ConfigError(f"{notebook}: cannot tell which lab it is for (its metadata, folder and file name "
                          f"name no lab of {course.path.name}); pass --lab LAB (the labs: {', '.join(course.labs)})")
    notes = []
    if notebook.name != lab.notebook:
        notes.append(f"it is named {notebook.name}; lab {lab.id}'s notebook is {lab.notebook}: submit it under "
                     "that name")
    if own is None:
        notes.append("its metadata does not say which lab it is (course.lab): was it copied into a new notebook? "
                     "The grader then goes by where it is submitted")
    wrong = ""
    if own is not None and own != lab.id:
        theirs = f"lab {own} ({course.labs[own].title})" if own in course.labs else f"a lab {own!r} this course lacks"
        wrong = (f"this notebook is {theirs} by its metadata, but {how} makes it lab {lab.id} ({lab.title}): it "
                 f"would be graded as {lab.id} and score nothing. Submit lab {lab.id}'s own notebook "
                 f"({lab.notebook}), or validate this one as its lab"
                 + (f" (--lab {own})" if own in course.labs else ""))
    return lab, wrong, notes


def _look_up(run, names: list[str]) -> dict[str, bool]:
    """Which graded names the student process holds once the notebook has run; {} when it
    could not run (the run says why)."""
    try:
        run.ensure_running()
    except StudentCrashed:
        return {}
    student, present = Student(run), {}
    for name in names:
        try:
            getattr(student, name)
            present[name] = True
        except MissingName:
            present[name] = False
        except (StudentCrashed, StudentTimeout):
            return {}
    return present


def name_problem(name: str, present: bool | None, code: list[Cell], skipped: dict[int, list[str]],
                 cell_errors: list[CellError]) -> str:
    """What keeps a graded name from its points, or "": the grader's run (`present`: the
    name exists once the notebook has run; None: the run never got that far) read together with
    where the notebook defines it."""
    if present is None:
        return "not checked: the notebook's process stopped first (see above)"
    defining = [(cell, defined_names(cell.source)[name]) for cell in code if name in defined_names(cell.source)]
    run_here = [(cell, node) for cell, node in defining if cell.number not in skipped]
    if present:
        if not run_here:
            return ""
        cell, node = run_here[-1]
        line = _not_implemented(node, name)
        return (f"not implemented: cell #{cell.number}, line {line} still raises NotImplementedError"
                if line else "")
    raised = {e.cell.number: e for e in cell_errors}
    for cell, _ in run_here:
        if cell.number in raised:
            return (f"missing: cell #{cell.number}, which defines it, raised {raised[cell.number].name} "
                    "before defining it")
    if run_here:
        return (f"missing: cell #{run_here[-1][0].number} defines it, but it did not exist once the notebook "
                "had run (is the definition under a condition, or deleted later?)")
    if defining:
        where = ", ".join(f"#{cell.number} (tagged {' and '.join(skipped[cell.number])})" for cell, _ in defining)
        return (f"defined only in cell {where}, which the grader skips: define it in a cell without the "
                "demo or training tag")
    return "missing: no cell of the notebook defines it (check its spelling against the lab's contract)"


def _not_implemented(statement: ast.stmt, name: str) -> int:
    """The line of a `raise NotImplementedError` in the definition of `name`, or 0."""
    node = next((n for n in ast.walk(statement) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == name), statement)
    for raise_ in (n for n in ast.walk(node) if isinstance(n, ast.Raise) and n.exc is not None):
        error = raise_.exc.func if isinstance(raise_.exc, ast.Call) else raise_.exc
        if isinstance(error, ast.Name) and error.id == "NotImplementedError":
            return raise_.lineno
    return 0


def _describe(error: CellError) -> str:
    """The cell, the error, and the student's own line it came from (CellError.student_line)."""
    text = f"cell #{error.cell.number} ({error.cell.first_line!r}) raised {error.name}"
    text += f": {error.value.splitlines()[0][:200]}" if error.value.strip() else ""
    at = error.student_line()
    if at:
        text += f"\n       at cell #{at['cell']}, line {at['line']}: {at['code']}"
    return text


def format_report(report: Report) -> str:
    lab = report.lab
    lines = [f"{report.notebook.name}: lab {lab.id} ({lab.title})"]
    if report.run:
        lines[0] += (f", run as the grader runs it in {report.run['seconds']:g} s ({report.run['code_cells']} code "
                     f"cells, {report.run['skipped']} tagged demo or training skipped)")
    lines += [f"  note: {note}" for note in report.notes]
    if report.wrong_lab:
        lines += ["", f"WRONG LAB: {report.wrong_lab}", "(the notebook was not run)"]
    else:
        if report.stopped:
            lines += ["", f"STOPPED: {report.stopped}"]
        lines += ["", f"Cells that raise: {len(report.cells) or 'none'}"]
        lines += [f"  FAIL {text}" for text in report.cells]
        lines += ["", f"Graded names ({len(report.names)}):"]
        for name, task, problem in report.names:
            label = f"{name} ({task or 'provided by the notebook'})"
            lines.append(f"  FAIL {label}: {problem}" if problem else f"  ok   {label}")
        hidden = len(lab.tests) - len(report.checks)
        lines += ["", f"Public checks ({len(report.checks)}; the other {hidden} tests of the lab run only when "
                      "it is graded):" if report.checks else "Public checks: none in this lab"]
        for check in report.checks:
            lines += _check_lines(check)
    lines.append("")
    lines.append(f"{report.problems} problem(s): the notebook would lose points as it is; fix them and run "
                 "`course validate` again." if report.problems else
                 "No problems found: every cell runs, every graded name is there, the public checks pass. "
                 "The hidden tests decide the rest of the grade.")
    return "\n".join(lines)


def _check_lines(check: PublicCheck) -> list[str]:
    result = check.result
    if result.status == "passed":
        return [f"  ok   {result.name}"]
    summary = result.output.splitlines()[0] if "cases passed" in result.output else ""
    lines = [f"  FAIL {result.name}" + (f": {summary}" if summary else "")]
    if not check.failures:
        return lines + [f"       {result.output.splitlines()[-1]}"] if result.output else lines
    first = check.failures[0]
    message = first.message.splitlines() or ["failed"]
    lines.append(f"       {f'[{first.case}] ' if first.case else ''}{message[0]}"[:DETAIL_WIDTH])
    lines += [f"       {line}"[:DETAIL_WIDTH] for line in message[1:DETAIL_LINES]]
    if len(check.failures) > 1:
        lines.append(f"       ... and {len(check.failures) - 1} more failed case(s)")
    return lines
