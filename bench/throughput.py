"""Grading throughput: `course grade` against `nbgrader autograde`, on one machine, in one run.

    .venv/bin/python bench/throughput.py [--labs 01_attention 04_bpe_tokenizer] [--workers 1 2] [--repeat 3]

The batch: for every lab, its reference solution (source/), its stub (release/) and a
partly wrong notebook (the lab's first always-run mutant from mutants/), each `--copies`
times (default once) as different students, laid out as an nbgrader submitted/ tree. `course grade` grades it with the hidden suites;
`nbgrader autograde` grades the same notebooks in a scratch nbgrader course. Both
skip the cells tagged demo/training (nbgrader would otherwise run the labs' training
loops), so both run the same student code; nbgrader has no hidden suites to run, so
its figure is the cost of executing each notebook once: a lower bound for any
nbgrader grading of these labs.

Printed: seconds per submission for each, batch throughput and their ratio, and
where a submission's time goes in `course grade`: the engine's own overhead (worker
start, imports, kernel start, transfers) against the notebook's cells and the
tests' own compute (from each results.json's extra_data.seconds). Last, one line per
lab: `LAB course_s=X [course_s_w2=Z] nbgrader_s=Y ratio=Y/X`, seconds per submission
(ratio > 1: `course grade`, hidden suites included, is faster than nbgrader's bare run).
With `--repeat N` each lab's batch is graded N times by each and the median is reported: one
run on a shared machine can be off by a third. The tools take turns on each lab (course with each
worker count, then nbgrader, then again), so that the machine's speed, which drifts over a long
run, weighs on all of them alike.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coursekit.config import load_course  # noqa: E402
from coursekit.notebook import SKIPPED_TAGS  # noqa: E402

BIN = Path(sys.executable).parent


def build_batch(course, labs, into: Path, copies: int = 1) -> list[tuple[str, str]]:
    """submitted/<student>/<lab>/<notebook> for reference, stub and partly_wrong, each `copies`
    times under as many students' names (a class is many submissions of one lab)."""
    import importlib

    made = []
    for lab in labs:
        source = nbformat.read(lab.notebook_in("source"), as_version=4)
        mutant = next(m for m in importlib.import_module(f"mutants.{lab.id}").MUTANTS if m.always)
        notebooks = {"reference": source, "stub": nbformat.read(lab.notebook_in("release"), as_version=4),
                     "partly_wrong": mutant.apply(source)}
        for copy in range(copies):
            for name, nb in notebooks.items():
                student = name if copy == 0 else f"{name}_{copy + 1}"
                folder = into / "submitted" / student / lab.id
                folder.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, folder / lab.notebook)
                made.append((student, lab.id))
    return made


