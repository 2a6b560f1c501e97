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
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pytest

from coursekit.batch import submissions_root
from coursekit.config import DEVICE_POLICIES, Course, Lab, load_course
from coursekit.notebook import SubmissionError, graded_cells, read_notebook, skipped_cells, suite_hints
from coursekit import plugin as plugin_module
from coursekit.plugin import GradingPlugin
from coursekit.results import build_results, failed_results, save_submission
from coursekit.isolation import (Isolation, protect, sandbox_plan, scratch_dir, student_environment,
                                 student_isolation)
from coursekit.forks import exit_now
from coursekit.kernel import StudentKernel
from coursekit.session import GradingSession, make_workdir, start_kernel


@dataclass
class StudentProcess:
    """A submission's sandboxed student process: its folder, its sandbox plan, and its
    kernel once started. A warm worker starts one ahead, for the submission it expects;
    it serves that one submission or none."""
    lab_id: str
    private: tuple[Path, ...]     # what the plan covers besides the hidden suites
    workdir: Path
    plan: dict
    isolation: Isolation
    device: str
    kernel: StudentKernel | None = None

    def fits(self, lab: Lab, private: list[Path]) -> bool:
        """Started for this lab, with every folder this submission must not see covered."""
        def covered(path: Path) -> bool:
            return any(path.resolve() == c or c in path.resolve().parents for c in self.private)
        return lab.id == self.lab_id and all(covered(p) for p in private)

    def discard(self) -> None:
        if self.kernel is not None:
            self.kernel.shutdown()
        shutil.rmtree(self.workdir, ignore_errors=True)


def student_process(course: Course, lab: Lab, private: list[Path]) -> StudentProcess:
    workdir = make_workdir()
    device = course.resolved_device()
    isolation = student_isolation(course.root, course.student_user)
    if isolation.user is not None:
        isolation.user.give(workdir)
        protect(course.root / "autograder")
    memory = int(lab.limits.memory_mb * 2**20)
    # An address-space cap is how a bare machine bounds memory; CUDA reserves far more
    # address space than it uses, so on a GPU the control group (or container) does it.
    plan = sandbox_plan(workdir, course.root, [course.root / "autograder", *private], user=isolation.user,
                        address_space_bytes=memory if device == "cpu" else None, memory_bytes=memory,
                        max_processes=lab.limits.processes, sandbox=course.sandbox)
    return StudentProcess(lab.id, tuple(p.resolve() for p in private), workdir, plan, isolation, device)


def start_ahead(spec: dict) -> StudentProcess | None:
    """The student process of the submission this warm worker expects, kernel started and
    runtime loaded; None where that fails (grading then starts one as usual, and reports)."""
    try:
        course = load_course(spec["course"])
        course = dataclasses.replace(course, device=spec.get("device") or course.device)
        lab = course.lab(spec["lab"])
        process = student_process(course, lab, [Path(p) for p in spec["private"]])
        process.kernel = start_kernel(process.workdir, student_environment(course.root / "data", process.workdir),
                                      {"plan": process.plan})
        process.kernel.execute(preimport_code(spec["imports"]), timeout=120)
        return process
    except Exception:  # noqa: BLE001  the usual path reports whatever this hit
        return None


def preimport_code(imports: list) -> str:
    """For a kernel started ahead, while it waits: what the lab's kernels import
    (`runners.student_imports`: the instructor's notebook, not the student's, and the library
    objects the hidden suite builds there, read once per batch by the runner), so that the
    submission's first cell finds torch, transformers and the rest loaded. Nothing else of the
    namespace changes."""
    # An expression, not a statement: the student's namespace gains no name.
    return f"__import__('coursekit.preload').preload.preload({[tuple(pair) for pair in imports]!r})"


@contextmanager
def student_run(course: Course, lab: Lab, nb, private: list[Path] = (), ahead: StudentProcess | None = None):
    """The notebook `nb` in its sandboxed student process, as grading runs it: the kernel starts
    and the cells the grader runs run in the background from here on (the first request waits
    for them). Yields the process and the grader's end of it; both are gone afterwards."""
    process = ahead or student_process(course, lab, list(private))
    run = GradingSession(graded_cells(nb), process.workdir, student_environment(course.root / "data", process.workdir),
                         lab.limits.submission_seconds, {"plan": process.plan}, lab.limits.cell_seconds,
                         lab.limits.reference_cell_seconds, kernel=process.kernel)
    run.start_early()
    try:
        yield process, run
    finally:
        run.close()
        shutil.rmtree(process.workdir, ignore_errors=True)


