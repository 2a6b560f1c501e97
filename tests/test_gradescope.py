"""The Gradescope autograder zip, run the way Gradescope runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat

from coursekit.gradescope import build_zip

from .conftest import TOY_CELLS, toy_notebook


def test_run_autograder_grades_the_submission_folder(toy_course, tmp_path):
    archive = build_zip(toy_course, toy_course.lab("toy"), tmp_path / "toy.zip")
    root = tmp_path / "autograder"
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        zf.extractall(root / "source")
    assert {"setup.sh", "run_autograder", "course/course.yaml", "course/coursekit/worker.py",
            "course/autograder/toy/test_toy.py"} <= set(names)
    (root / "submission").mkdir()
    (root / "results").mkdir()
    nbformat.write(toy_notebook(TOY_CELLS[:3]), root / "submission" / "toy.ipynb")
    run = root / "source" / "run_autograder"
    run.chmod(0o755)
    env = {**os.environ, "AUTOGRADER_ROOT": str(root),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((root / "results" / "results.json").read_text())
    by_name = {t["name"]: t for t in results["tests"]}
    assert by_name["test_double"]["score"] == 3 and by_name["test_module_forward_and_grads"]["score"] == 2
    assert results["score"] == 6
    # The zip ships no notebook: the hint travels with the suite.
    assert "Hint: slow() must return 1 without looping forever." in by_name["test_slow_function"]["output"]
    assert (root / "results" / "feedback.html").exists()


def test_a_submission_without_the_notebook_is_told_what_to_submit(toy_course, tmp_path):
    archive = build_zip(toy_course, toy_course.lab("toy"), tmp_path / "toy.zip")
    root = tmp_path / "autograder"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(root / "source")
    (root / "submission").mkdir()
    (root / "submission" / "notes.txt").write_text("forgot the notebook")
    from coursekit.gradescope import run

    assert run(root, "toy") == 0
    results = json.loads((root / "results" / "results.json").read_text())
    assert results["score"] == 0 and "Submit the lab's notebook, toy.ipynb" in results["output"]
