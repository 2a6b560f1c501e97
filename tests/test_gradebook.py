"""Scores of an nbgrader submitted/ tree land in nbgrader's own gradebook."""
from __future__ import annotations

import shutil

import nbformat
import yaml

from coursekit.batch import discover, grade_batch
from coursekit.config import load_course
from coursekit.gradebook import HIDDEN_CELL, open_gradebook

from .conftest import TOY, TOY_CELLS, toy_notebook


def _nbgrader_course(tmp_path):
    root = tmp_path / "course"
    shutil.copytree(TOY, root)
    config = yaml.safe_load((root / "course.yaml").read_text())
    config["labs"][0]["due"] = "2026-01-01T12:00:00Z"
    (root / "course.yaml").write_text(yaml.safe_dump(config))
    (root / "nbgrader_config.py").write_text('c = get_config()\nc.LateSubmissionPlugin.penalty_method = "zero"\n')
    nb = toy_notebook(TOY_CELLS[:3])
    written = nbformat.v4.new_markdown_cell("Explain your design.")
    written.metadata["nbgrader"] = {"grade": True, "solution": True, "locked": False, "points": 2,
                                    "grade_id": "written", "schema_version": 3}
    nb.cells.append(written)
    (root / "source" / "toy").mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, root / "source" / "toy" / "toy.ipynb")
    for student, stamp in (("alice", "2026-01-01 11:00:00 UTC"), ("bob", "2026-01-02 12:00:00 UTC")):
        folder = root / "submitted" / student / "toy"
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / "toy.ipynb")
        (folder / "timestamp.txt").write_text(stamp)
    return load_course(root / "course.yaml")


def test_scores_timestamps_and_manual_cells_reach_nbgrader(tmp_path):
    course = _nbgrader_course(tmp_path)
    subs = discover(course, [course.root / "submitted"], None)
    assert sorted(s.name for s in subs) == ["alice/toy", "bob/toy"]  # one folder per student and lab
    assert sorted(s.student for s in subs) == ["alice", "bob"]
    grade_batch(course, subs, tmp_path / "out", progress=False, gradebook=True)
    with open_gradebook(course) as book:
        assignment = book.find_assignment("toy")
        assert assignment.max_score == course.lab("toy").max_score + 2
        for student in ("alice", "bob"):
            hidden = book.find_grade(HIDDEN_CELL, "toy", "toy", student)
            assert hidden.auto_score == 6 and not hidden.needs_manual_grade
            written = book.find_grade("written", "toy", "toy", student)
            assert written.needs_manual_grade and written.manual_score is None
            assert (course.root / "autograded" / student / "toy" / "toy.ipynb").exists()
        on_time = book.find_submission_notebook("toy", "toy", "alice")
        late = book.find_submission_notebook("toy", "toy", "bob")
        assert on_time.late_submission_penalty == 0
        # nbgrader's "zero" method, set in nbgrader_config.py: a late notebook loses its score.
        assert book.find_submission("toy", "bob").total_seconds_late > 0 and late.late_submission_penalty == 6