def run_suite(lab: Lab, run: GradingSession, device: str, suite_dir: Path, only: tuple[str, ...] = ()) -> GradingPlugin:
    """The tests of `suite_dir` (all, or the functions in `only`) against the student process of
    `run`, under the lab's time limits; the plugin holds their outcomes."""
    plugin = GradingPlugin(lab, run, device, only)
    ini = scratch_dir("pytest") / "pytest.ini"
    ini.write_text("[pytest]\n")
    try:
        pytest.main([str(suite_dir), "-c", str(ini), "--rootdir", str(suite_dir), "-q",
                     "-p", "no:cacheprovider", "--assert=plain", "--import-mode=importlib",
                     # Its end of session runs the garbage collector again and again, to report
                     # exceptions raised in finalizers: the grader has none to report.
                     "-p", "no:unraisableexception",
                     # It captures log records around every phase of every case (2 ms a case); the
                     # suites log nothing, and what a student logs stays in the student's process.
                     "-p", "no:logging",
                     # Only pytest's own plugins and the engine's: whatever else the machine has
                     # installed (anyio's, platformdirs') neither changes a grade nor costs each
                     # worker its import (anyio's brought trio: 0.07 s a submission).
                     "--disable-plugin-autoload",
                     # One line per failure in grader.log: a full traceback parses the suite's source for
                     # every failed case (seconds for a stub), and the student's message comes from the
                     # exception itself (coursekit.plugin.student_message).
                     "--tb=line"],
                    plugins=[plugin, plugin_module])
    finally:
        shutil.rmtree(ini.parent, ignore_errors=True)
    return plugin


def grade(course: Course, lab: Lab, notebook: Path, extra: dict, private: list[Path] = (),
          only: tuple[str, ...] = (), ahead: StudentProcess | None = None) -> dict:
    """`private`: folders the student must not see besides the hidden suites (the
    results, the other submissions); `only`: the test functions to run (all when empty);
    `ahead`: a student process started before this submission was known."""
    started = time.monotonic()
    if ahead is not None and not ahead.fits(lab, list(private)):
        ahead.discard()
        ahead = None
    try:
        nb = read_notebook(notebook)
    except SubmissionError as exc:
        if ahead is not None:
            ahead.discard()
        return failed_results(lab, str(exc), time.monotonic() - started, extra)
    with student_run(course, lab, nb, private, ahead) as (process, run):
        plugin = run_suite(lab, run, process.device, lab.suite_dir, only)
    problem = f"Grading stopped early: {run.broken}" if run.broken else ""
    extra = {**extra, "student_user": process.isolation.description, "sandbox": run.sandbox,
             "environment": plugin.environment,
             "student_process": {"folder": process.workdir.name, "started_ahead": ahead is not None},
             "skipped_cells": skipped_cells(nb)}
    if only:
        extra["only_tests"] = sorted(only)
    return build_results(lab, plugin.outcomes, run.log, time.monotonic() - started, extra, problem,
                         suite_hints(lab.suite_dir))


def main(argv: list[str] | None = None, ahead: StudentProcess | None = None) -> int:
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
                    only=tuple(args.only), ahead=ahead)
    save_submission(Path(args.out), lab, results)
    return 0


def serve(lines: TextIO) -> int:
    """A worker started before its submission is known (forked by coursekit.zygote,
    the imports every grading needs already done). Told which submission to expect (a
    first line {"prepare": ...}), it starts that submission's sandboxed kernel while
    another submission is graded; then it reads its one job (the worker's arguments and
    the log file to write to), grades it and exits, like any worker: never two
    submissions in one process, never a kernel for two."""
    job, ahead = _read_line(lines), None
    if isinstance(job, dict) and "prepare" in job:
        ahead = start_ahead(job["prepare"])
        job = _read_line(lines)
    if not isinstance(job, dict) or "args" not in job:
        if ahead is not None:
            ahead.discard()
        return 0  # the batch ended before it needed this worker
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    return main(job["args"], ahead)


def _read_line(lines: TextIO):
    try:
        return json.loads(lines.readline().strip() or "null")
    except ValueError:
        return None


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
    exit_now(main())
