"""Grade one submission: ``python -m coursekit.worker``.

A fresh grader process per submission, so that no state (imported test modules,
oracle models, a wedged kernel) carries from one student to the next. It runs the
lab's hidden suite with the grading plugin against the student's kernel and
writes results.json; the student's process never sees this process's memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from coursekit.config import DEVICE_POLICIES, Course, Lab, load_course
from coursekit.notebook import SubmissionError, graded_cells, lab_hints, read_notebook
from coursekit import plugin as plugin_module
from coursekit.plugin import GradingPlugin
from coursekit.results import build_results, failed_results, save_submission
from coursekit.isolation import protect, sandbox_plan, student_isolation
from coursekit.session import GradingSession, make_workdir, student_environment


def grade(course: Course, lab: Lab, notebook: Path, extra: dict, private: list[Path] = (),
          only: tuple[str, ...] = ()) -> dict:
    """`private`: folders the student must not see besides the hidden suites (the
    results, the other submissions); `only`: the test functions to run (all when empty)."""
    started = time.monotonic()
    try:
        nb = read_notebook(notebook)
    except SubmissionError as exc:
        return failed_results(lab, str(exc), time.monotonic() - started, extra)
    workdir = make_workdir()
    device = course.resolved_device()
    isolation = student_isolation(course.root)
    if isolation.user is not None:
        isolation.user.give(workdir)
        protect(course.root / "autograder")
    memory = int(lab.limits.memory_mb * 2**20)
    # An address-space cap is how a bare machine bounds memory; CUDA reserves far more
    # address space than it uses, so on a GPU the control group (or container) does it.
    plan = sandbox_plan(workdir, course.root, [course.root / "autograder", *private], user=isolation.user,
                        address_space_bytes=memory if device == "cpu" else None, memory_bytes=memory,
                        max_processes=lab.limits.processes)
    session = GradingSession(graded_cells(nb), workdir, student_environment(course.root / "data", workdir),
                             lab.limits.submission_seconds, {"plan": plan}, lab.limits.cell_seconds,
                             lab.limits.reference_cell_seconds)
    session.start_early()
    plugin = GradingPlugin(lab, session, device, only)
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
    extra = {**extra, "student_user": isolation.description, "sandbox": session.sandbox,
             "environment": plugin.environment}
    if only:
        extra["only_tests"] = sorted(only)
    hints = lab_hints(lab.notebook_in("source"), lab.notebook_in("release"))
    return build_results(lab, plugin.outcomes, session.log, time.monotonic() - started, extra, problem, hints)


def submissions_root(notebook: Path) -> Path:
    """The folder of this submission and its neighbours: an nbgrader tree's
    submitted/, or the notebook's own folder."""
    return next((p for p in notebook.parents if p.name == "submitted"), notebook.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coursekit.worker")
    parser.add_argument("--course", required=True)
    parser.add_argument("--lab", required=True)
    parser.add_argument("--notebook", required=True)
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--extra", default="{}", help="JSON merged into results' extra_data")
    parser.add_argument("--device", choices=DEVICE_POLICIES, help="override course.yaml's device policy")
    parser.add_argument("--only", action="append", default=[], help="run only this test function (repeatable)")
    args = parser.parse_args(argv)
    course = load_course(args.course)
    if args.device:
        course = dataclasses.replace(course, device=args.device)
    lab = course.lab(args.lab)
    notebook, out = Path(args.notebook).resolve(), Path(args.out).resolve()
    results = grade(course, lab, notebook, json.loads(args.extra), private=[out.parent, submissions_root(notebook)],
                    only=tuple(args.only))
    save_submission(Path(args.out), lab, results)
    return 0


def serve() -> int:
    """``python -m coursekit.worker --warm``: a worker started before its submission
    is known. The imports every grading needs are done while another submission is
    graded; then it reads its one job from stdin (the worker's arguments and the log
    file to write to), grades it and exits, like any worker: never two submissions
    in one process."""
    import torch  # noqa: F401  (what every suite and oracle imports first)
    import transformers  # noqa: F401

    job = json.loads(sys.stdin.readline() or "null")
    if not isinstance(job, dict):
        return 0  # the batch ended before it needed this worker
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    return main(job["args"])


def exit_with_parent() -> None:
    """A worker whose `course grade` died (killed, timed out, its terminal closed) stops
    too; its kernel's launcher then sees its grader gone and kills the kernel
    (coursekit.sandbox), so nothing a submission started outlives the batch."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(70)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


if __name__ == "__main__":
    exit_with_parent()
    sys.exit(serve() if sys.argv[1:] == ["--warm"] else main())
