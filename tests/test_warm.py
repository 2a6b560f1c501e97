"""Student processes started ahead: each warm worker starts the sandboxed kernel of the
submission it expects while the one before is graded, and that kernel serves that one
submission alone: never a second one, never anything of another."""
from __future__ import annotations

import json

from coursekit.batch import discover, grade_batch
from coursekit.results import RESULTS_FILE

from .conftest import toy_notebook
from .test_orphans import processes

# A file a submission leaves in its working folder, and state it leaves in its process (a
# module's attribute, an environment variable): the next submission must find none of them,
# nor anything of the grader's own environment (kernels are forked from one forge per batch).
LEAVE = ("import os, torch\nopen('left-behind.txt', 'w').write('secret')\n"
         "torch.LEFT_BEHIND = 1\nos.environ['LEFT_BEHIND'] = '1'\n"
         "def double(x):\n    if isinstance(x, str):\n        raise TypeError('no')\n    return x * 2", None)
PEEK = ("import os, glob, torch\nSEEN = glob.glob('/tmp/course-student-*/left-behind.txt') + glob.glob('left-behind.txt')\n"
        "SEEN += [hasattr(torch, 'LEFT_BEHIND'), 'LEFT_BEHIND' in os.environ, 'COURSE_GRADER_SECRET' in os.environ]\n"
        "try:  # the environment the process started with (unreadable to a kernel whose user was changed)\n"
        "    SEEN.append(b'COURSE_GRADER_SECRET' in open('/proc/self/environ', 'rb').read())\n"
        "except PermissionError:\n    pass\n"
        "def double(x):\n    if isinstance(x, str):\n        raise TypeError('no')\n"
        "    return x * (3 if any(SEEN) else 2)", None)


def test_each_kernel_is_started_ahead_and_serves_one_submission(toy_course, tmp_path, write_notebook, monkeypatch):
    monkeypatch.setenv("COURSE_GRADER_SECRET", "grader only")
    folder = tmp_path / "submissions"
    for name, cells in [("first", [LEAVE]), ("second", [PEEK]), ("third", [PEEK])]:
        write_notebook(toy_notebook([("import torch\nfrom torch import nn", None), *cells]), f"{name}.ipynb", folder)
    rows = grade_batch(toy_course, discover(toy_course, [folder], "toy"), tmp_path / "out", workers=1,
                       progress=False)
    assert all(not r["problem"] for r in rows), rows
    results = {r["student"]: json.loads((tmp_path / "out" / r["student"] / RESULTS_FILE).read_text())
               for r in rows}
    started = {name: res["extra_data"]["student_process"] for name, res in results.items()}
    # Every kernel was started before its submission was handed over, each in a folder of its own.
    assert all(p["started_ahead"] for p in started.values()), started
    assert len({p["folder"] for p in started.values()}) == 3, started
    # Nothing of the first submission was visible to the next ones: double() kept its factor 2.
    for name in ("second", "third"):
        scores = {t["name"]: t["score"] for t in results[name]["tests"]}
        assert scores["test_double"] == 3, (name, results[name]["tests"][0]["output"])
    # And no kernel is left once the batch is over.
    assert not any(processes(p["folder"]) for p in started.values())


def test_a_kernel_started_ahead_loads_the_labs_imports_and_nothing_else():
    import subprocess
    import sys

    from coursekit.config import load_course
    from coursekit.runners import student_imports
    from coursekit.worker import preimport_code

    code = preimport_code(student_imports(load_course().lab("10_seq2seq_transformer")))
    # In a fresh interpreter, as in the kernel: the lab notebook's modules are loaded, and the
    # namespace the student's cells will run in gains no name.
    probe = (f"import sys\nbefore = set(globals())\n{code}\n"
             "assert set(globals()) - before == {'before'}, set(globals()) - before\n"
             "assert 'matplotlib.pyplot' in sys.modules and 'torch.nn.functional' in sys.modules\n"
             # And what the hidden suite builds in the student's process (student.lib): BART's model
             # code, which the notebook itself never imports.
             "assert 'transformers.models.bart.modeling_bart' in sys.modules\n"
             # Only what the notebook needs: nbformat alone costs a kernel over a second of CPU.
             "assert 'nbformat' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", probe], check=True, env={"MPLBACKEND": "Agg"})


def test_a_kernel_started_ahead_loads_what_course_yaml_preloads():
    """Lab 02's preload: torch's symbolic shapes, which nn.MultiheadAttention imports (with sympy)
    on its first key-padding mask: 0.35 s of every submission's notebook otherwise."""
    import subprocess
    import sys

    from coursekit.config import load_course
    from coursekit.runners import student_imports
    from coursekit.worker import preimport_code

    lab = load_course().lab("02_transformer_block")
    assert lab.preload == ("torch.fx.experimental.symbolic_shapes",)
    probe = f"import sys\n{preimport_code(student_imports(lab))}\nassert 'sympy' in sys.modules\n"
    subprocess.run([sys.executable, "-c", probe], check=True, env={"MPLBACKEND": "Agg"})


def test_the_zygote_imports_what_a_suite_imports_anywhere(tmp_path):
    """A suite's imports inside its tests and helpers, and pytest.importorskip, are made once per
    batch in the zygote, before any worker is forked (each worker paid them otherwise)."""
    import subprocess
    import sys

    (tmp_path / "test_lab.py").write_text(
        "import pytest\nwave = pytest.importorskip('wave')\n\n"
        "def helper():\n    from colorsys import rgb_to_hsv\n    return rgb_to_hsv\n\n"
        "def test_x():\n    import this_module_does_not_exist  # noqa: F401\n")
    probe = ("import sys\nfrom coursekit.zygote import preimport\n"
             f"preimport([{str(tmp_path)!r}])\n"
             "print(sorted(m for m in ('wave', 'colorsys', 'test_lab') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    # The imports only: the suite module itself is never run in the zygote.
    assert out.strip() == "['colorsys', 'wave']", out
