"""``course check``: the instructor's pre-flight for each lab.

- course.yaml gives points to exactly the suite's test functions;
- release/ and solutions/ are what `course release` makes of source/ today;
- public/ (what students may see of each suite: coursekit.public) is what `course release`
  makes today, and holds no test that course.yaml does not mark public;
- release/ holds no solution code and no hidden-test text;
- code a notebook provides from earlier labs (its metadata `course.provided`:
  {lab id: [grade ids or function names]}) is those labs' solution code, unchanged;
- the source notebook, graded like any submission, scores full marks; the
  release stub scores 0 and grades without the grader failing;
- what the source notebook needed (its slowest cell, each test) is recorded beside
  the suite, and the lab's default cell and test limits derive from it.
"""
from __future__ import annotations

import ast
import datetime as dt
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from coursekit.batch import Submission, grade_batch
from coursekit.config import TIMINGS_FILE, Course, Lab, derived_limit
from coursekit.notebook import HINTS_FILE, nbformat  # nbformat through notebook.py: see why there
from coursekit.public import copied_tests
from coursekit.release import EXAMPLES, OUTPUT_FOLDERS, generate, write_hints, write_tasks
from coursekit.results import RESULTS_FILE, Results, read_results, write_atomic
from coursekit.tasks import TASKS_FILE

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
# Lines this short ("return x", "pass") appear in any notebook; they prove no leak.
MIN_LEAK_LINE = 24


