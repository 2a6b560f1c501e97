"""Scores into nbgrader's own gradebook, through its API.

A lab is mirrored into the gradebook from its source notebook by nbgrader's own
SaveCells (so the written answers are grade cells formgrader knows), plus one
autograded cell, ``hidden_tests``, worth the hidden suite's points. Each graded
submission of an nbgrader tree becomes nbgrader's submission with that cell's
score, its timestamp, the student's extension (nbgrader's own field: its due date
then includes it), its late penalty, and a copy under autograded/ for formgrader to
show. The penalty is course.yaml's late policy where the lab has one, else nbgrader's
LateSubmissionPlugin as nbgrader_config.py sets it. The manually graded cells are
left for formgrader; nbgrader's export sums both and shows the raw score, the
penalty and what is left.
"""
from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from coursekit.config import Course, Lab
from coursekit.late import DAY, Lateness
from coursekit.notebook import nbformat  # through notebook.py: see why there
from coursekit.release import put_nbgrader_tools_on_path
from coursekit.results import Results

HIDDEN_CELL = "hidden_tests"


def gradebook_url(course: Course) -> str:
    return f"sqlite:///{course.root / 'gradebook.db'}"


def open_gradebook(course: Course):
    from nbgrader.api import Gradebook

    put_nbgrader_tools_on_path()
    return Gradebook(gradebook_url(course), course.course_id)


def _naive_utc(when: dt.datetime | None) -> dt.datetime | None:
    return when.astimezone(dt.timezone.utc).replace(tzinfo=None) if when else None


def register_lab(course: Course, lab: Lab, gradebook) -> None:
    from nbgrader.preprocessors import SaveCells

    gradebook.update_or_create_assignment(lab.id, duedate=_naive_utc(lab.due))
    notebook_id = Path(lab.notebook).stem
    source = nbformat.read(lab.notebook_in("source"), as_version=4)
    resources = {"nbgrader": {"db_url": gradebook_url(course), "assignment": lab.id, "notebook": notebook_id},
                 "course_id": course.course_id}
    SaveCells().preprocess(source, resources)
    gradebook.update_or_create_grade_cell(HIDDEN_CELL, notebook_id, lab.id, max_score=lab.max_score,
                                          cell_type="code")


def _nbgrader_settings(course: Course):
    """The course's nbgrader_config.py, where the late-penalty method is set."""
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    path = course.root / "nbgrader_config.py"
    if not path.exists():
        return Config()
    return PyFileConfigLoader(path.name, path=str(course.root)).load_config()


def record(course: Course, lab: Lab, gradebook, student: str, notebook: Path, results: Results) -> None:
    from nbgrader.api import MissingEntry
    from nbgrader.plugins import LateSubmissionPlugin

    notebook_id = Path(lab.notebook).stem
    gradebook.update_or_create_student(student)
    late = Lateness.from_json(results.extra.get("late"))
    timestamp = _naive_utc(late.submitted)
    try:
        submission = gradebook.find_submission(lab.id, student)
        submission.timestamp = timestamp
    except MissingEntry:
        submission = gradebook.add_submission(lab.id, student, timestamp=timestamp)
    submission.extension = late.extension_days * DAY if late.extension_days else None
    submitted = gradebook.find_submission_notebook(notebook_id, lab.id, student)
    for grade in submitted.grades:
        if grade.name == HIDDEN_CELL:
            grade.auto_score = float(results.score)
            grade.needs_manual_grade = False
        elif grade.cell_type == "markdown" and grade.manual_score is None:
            grade.needs_manual_grade = True
    gradebook.db.commit()
    seconds_late = submission.total_seconds_late
    if lab.late is not None:
        submitted.late_submission_penalty = late.penalty(submitted.score)
    elif seconds_late > 0:  # as nbgrader's autograde: the plugin is asked about late work only
        plugin = LateSubmissionPlugin(config=_nbgrader_settings(course))
        submitted.late_submission_penalty = plugin.late_submission_penalty(student, submitted.score, seconds_late)
    else:
        submitted.late_submission_penalty = 0
    gradebook.db.commit()
    destination = course.root / "autograded" / student / lab.id
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy(notebook, destination / lab.notebook)
    if timestamp is not None:
        (destination / "timestamp.txt").write_text(str(timestamp))
