"""The student's flow in a real browser (scripts/student_flow.py): JupyterLab as the
student image starts it, lab 01 opened, its cells run up to the first task, a plot
drawn, the notebook saved, and what JupyterLab saved is the notebook the student worked on."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tests.browser import BrowserMissing, find_chromium

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def test_student_opens_runs_plots_and_saves_lab_01(tmp_path):
    try:
        find_chromium()
    except BrowserMissing as exc:
        pytest.skip(f"no headless Chromium: {exc}")
    flow = subprocess.run([sys.executable, str(ROOT / "scripts" / "student_flow.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    print(flow.stdout, flow.stderr)
    assert flow.returncode == 0, flow.stderr[-3000:]
    for name in ("notebook-opened.png", "plot.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG) and (tmp_path / name).stat().st_size > 10_000, name

    released = nbformat.read(ROOT / "release" / "01_attention" / "attention.ipynb", as_version=4)
    saved = nbformat.read(tmp_path / "attention.ipynb", as_version=4)
    nbformat.validate(saved)
    first_task = next(i for i, c in enumerate(released.cells) if c.cell_type == "markdown" and "## Task 1:" in c.source)
    # Every cell before Task 1 ran, in order, without an error; the student's own cell drew the plot.
    ran = [c for c in saved.cells[:first_task] if c.cell_type == "code"]
    assert [c.execution_count for c in ran] == list(range(1, len(ran) + 1))
    assert not [o for c in ran for o in c.outputs if o.output_type == "error"]
    plot = saved.cells[first_task]
    assert "plt.bar(" in plot.source and any("image/png" in o.get("data", {}) for o in plot.outputs)
    assert not [o for o in plot.outputs if o.output_type == "error"]
    # The rest is the release's, untouched (nbgrader's metadata included), and not run.
    assert [c.source for c in saved.cells[first_task + 1:]] == [c.source for c in released.cells[first_task:]]
    assert [c.metadata.get("nbgrader") for c in saved.cells[first_task + 1:]] == \
           [c.metadata.get("nbgrader") for c in released.cells[first_task:]]
    # `course validate` read it as lab 01's, found the tasks still stubs, and nothing else wrong
    # with the cells before Task 1 or the student's own (it names a cell that raises by its first line).
    assert "validated: `course validate` exited with status 1" in flow.stdout
    assert "lab 01_attention" in flow.stdout and "scaled_dot_product_attention (Task 1): not implemented" in flow.stdout
    assert plot.source.splitlines()[0] not in flow.stdout.split("validated:")[0]