def suite_tests(lab: Lab) -> set[str]:
    names = set()
    for path in sorted(lab.suite_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names |= {node.name for node in tree.body
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")}
    return names


def check_points(lab: Lab) -> list[str]:
    found = suite_tests(lab)
    if not found:
        return [f"{lab.id}: no test functions in {lab.suite_dir}"]
    problems = [f"{lab.id}: test {name} in the suite has no points in course.yaml" for name in sorted(found - set(lab.tests))]
    problems += [f"{lab.id}: course.yaml gives points to {name}, which the suite does not define"
                 for name in sorted(set(lab.tests) - found)]
    return problems


def _normalised(path: Path) -> str:
    return json.dumps(nbformat.read(path, as_version=4), sort_keys=True)


# What `course release` records beside each suite: the file, how it is made, what it holds.
RECORDED = ((HINTS_FILE, write_hints, "the source notebook's hints"),
            (TASKS_FILE, write_tasks, "the tasks of the source notebook and its suite"))


def check_recorded(course: Course, lab: Lab) -> list[str]:
    """The files beside the suite are what `course release` would record today (no nbgrader
    needed: they come from the source notebook and the suite alone)."""
    with tempfile.TemporaryDirectory(prefix="course-check-") as tmp:
        scratch = Path(tmp)
        shutil.copytree(course.root / "source" / lab.id, scratch / "source" / lab.id)
        problems = []
        for name, write, what in RECORDED:
            write(scratch, lab)
            fresh, recorded = scratch / "autograder" / lab.id / name, lab.suite_dir / name
            if not recorded.exists() or recorded.read_bytes() != fresh.read_bytes():
                problems.append(f"{lab.id}: {recorded.relative_to(course.root)} is not {what}; "
                                f"run `course release {lab.id}`")
        return problems


def check_up_to_date(course: Course, lab: Lab) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="course-check-") as tmp:
        scratch = Path(tmp)
        shutil.copytree(course.root / "source" / lab.id, scratch / "source" / lab.id)
        generate(course, [lab], root=scratch)
        problems = []
        if _files(scratch / "public" / lab.id) != _files(lab.public_dir):
            problems.append(f"{lab.id}: public/{lab.id}/ is not what `course release {lab.id}` makes of the suite, "
                            "course.yaml and source/; run it")
        examples = course.root / "examples" / lab.id
        if examples.is_dir():
            for name, made_in in EXAMPLES.items():
                fresh = scratch / made_in / lab.id / lab.notebook
                if not (examples / name).exists() or _normalised(fresh) != _normalised(examples / name):
                    problems.append(f"{lab.id}: examples/{lab.id}/{name} is not what `course release {lab.id}` "
                                    f"makes of source/; run it")
        for folder in OUTPUT_FOLDERS:
            fresh, committed = scratch / folder / lab.id / lab.notebook, course.root / folder / lab.id / lab.notebook
            if not committed.exists():
                problems.append(f"{lab.id}: {committed.relative_to(course.root)} is missing; run `course release {lab.id}`")
            elif _normalised(fresh) != _normalised(committed):
                problems.append(f"{lab.id}: {committed.relative_to(course.root)} is out of date with "
                                f"source/; run `course release {lab.id}`")
        return problems


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*")) if p.is_file()}


def solution_lines(nb: nbformat.NotebookNode) -> tuple[set[str], set[str]]:
    """(lines inside solution regions, lines outside them), stripped."""
    inside, outside = set(), set()
    for cell in nb.cells:
        in_region = False
        for raw in cell.source.splitlines():
            line = raw.strip()
            if line.startswith(BEGIN):
                in_region = True
            elif line.startswith(END):
                in_region = False
            elif line:
                (inside if in_region else outside).add(line)
    return inside, outside


def check_leaks(course: Course, lab: Lab) -> list[str]:
    problems = [f"{lab.id}: public/{lab.id}/ holds {name}, a test course.yaml does not mark public"
                for name in sorted(copied_tests(lab) - set(lab.public_tests))]
    release = course.root / "release" / lab.id
    if not release.exists():
        return problems
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(release.rglob("*")) if p.is_file())
    released_lines = {line.strip() for nb_path in release.rglob("*.ipynb")
                      for cell in nbformat.read(nb_path, as_version=4).cells for line in cell.source.splitlines()}
    for marker in (BEGIN, END, "BEGIN HIDDEN TESTS", "BEGIN MARK SCHEME"):
        if marker in text:
            problems.append(f"{lab.id}: release/ contains the marker {marker!r}")
    inside, outside = solution_lines(nbformat.read(lab.notebook_in("source"), as_version=4))
    for line in sorted(inside - outside):
        if len(line) >= MIN_LEAK_LINE and line in released_lines:
            problems.append(f"{lab.id}: solution code appears in release/: {line[:80]!r}")
    # A suite line that the source notebook shows students anyway (a signature, a data
    # loader) is public; any other suite line found in release/ came from the suite.
    for path in sorted(lab.suite_dir.rglob("*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if (len(line) >= MIN_LEAK_LINE and not line.startswith(("#", "import ", "from "))
                    and line in released_lines and line not in outside):
                problems.append(f"{lab.id}: a line of the hidden suite ({path.name}) appears in release/: {line[:80]!r}")
    return problems


def check_provided(course: Course, lab: Lab) -> list[str]:
    """Each piece of an earlier lab named in `course.provided` ({lab id: [names]}, a name being a
    cell's grade id or a top-level function or class of that lab's source notebook), without its
    solution markers, must appear verbatim in one of this notebook's locked code cells."""
    nb = nbformat.read(lab.notebook_in("source"), as_version=4)
    provided = nb.metadata.get("course", {}).get("provided", {})
    locked = [c.source for c in nb.cells if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("locked")]
    problems = []
    for other_id, names in provided.items():
        if other_id not in course.labs:
            problems.append(f"{lab.id}: provides code from {other_id}, which course.yaml does not list")
            continue
        pieces = _provided_pieces(nbformat.read(course.labs[other_id].notebook_in("source"), as_version=4))
        for name in names:
            if name not in pieces:
                problems.append(f"{lab.id}: {other_id} has no cell, function or class {name!r} to provide")
            elif not any(pieces[name] in source for source in locked):
                problems.append(f"{lab.id}: its provided copy of {other_id}'s {name!r} differs from that "
                                "lab's solution (copy it again from its source notebook, without the solution markers)")
    return problems


def _provided_pieces(nb: nbformat.NotebookNode) -> dict[str, str]:
    """What a notebook can provide to a later lab: each code cell by its grade id, and each
    top-level function or class by its name, all without solution markers."""
    pieces = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        code = "\n".join(line for line in cell.source.splitlines() if not line.strip().startswith((BEGIN, END)))
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id:
            pieces[grade_id] = code
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                pieces.setdefault(node.name, ast.get_source_segment(code, node, padded=True))
    return pieces


def check_grades(course: Course, labs: list[Lab], workers: int, report=print) -> list[str]:
    kinds: dict[str, tuple[Lab, str]] = {}   # each submission's lab and which notebook it is
    subs = []
    for lab in labs:
        for kind in ("source", "release"):
            sub = Submission(f"{lab.id}-{kind}", lab.notebook_in(kind), lab)
            if sub.notebook.exists():
                subs.append(sub)
                kinds[sub.name] = lab, kind
    problems = []
    with tempfile.TemporaryDirectory(prefix="course-check-grades-") as out:
        rows = grade_batch(course, subs, Path(out), workers=workers)
        for row in rows:
            lab, kind = kinds[row["student"]]
            if row["problem"]:
                problems.append(f"{lab.id}: grading the {kind} notebook failed: {row['problem']}")
            elif kind == "source" and float(row["score"]) != lab.max_score:
                problems.append(f"{lab.id}: the source solution scores {row['score']} of {lab.max_score}, not full marks")
            elif kind == "release" and float(row["score"]) != 0:
                problems.append(f"{lab.id}: the release stub scores {row['score']}, not 0")
            elif kind == "source":
                note = record_timings(lab, read_results(Path(out) / row["student"] / RESULTS_FILE))
                if note:
                    report(note)
    return problems


def record_timings(lab: Lab, results: Results | None) -> str:
    """What the reference needs (its slowest graded cell, each test), from which the
    lab's default cell and test limits derive (coursekit.config.derived_limit). Written
    only when a limit it gives moves by more than LIMIT_MOVES from the recorded one (or
    the tests change): a moved limit regrades every submission of the lab."""
    if not results:
        return ""
    timings = {"slowest_cell_seconds": results.timings.get("slowest_cell", 0.0),
               "tests": {t.name: t.seconds for t in results.tests},
               "measured": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    path = lab.suite_dir / TIMINGS_FILE

    def limits(recorded: dict) -> tuple:
        return (derived_limit(recorded["slowest_cell_seconds"]),
                sorted((name, derived_limit(s)) for name, s in recorded["tests"].items()))
    try:
        if not _moved(limits(json.loads(path.read_text(encoding="utf-8"))), limits(timings)):
            return ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    write_atomic(path, json.dumps(timings, indent=1, sort_keys=True) + "\n")
    cell, tests = limits(timings)
    return (f"{lab.id}: recorded what the reference needs in {path.relative_to(lab.root)}: cell limit "
            f"{cell:g} s, test limits {min(t for _, t in tests):g}-{max(t for _, t in tests):g} s "
            "(course.yaml's limits and timeouts override them)")


# How far a derived limit must move before the recorded timings are rewritten (and the lab regraded):
# one measurement of a slow test against the next differs by up to 45% on a shared 2-core machine
# (lab 04's Tiny Shakespeare test: 3.9 s, then 5.6 s), and a limit is 20 times the reference's time.
LIMIT_MOVES = 1.5


def _moved(recorded: tuple, measured: tuple) -> bool:
    (cell, tests), (new_cell, new_tests) = recorded, measured
    if [name for name, _ in tests] != [name for name, _ in new_tests]:
        return True
    pairs = [(cell, new_cell), *((a, b) for (_, a), (_, b) in zip(tests, new_tests))]
    return any(max(a, b) > LIMIT_MOVES * min(a, b) for a, b in pairs)


def run_checks(course: Course, labs: list[Lab], workers: int = 1, report=print) -> list[str]:
    problems: list[str] = []
    for lab in labs:
        for step in (check_points, lambda lab: check_up_to_date(course, lab), lambda lab: check_recorded(course, lab),
                     lambda lab: check_leaks(course, lab), lambda lab: check_provided(course, lab)):
            problems += step(lab)
    report(f"static checks done ({len(problems)} problem(s)); grading source and release notebooks...")
    problems += check_grades(course, labs, workers, report)
    return problems
