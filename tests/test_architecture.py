"""The engine's imports go one way: no cycles among coursekit's modules (imports inside
functions included), and the batch side (the command line, batching, runners, archives,
exports) never loads torch or jupyter_client, which only a grading worker needs."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "coursekit"
BATCH_SIDE = ["cli", "batch", "runners", "archive", "gradebook", "gradescope", "results", "check", "release", "export",
              "feedback", "feedback_page", "tasks", "keys", "config", "similarity", "similarity_report", "late",
              "regrade", "tables", "public", "report", "report_page"]
# What batch-side modules import only inside the functions that need it (loaded here too).
BATCH_SIDE_LAZY = ["copydetect", "matplotlib.figure", "matplotlib.backends.backend_agg"]


def imports_of(path: Path) -> set[str]:
    """coursekit modules imported anywhere in the file, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", "")) == "TYPE_CHECKING"
                   for child in block.body for node in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("coursekit"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from coursekit import wire
                found |= {alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists()}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("coursekit.")}
    return found - {path.stem}


def test_no_import_cycles_in_the_engine():
    graph = {path.stem: imports_of(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target] if target in trail else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_batch_side_loads_neither_torch_nor_jupyter_client():
    code = (f"import sys\nfor m in {BATCH_SIDE!r}:\n    __import__('coursekit.' + m)\n"
            f"for m in {BATCH_SIDE_LAZY!r}:\n    __import__(m)\n"
            "print(sorted(m for m in ('torch', 'jupyter_client', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]", f"importing the batch side loaded {out.strip()}"


def test_the_zygote_starts_its_forge_before_loading_torch():
    """A batch's start is the zygote's imports and the forge's, side by side on two cores: what
    the zygote loads before the forge is started (torch by way of the kernel's session module,
    1.6 s) delays every submission of the batch."""
    code = ("import sys, subprocess\nimport coursekit.zygote as zygote\n"
            "class Started(Exception):\n    pass\n"
            "def popen(*args, **kwargs):\n"
            "    raise Started(sorted(m for m in ('torch', 'jupyter_client', 'transformers') if m in sys.modules))\n"
            "subprocess.Popen = popen\n"
            "try:\n    zygote.start_forge('/nonexistent', '[]')\nexcept Started as started:\n    print(started.args[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]", f"the zygote had loaded {out.strip()} when it started the forge"


def test_the_engine_reads_notebooks_without_building_an_unused_uri_parser():
    """nbformat's validator brings jsonschema, which builds rfc3987_syntax's grammar at import
    (over a second of CPU per grader process) unless coursekit.notebook has marked it absent
    first: every other module takes nbformat from there, so that no import order can skip it."""
    direct = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "notebook"
                    and any(isinstance(node, ast.Import) and any(a.name.split(".")[0] == "nbformat" for a in node.names)
                            or isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nbformat"
                            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))))
    assert direct == [], f"these modules import nbformat themselves: {direct}"
    code = "import sys, coursekit.check\nprint(sys.modules.get('rfc3987_syntax', 'absent'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "None", f"rfc3987_syntax was {out.strip()} after importing the engine"
