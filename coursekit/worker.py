"""Grade one submission: ``python -m coursekit.worker``.

A fresh grader process per submission, so that no state (imported test modules,
oracle models, a wedged kernel) carries from one student to the next. It runs the
lab's hidden suite with the grading plugin against the student's kernel and
writes results.json; the student's process never sees this process's memory.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from coursekit.config import Course, Lab, load_course
from coursekit.notebook import SubmissionError, graded_cells, read_notebook
from coursekit import plugin as plugin_module
from coursekit.plugin import GradingPlugin
from coursekit.results import build_results, failed_results, save_submission
from coursekit.isolation import protect, student_isolation
from coursekit.session import GradingSession, make_workdir, student_environment


def grade(course: Course, lab: Lab, notebook: Path, extra: dict) -> dict:
    started = time.monotonic()
    try:
        nb = read_notebook(notebook)
    except SubmissionError as exc:
        return failed_results(lab, str(exc), time.monotonic() - started, extra)
    workdir = make_workdir()
    device = course.resolved_device()
    isolation = student_isolation()
    if isolation.user is not None:
        isolation.user.give(workdir)
        protect(course.root / "autograder")
    extra = {**extra, "student_user": isolation.description}
    kernel_options = {
        "memory_bytes": int(lab.limits.memory_mb * 2**20) if device == "cpu" else None,
        "max_processes": lab.limits.processes,
        "user": isolation.user,
    }
    session = GradingSession(graded_cells(nb), workdir, student_environment(course.root / "data", workdir),
                             lab.limits.submission_seconds, kernel_options)
    plugin = GradingPlugin(lab, session, device)
    ini = Path(tempfile.mkdtemp(prefix="course-pytest-")) / "pytest.ini"
    ini.write_text("[pytest]\n")
    try:
        pytest.main([str(lab.suite_dir), "-c", str(ini), "--rootdir", str(lab.suite_dir), "-q",
                     "-p", "no:cacheprovider", "--assert=plain", "--import-mode=importlib"],
                    plugins=[plugin, plugin_module])
    finally:
        session.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(ini.parent, ignore_errors=True)
    problem = f"Grading stopped early: {session.broken}" if session.broken else ""
    return build_results(lab, plugin.outcomes, session.log, time.monotonic() - started, extra, problem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coursekit.worker")
    parser.add_argument("--course", required=True)
    parser.add_argument("--lab", required=True)
    parser.add_argument("--notebook", required=True)
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--extra", default="{}", help="JSON merged into results' extra_data")
    args = parser.parse_args(argv)
    course = load_course(args.course)
    lab = course.lab(args.lab)
    results = grade(course, lab, Path(args.notebook), json.loads(args.extra))
    save_submission(Path(args.out), lab, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
