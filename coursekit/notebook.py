"""Reading a submitted notebook: validation with messages a student can act on,
which cells the grader runs, and which lab the notebook belongs to."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nbformat

# Cells the source tags like this are never run by the grader: a grade must not
# wait on a student's plots or training loop.
SKIPPED_TAGS = frozenset({"demo", "training"})
MAX_NOTEBOOK_BYTES = 512 * 1024 * 1024
HINTS_FILE = "hints.json"   # beside each hidden suite, written by `course release`


class SubmissionError(Exception):
    """The submission cannot be graded at all; the message says why and what to do."""


@dataclass(frozen=True)
class Cell:
    number: int        # 1-based position among all the notebook's cells, as a student counts them
    source: str

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.source.splitlines() if line.strip()), "")[:80]



def read_notebook(path: Path) -> nbformat.NotebookNode:
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_NOTEBOOK_BYTES:
        raise SubmissionError(
            f"{path.name} is {size / 2**20:.0f} MB, over the {MAX_NOTEBOOK_BYTES // 2**20} MB limit: "
            "clear the outputs (Kernel > Restart Kernel and Clear Outputs) and submit again")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(
            f"{path.name} is not UTF-8 text (byte {exc.start}): it is not a notebook file; "
            "submit the .ipynb saved by Jupyter") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SubmissionError(
            f"{path.name} is not valid JSON ({exc}): the file is damaged or not a notebook; "
            "download it again from Jupyter (File > Download) and resubmit") from None
    if not isinstance(data, dict) or "cells" not in data and "worksheets" not in data:
        raise SubmissionError(f"{path.name} is JSON but not a Jupyter notebook (no cells)")
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as exc:  # nbformat raises several types for old or damaged files
        raise SubmissionError(f"{path.name} could not be read as a notebook: {exc}") from None
    return nb


def graded_cells(nb: nbformat.NotebookNode) -> list[Cell]:
    """The code cells the grader runs, in order, with their position in the notebook."""
    cells = []
    for number, cell in enumerate(nb.cells, start=1):
        if cell.cell_type != "code":
            continue
        tags = set(cell.get("metadata", {}).get("tags", []))
        if tags & SKIPPED_TAGS:
            continue
        cells.append(Cell(number, cell.source))
    return cells


def notebook_lab(nb: nbformat.NotebookNode) -> str | None:
    lab = nb.get("metadata", {}).get("course", {}).get("lab")
    return lab if isinstance(lab, str) else None


def notebook_hints(path: Path) -> dict[str, str]:
    """Hints the instructor wrote for students, per hidden test function, in the source
    notebook's metadata (course.hints). `course release` copies them beside the suite
    (HINTS_FILE), so that every grader, wherever it runs, finds them with the suite."""
    hints = read_notebook(path).metadata.get("course", {}).get("hints", {})
    return {str(k): str(v) for k, v in sorted(hints.items())} if isinstance(hints, dict) else {}


def suite_hints(suite_dir: Path) -> dict[str, str]:
    try:
        hints = json.loads((suite_dir / HINTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in hints.items()} if isinstance(hints, dict) else {}