def grade_with_course(batch: Path, out: Path, workers: int, lab) -> None:
    """`course grade` on the lab's batch (its reference, stub and partly wrong notebook); `out`
    keeps the results."""
    folders = sorted((batch / "submitted").glob(f"*/{lab.id}"))
    subprocess.run([str(BIN / "course"), "grade", *map(str, folders), "--out", str(out), "--workers", str(workers),
                    "--force"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def prepare_nbgrader(course, labs, batch: Path, scratch: Path) -> dict[str, str]:
    """nbgrader's own course: source/ without the skipped cells, the same submitted/ tree, each
    lab's assignment generated. Returns the environment to run nbgrader in."""
    scratch.mkdir(parents=True)
    (scratch / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        f"c.CourseDirectory.root = {str(scratch)!r}\n"
        f"c.CourseDirectory.db_url = 'sqlite:///{scratch}/gradebook.db'\n"
        "c.ExecutePreprocessor.timeout = 1200\n"
        "c.Execute.timeout = 1200\n")
    shutil.copytree(batch / "submitted", scratch / "submitted")
    for lab in labs:
        nb = nbformat.read(lab.notebook_in("source"), as_version=4)
        nb.cells = [c for c in nb.cells if not set(c.get("metadata", {}).get("tags", [])) & SKIPPED_TAGS]
        (scratch / "source" / lab.id).mkdir(parents=True)
        nbformat.write(nb, scratch / "source" / lab.id / lab.notebook)
        for path in (scratch / "submitted").glob(f"*/{lab.id}/{lab.notebook}"):
            sub = nbformat.read(path, as_version=4)
            sub.cells = [c for c in sub.cells if not set(c.get("metadata", {}).get("tags", [])) & SKIPPED_TAGS]
            nbformat.write(sub, path)
    # nbgrader runs alembic by name to create its database.
    env = {**os.environ, "COURSE_DATA_DIR": str(course.root / "data"), "MPLBACKEND": "Agg",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for lab in labs:
        _nbgrader(["generate_assignment", lab.id, "--force"], scratch, env)
    return env


def measure(labs, repeat: int, tools: dict) -> dict[str, dict[str, float]]:
    """Median wall seconds of each tool on each lab's batch: {tool: {lab: seconds}}. A lab's runs
    alternate between the tools (course with 1 worker, with 2, nbgrader, then again), so that a
    shared machine's changing speed weighs on every tool alike rather than on whichever ran last."""
    times = {name: {lab.id: [] for lab in labs} for name in tools}
    for lab in labs:
        for _ in range(repeat):
            for name, run in tools.items():
                began = time.monotonic()
                run(lab)
                times[name][lab.id].append(time.monotonic() - began)
    return {name: {lab: statistics.median(t) for lab, t in per_lab.items()} for name, per_lab in times.items()}


def _nbgrader(args: list[str], cwd: Path, env: dict) -> None:
    proc = subprocess.run([str(BIN / "nbgrader"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"nbgrader {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labs", nargs="*", help="lab ids (default: all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="course grade's worker counts to measure (nbgrader has one); default: 1 2")
    parser.add_argument("--copies", type=int, default=1,
                        help="grade each of the three notebooks this many times, as as many students "
                             "(a batch's start is paid once per lab: more copies show the cost per submission "
                             "of a class); default: 1")
    parser.add_argument("--repeat", type=int, default=1,
                        help="grade each lab's batch this many times with each tool and report the median; "
                             "default: 1")
    parser.add_argument("--skip-nbgrader", action="store_true")
    args = parser.parse_args()
    course = load_course(ROOT / "course.yaml")
    labs = [course.lab(i) for i in args.labs] if args.labs else list(course.labs.values())
    work = Path(tempfile.mkdtemp(prefix="course-bench-"))
    try:
        made = build_batch(course, labs, work / "batch", args.copies)
        print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
              f"load {os.getloadavg()[0]:.1f}; {len(made)} submissions, {len(labs)} labs, workers={args.workers}, "
              f"median of {args.repeat} run(s)")
        tools = {w: functools.partial(grade_with_course, work / "batch", work / f"out{w}", w) for w in args.workers}
        if not args.skip_nbgrader:
            env = prepare_nbgrader(course, labs, work / "batch", work / "nbgrader")
            tools["nbgrader"] = lambda lab: _nbgrader(["autograde", lab.id, "--force"], work / "nbgrader", env)
        seconds = measure(labs, args.repeat, tools)
        course_s = {w: seconds[w] for w in args.workers}
        nbgrader = seconds.get("nbgrader", {})
        first = args.workers[0]
        report(made, work / f"out{first}", sum(course_s[first].values()), nbgrader)
        # One line per lab: seconds per submission (batch wall time / submissions), ratio > 1 = faster.
        per_lab = Counter(lab for _, lab in made)
        for lab in labs:
            n = per_lab[lab.id]
            fields = [f"course_s={course_s[first][lab.id] / n:.2f}"]
            fields += [f"course_s_w{w}={course_s[w][lab.id] / n:.2f}" for w in args.workers[1:]]
            if lab.id in nbgrader:
                fields += [f"nbgrader_s={nbgrader[lab.id] / n:.2f}",
                           f"ratio={nbgrader[lab.id] / course_s[first][lab.id]:.2f}"]
            print(lab.id, " ".join(fields))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(made, out: Path, course_wall: float, nbgrader: dict[str, float]) -> None:
    print(f"\n{'submission':34} {'course':>8} {'startup':>8} {'notebook':>9} {'tests':>7} {'overhead':>9} "
          f"{'nbgrader':>9}")
    per_lab = Counter(lab for _, lab in made)
    totals, work = [], []  # per submission: its worker's measured time, and the notebook and tests in it
    for student, lab in made:
        seconds = json.loads((out / student / lab / "results.json").read_text())["extra_data"]["seconds"]
        totals.append(seconds["total"])
        work.append(seconds.get("notebook", 0) + seconds.get("tests", 0))
        nb = f"{nbgrader[lab] / per_lab[lab]:9.1f}" if lab in nbgrader else f"{'-':>9}"
        print(f"{student + '/' + lab:34} {totals[-1]:8.1f} {seconds.get('startup', 0):8.1f} "
              f"{seconds.get('notebook', 0):9.1f} {seconds.get('tests', 0):7.1f} {totals[-1] - work[-1]:9.1f} {nb}")
    n = len(made)
    print(f"\ncourse grade: {course_wall:.1f} s for {n} submissions, {60 * n / course_wall:.1f} per minute")
    print(f"per submission: {course_wall / n:.1f} s of batch wall time, of which {sum(work) / n:.1f} s the notebook "
          f"and the tests; engine overhead {(course_wall - sum(work)) / n:.1f} s "
          f"({(sum(totals) - sum(work)) / n:.1f} s inside the worker's measured time, the rest process start "
          "and imports)")
    if nbgrader:
        wall = sum(nbgrader.values())
        print(f"nbgrader autograde (notebook execution only, no hidden tests): {wall:.1f} s, "
              f"{60 * n / wall:.1f} per minute")
        print(f"ratio course/nbgrader wall time: {course_wall / wall:.2f}")


if __name__ == "__main__":
    sys.exit(main())
