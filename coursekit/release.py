"""``course release``: nbgrader's own generate_assignment and generate_solution,
configured from course.yaml.

The student notebook (release/) has its solution regions turned into stubs and
its hidden tests and mark schemes removed; the solution notebook (solutions/) is
the source without outputs. nbgrader's bookkeeping database is a throwaway here:
the release depends on the source notebooks alone.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from traitlets.config import Config

from coursekit.config import Course, Lab
from coursekit.notebook import HINTS_FILE, notebook_hints, read_notebook
from coursekit.public import graded_names, reached_names_by_test, write_public
from coursekit.results import write_atomic
from coursekit.tasks import TASKS_FILE, assign_tests, notebook_tasks, tasks_json

STUDENT_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
OUTPUT_FOLDERS = ("release", "solutions")


class ReleaseError(RuntimeError):
    pass


def put_nbgrader_tools_on_path() -> None:
    """nbgrader runs the `alembic` command for its database: find it beside this
    Python even when the virtual environment is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def nbgrader_config(course: Course, root: Path, db_url: str | None = None) -> Config:
    """The settings nbgrader needs, for `course release` and for nbgrader_config.py alike."""
    from nbgrader.preprocessors import ClearMarkScheme, ClearOutput, IncludeHeaderFooter, LockCells

    c = Config()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.course_id = course.course_id
    c.CourseDirectory.source_directory = "source"
    c.CourseDirectory.release_directory = "release"
    c.CourseDirectory.solution_directory = "solutions"
    if db_url:
        c.CourseDirectory.db_url = db_url
    c.ClearSolutions.code_stub = {"python": STUDENT_STUB}
    c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
    # nbgrader's default ends with Execute, which would run every training cell to
    # fill in outputs; the solution notebook is published clean instead.
    c.GenerateSolution.preprocessors = [IncludeHeaderFooter, LockCells, ClearOutput, ClearMarkScheme]
    c.GenerateAssignment.force = True
    c.GenerateSolution.force = True
    return c


def generate(course: Course, labs: list[Lab], root: Path | None = None) -> None:
    """Write release/ and solutions/ for ``labs`` under ``root`` (the course by
    default; `course check` passes a scratch copy to compare with what is committed)."""
    from nbgrader.converters import GenerateAssignment, GenerateSolution
    from nbgrader.converters.base import NbGraderException
    from nbgrader.coursedir import CourseDirectory

    root = root or course.root
    put_nbgrader_tools_on_path()
    with tempfile.TemporaryDirectory(prefix="course-nbgrader-") as scratch:
        config = nbgrader_config(course, root, db_url=f"sqlite:///{scratch}/gradebook.db")
        for lab in labs:
            if not (root / "source" / lab.id / lab.notebook).exists():
                raise FileNotFoundError(f"{root / 'source' / lab.id / lab.notebook}: the source notebook of "
                                        f"lab {lab.id} is missing (course.yaml names it)")
            for folder in OUTPUT_FOLDERS:
                shutil.rmtree(root / folder / lab.id, ignore_errors=True)
            for converter in (GenerateAssignment, GenerateSolution):
                coursedir = CourseDirectory(config=config)
                coursedir.assignment_id = lab.id
                app = converter(coursedir=coursedir, config=config)
                app.log.setLevel(logging.ERROR)
                try:
                    app.start()
                except NbGraderException:
                    raise ReleaseError(f"nbgrader could not process source/{lab.id}/{lab.notebook} "
                                       f"({converter.__name__}); its log above says why") from None
            write_hints(root, lab)
            write_public(root, lab)
            write_tasks(root, lab)
            write_examples(root, lab)


# The quick start's example submissions of a lab, where it has an examples/<lab>/ folder:
# copies of what `course release` makes, so they never drift from the lab.
EXAMPLES = {"reference.ipynb": "solutions", "stub.ipynb": "release"}


def write_examples(root: Path, lab: Lab) -> None:
    folder = root / "examples" / lab.id
    if folder.is_dir():
        for name, made_in in EXAMPLES.items():
            shutil.copy(root / made_in / lab.id / lab.notebook, folder / name)


def write_hints(root: Path, lab: Lab) -> None:
    """The source notebook's hints, beside the suite: every backend ships the suite."""
    hints = notebook_hints(root / "source" / lab.id / lab.notebook)
    write_atomic(root / "autograder" / lab.id / HINTS_FILE, json.dumps(hints, indent=1, ensure_ascii=False) + "\n")


def write_tasks(root: Path, lab: Lab) -> None:
    """Which hidden tests grade which task of the notebook, for the student's feedback
    (coursekit.tasks): from this root's source notebook and the course's suite."""
    notebook = root / "source" / lab.id / lab.notebook
    task_of_name = {n["name"]: n["task"] for n in graded_names(lab, notebook)}
    tasks = assign_tests(notebook_tasks(read_notebook(notebook)), task_of_name, reached_names_by_test(lab))
    write_atomic(root / "autograder" / lab.id / TASKS_FILE, tasks_json(tasks))
