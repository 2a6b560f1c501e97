"""The `course` command."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from coursekit.config import DEVICE_POLICIES, ConfigError, load_course
from coursekit.export import ExportError
from coursekit.late import TimestampError
from coursekit.notebook import SubmissionError
from coursekit.release import ReleaseError
from coursekit.report import ReportError
from coursekit.similarity import DEFAULT_THRESHOLD, SimilarityError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course", description="Release, grade and check the course's labs.")
    parser.add_argument("--course", help="path to course.yaml (default: the repository's, or $COURSE_YAML)")
    commands = parser.add_subparsers(dest="command", required=True)

    grade = commands.add_parser("grade", help="grade notebooks, folders of notebooks, or an nbgrader submitted/ tree")
    grade.add_argument("submissions", nargs="+", type=Path)
    grade.add_argument("--lab", help="the lab, when a notebook does not say (see course.yaml)")
    grade.add_argument("--out", type=Path, default=Path("grading-output"), help="results folder (default: %(default)s)")
    grade.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                       help="submissions graded at once (default: %(default)s)")
    grade.add_argument("--force", action="store_true", help="regrade submissions already graded unchanged")
    grade.add_argument("--dry-run", action="store_true",
                       help="say what would be graded and why (new, submission, suite, points or limits changed, "
                            "unchanged), without grading")
    grade.add_argument("--gradebook", action="store_true",
                       help="also record the scores of an nbgrader submitted/ tree in nbgrader's gradebook.db")
    grade.add_argument("--backend", choices=("local", "docker", "ray"), default="local",
                       help="where each submission's grader runs: a process here, a fresh grader container, "
                            "or a task on a Ray cluster (default: %(default)s)")
    grade.add_argument("--device", choices=DEVICE_POLICIES,
                       help="where graded code runs, overriding course.yaml's device policy (local and docker backends)")
    grade.add_argument("--only", action="append", default=[], metavar="TEST",
                       help="grade only this test function (repeatable); the others score 0 as not run")
    grade.add_argument("--image", help="docker: the grader image (default: course.yaml's image.grader)")
    grade.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                       help="ray: the cluster, e.g. 10.0.0.1:6379 or ray://10.0.0.1:10001 (default: $RAY_ADDRESS)")
    grade.add_argument("--course-root-on-nodes", type=Path, metavar="DIR",
                       help="ray: the course's folder (where course.yaml is) on the cluster's nodes "
                            "(default: the same as here)")

    release = commands.add_parser("release", help="regenerate release/ and solutions/ from source/")
    release.add_argument("labs", nargs="*", help="lab ids (default: all)")

    check = commands.add_parser("check", help="pre-flight: points, release up to date, no leaks, source full marks, stub 0")
    check.add_argument("labs", nargs="*", help="lab ids (default: all)")
    check.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))

    export = commands.add_parser("export", help="grades of a results folder for an LMS (Canvas) or for analysis")
    export.add_argument("out", type=Path, help="the --out folder of `course grade`")
    export.add_argument("--format", choices=("canvas", "csv"), default="canvas",
                        help="canvas: Canvas's gradebook import CSV; csv: one row per student, lab and test")
    export.add_argument("--roster", type=Path, help="canvas: the class roster (Canvas's gradebook export)")
    export.add_argument("--to", type=Path, help="the file to write (default: OUT/canvas.csv or OUT/tests.csv)")

    report = commands.add_parser("report", help="where a class struggles: one HTML page per lab, from a results folder")
    report.add_argument("out", type=Path, help="the --out folder of `course grade`")
    report.add_argument("--lab", help="only this lab (default: every lab graded into the folder)")

    similarity = commands.add_parser("similarity", help="pairs of one lab's graded notebooks that share too much code")
    similarity.add_argument("out", type=Path, help="the --out folder of `course grade`")
    similarity.add_argument("--lab", required=True, help="the lab whose submissions are compared")
    similarity.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                            help="flag a pair when this fraction of either one's own code is in the other's "
                                 "(default: %(default)s)")

    gradescope = commands.add_parser("gradescope", help="build a Gradescope autograder zip for one lab")
    gradescope.add_argument("lab")
    gradescope.add_argument("--out", type=Path, help="zip path (default: gradescope-<lab>.zip)")

    validate = commands.add_parser(
        "validate", help="before submitting: run a notebook as the grader does and report what would lose points",
        description="Run the notebook as the grader does (same sandboxed process; cells tagged demo or training "
                    "skipped) and report the cells that raise, the lab's graded names that are missing, defined "
                    "only in a skipped cell or not implemented, the lab's public checks, and whether the notebook "
                    "is the lab's. Exit status: 0 when none of these finds a problem, 1 when one does, 2 when "
                    "the notebook cannot be read or its lab cannot be told.")
    validate.add_argument("notebook", type=Path, help="the .ipynb (save it first: the saved file is what is run)")
    validate.add_argument("--lab", help="the lab it is for, when its folder and file name do not say (see course.yaml)")

    args = parser.parse_args(argv)
    try:
        course = load_course(args.course)
        commands = {"grade": _grade, "release": _release, "check": _check, "gradescope": _gradescope,
                    "export": _export, "similarity": _similarity, "validate": _validate,
                    "report": _report}
        return commands[args.command](course, args)
    # ConnectionError: a Ray cluster that cannot be reached. SubmissionError: a notebook
    # `course validate` cannot read.
    except (ConfigError, FileNotFoundError, ReleaseError, ConnectionError, ExportError, SimilarityError,
            TimestampError, SubmissionError, ReportError) as exc:
        print(f"course: {exc}", file=sys.stderr)
        return 2


def _labs(course, ids):
    return [course.lab(i) for i in ids] if ids else list(course.labs.values())


def _grade(course, args) -> int:
    from coursekit.batch import discover, format_table, grade_batch, plan_batch
    from coursekit.regrade import REPORT_PREFIX, format_changes, format_plan, now_stamp, unique_path, write_report

    if args.device:
        course = dataclasses.replace(course, device=args.device)
    submissions = discover(course, args.submissions, args.lab, unpack_dir=args.out / ".unpacked")
    if not submissions:
        print("course: no notebooks (*.ipynb) found in " + ", ".join(map(str, args.submissions)), file=sys.stderr)
        return 2
    if args.only:
        unknown = [name for name in args.only for sub in submissions if sub.lab and name not in sub.lab.tests]
        if unknown:
            raise ConfigError(f"--only {unknown[0]}: no such test in the lab's suite (see course.yaml)")
        submissions = [dataclasses.replace(sub, only=tuple(args.only)) for sub in submissions]
    if args.dry_run:
        plans = plan_batch(submissions, args.out, args.force)
        print(format_plan([(p.sub.student, p.sub.lab.id if p.sub.lab else "", p.reasons) for p in plans]))
        return 0
    stamp = now_stamp()   # names the regrade's report and the results it kept alike
    rows = grade_batch(course, submissions, args.out, workers=args.workers, force=args.force,
                       gradebook=args.gradebook, runner=_runner(course, args), stamp=stamp)
    print(format_table(rows))
    print(f"\nResults: {args.out}/<student>/results.json; gradebook: {args.out}/grades.csv")
    changes = [row["regrade"] for row in rows if "regrade" in row]
    if changes:
        report = unique_path(args.out / f"{REPORT_PREFIX}{stamp}.csv")
        write_report(report, changes)
        print("\n" + format_changes(changes, report))
    return 0


def _runner(course, args):
    from coursekit.runners import DockerRunner, LocalRunner, RayRunner

    if args.backend == "docker":
        return DockerRunner(args.image or course.image_grader)
    if args.backend == "ray":
        if not args.address:
            raise ConfigError("--backend ray needs the cluster's --address (or RAY_ADDRESS)")
        return RayRunner(args.address, args.course_root_on_nodes)
    return LocalRunner()


def _release(course, args) -> int:
    from coursekit.release import generate

    labs = _labs(course, args.labs)
    generate(course, labs)
    for lab in labs:
        print(f"{lab.id}: release/{lab.id}/{lab.notebook} and solutions/{lab.id}/{lab.notebook} written")
    return 0


def _check(course, args) -> int:
    from coursekit.check import run_checks

    problems = run_checks(course, _labs(course, args.labs), workers=args.workers)
    for problem in problems:
        print(f"FAIL {problem}")
    print("course check: all good" if not problems else f"course check: {len(problems)} problem(s)")
    return 1 if problems else 0


def _export(course, args) -> int:
    from coursekit.export import canvas_csv, graded_results, read_roster, tests_csv
    from coursekit.results import write_atomic

    graded = graded_results(args.out)
    if args.format == "canvas":
        text, warnings = canvas_csv(course, graded, read_roster(args.roster) if args.roster else None)
    else:
        text, warnings = tests_csv(course, graded), []
    target = args.to or args.out / ("canvas.csv" if args.format == "canvas" else "tests.csv")
    write_atomic(target, text)
    for warning in warnings:
        print(f"course: warning: {warning}", file=sys.stderr)
    print(f"{target}: {len({g.student for g in graded})} student(s), {len(graded)} graded submission(s)")
    return 0


def _report(course, args) -> int:
    from coursekit.report import lab_reports
    from coursekit.report_page import REPORT_FOLDER, write_lab_page

    for report in lab_reports(course, args.out, args.lab, progress=True):
        page = write_lab_page(report, args.out / REPORT_FOLDER)
        print(f"{page}: {report.submissions} submission(s), {len(report.tests)} test(s), "
              f"{len(report.problems)} student(s) with a problem", flush=True)
    return 0


def _similarity(course, args) -> int:
    from coursekit.results import write_atomic
    from coursekit.similarity import compare_lab
    from coursekit.similarity_report import page, summary

    comparison = compare_lab(course.lab(args.lab), args.out, args.threshold)
    target = args.out / f"similarity-{comparison.lab.id}.html"
    write_atomic(target, page(comparison))
    print(summary(comparison, target))
    return 0


def _validate(course, args) -> int:
    from coursekit.validate import format_report, validate

    if not args.notebook.is_file():
        raise FileNotFoundError(f"{args.notebook}: no such notebook (run `course validate` on the saved .ipynb)")
    report = validate(course, args.notebook, args.lab)
    print(format_report(report))
    return report.exit_code


def _gradescope(course, args) -> int:
    from coursekit.gradescope import build_zip

    lab = course.lab(args.lab)
    path = build_zip(course, lab, args.out or Path(f"gradescope-{lab.id}.zip"))
    print(f"{path}: upload it as the autograder of {lab.title} (Gradescope: Configure Autograder > Zip file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
