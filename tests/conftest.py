from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from coursekit.config import load_course

TOY = Path(__file__).parent / "fixtures" / "toy"
# The toy lab's hidden suite is graded through the engine, never collected directly.
collect_ignore = ["fixtures"]

# The toy lab's notebook, cell by cell: what each test of its suite needs, and two
# cells the grader must survive (one raises, one is tagged as training and would
# run past the submission's limit if it ran).
TOY_CELLS = [
    ("import os\nimport torch\nfrom torch import nn", None),
    ("def double(x):\n    if isinstance(x, str):\n        raise TypeError('double() takes a tensor')\n"
     "    return x * 2", None),
    ("class Affine(nn.Module):\n    def __init__(self, n_in, n_out):\n        super().__init__()\n"
     "        self.lin = nn.Linear(n_in, n_out)\n\n    def forward(self, x):\n        return self.lin(x)", None),
    ("def slow():\n    while True:\n        pass", None),
    ("def crash():\n    os._exit(3)", None),
    ("raise RuntimeError('this cell is broken')", None),
    ("import time\ntime.sleep(600)", ["training"]),
    ("class AlwaysEqual:\n    def __eq__(self, other):\n        return True\n\n"
     "def always_equal():\n    return AlwaysEqual()", None),
    ("def hog():\n    return bytearray(16 * 2**30)", None),
    # Hostile, but harmless to the grade: every comparison happens in the grader.
    ("import builtins, numpy\nbuiltins.abs = lambda x: 0\n"
     "torch.allclose = lambda *a, **k: True\ntorch.equal = lambda *a, **k: True\n"
     "torch.testing.assert_close = lambda *a, **k: None\nnumpy.allclose = lambda *a, **k: True", None),
    ("print('x' * 50_000_000)", None),
]


def toy_notebook(cells=TOY_CELLS, lab="toy") -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["course"] = {"lab": lab}
    for source, tags in cells:
        cell = nbformat.v4.new_code_cell(source)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    return nb


@pytest.fixture(scope="session")
def toy_course():
    return load_course(TOY / "course.yaml")


@pytest.fixture
def write_notebook(tmp_path):
    def write(nb, name="toy.ipynb", folder=None):
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        return path
    return write
