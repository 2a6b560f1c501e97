"""Reading a submitted notebook: validation with messages a student can act on,
which cells the grader runs, and which lab the notebook belongs to."""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import sys

# nbformat imports jsonschema to validate notebooks, and jsonschema imports rfc3987_syntax where it is
# installed (JupyterLab's dependencies bring it), which builds a grammar's parser at import: 1.3 s of
# CPU in every grader process that reads a notebook, for the "iri" string formats, which no notebook
# schema uses. Marking it absent (before nbformat) makes jsonschema leave those two formats out; so
# that it always comes first, the engine's other modules import nbformat from here.
sys.modules.setdefault("rfc3987_syntax", None)

import nbformat  # noqa: E402

from coursekit.config import Lab  # noqa: E402
from coursekit.preload import import_pairs  # noqa: E402

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


def _code_cells(nb: nbformat.NotebookNode) -> list[tuple[Cell, set[str]]]:
    """Each code cell with its position in the notebook and the skipping tags it carries."""
    return [(Cell(number, cell.source), set(cell.get("metadata", {}).get("tags", [])) & SKIPPED_TAGS)
            for number, cell in enumerate(nb.cells, start=1) if cell.cell_type == "code"]


def graded_cells(nb: nbformat.NotebookNode) -> list[Cell]:
    """The code cells the grader runs, in order."""
    return [cell for cell, skipping in _code_cells(nb) if not skipping]


def skipped_cells(nb: nbformat.NotebookNode) -> list[dict]:
    """The code cells the grader does not run, for the student's feedback: numbers and tags."""
    return [{"cell": cell.number, "tags": sorted(skipping)} for cell, skipping in _code_cells(nb) if skipping]


def defined_names(source: str) -> dict[str, ast.stmt]:
    """The names a code cell binds at its top level (def, class, assignment, import; inside
    if/try/with/for blocks too, never inside a function or class), each with the top-level
    statement that binds it last. {} for a cell that is not Python (a cell magic, a syntax error)."""
    tree = _python(source)
    # Sorted: a statement binding several names lists them in one order on every run.
    return {} if tree is None else {name: node for node in tree.body for name in sorted(statement_names(node))}


def imported(source: str) -> list[tuple[str, str | None]]:
    """What a code cell imports at its top, as pairs for coursekit.preload."""
    tree = _python(source)
    return import_pairs(tree.body) if tree is not None else []


def _python(source: str) -> ast.Module | None:
    """A code cell as Python; None for a cell that is not (a cell magic, a syntax error)."""
    if source.lstrip().startswith("%%"):
        return None
    # Shell and line magics (!pip, %time) are IPython's, not Python's: read them as `pass`.
    try:
        return ast.parse(re.sub(r"^(\s*)[!%].*$", r"\1pass", source, flags=re.MULTILINE))
    except SyntaxError:
        return None


def lab_imports(lab: Lab) -> list[tuple[str, str | None]]:
    """What the graded cells of the lab's own notebook import (the instructor's, not a
    student's), for coursekit.preload."""
    path = next((p for p in (lab.notebook_in("source"), lab.notebook_in("release")) if p.exists()), None)
    if path is None:
        return []
    return sorted({pair for cell in graded_cells(read_notebook(path)) for pair in imported(cell.source)}, key=str)


def statement_names(node: ast.stmt) -> set[str]:
    """The names one top-level statement binds in its module."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name != "*"}
    names: set[str] = set()
    targets = {ast.Assign: lambda n: n.targets, ast.AnnAssign: lambda n: [n.target], ast.AugAssign: lambda n: [n.target],
               ast.For: lambda n: [n.target], ast.With: lambda n: [i.optional_vars for i in n.items if i.optional_vars]}
    for target in targets.get(type(node), lambda n: [])(node):
        names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    for block in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, block, []):
            if isinstance(child, ast.ExceptHandler):
                names |= {child.name} if child.name else set()
                names |= {name for stmt in child.body for name in statement_names(stmt)}
            else:
                names |= statement_names(child)
    return names


def task_heading(line: str) -> tuple[str, str] | None:
    """("Task 3", its title) for a line of markdown that heads a task ("## Task 3: title")."""
    if not line.startswith("## Task "):
        return None
    label, _, title = line[3:].partition(":")
    return label.strip(), title.strip()


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
