"""What students may see of a lab's suite: written by `course release` under public/<lab>/,
and shipped in the student image, which has no hidden suite.

- GRADED_NAMES_FILE: the lab's graded names, the names the suite reaches as `student.NAME`
  that the source notebook defines in a cell the grader runs, each with its task ("Task 3")
  or "" where the notebook provides it. The suite decides what is graded; the notebook says
  where each name belongs.
- A copy of each suite file that holds tests course.yaml marks `public: true`, cut down to
  those tests and the suite's own code they use (its imports, constants, functions and
  fixtures, and the statements that set the module up): nothing of the other tests.

`course validate` reads both (coursekit.validate); `course check` compares them with what
`course release` makes today and checks that the copies hold no other test.
"""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

from coursekit.config import ConfigError, Lab
# nbformat through notebook.py: see why there
from coursekit.notebook import SKIPPED_TAGS, defined_names, nbformat, statement_names, task_heading
from coursekit.results import write_atomic

GRADED_NAMES_FILE = "graded-names.json"
PROXY_NAME = "student"     # the fixture through which a suite reaches the notebook's names


def suite_files(lab: Lab) -> list[Path]:
    return sorted(lab.suite_dir.glob("test_*.py"))


def reached_names(lab: Lab) -> set[str]:
    """Every `student.NAME` of the suite's files."""
    names = set()
    for path in sorted(lab.suite_dir.rglob("*.py")):
        names |= _proxy_names(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return names


def _proxy_names(node: ast.AST) -> set[str]:
    """The `student.NAME`s under a node of a suite."""
    return {n.attr for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == PROXY_NAME}


def reached_names_by_test(lab: Lab) -> dict[str, set[str]]:
    """Per test function of the suite, the `student.NAME`s it reaches: in its own body, and
    in the module's functions and fixtures it uses, however deep."""
    reached = {}
    for path in suite_files(lab):
        functions = {node.name: node for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for name in functions:
            if name.startswith("test"):
                seen, todo = set(), [name]
                while todo:
                    current = todo.pop()
                    seen.add(current)
                    todo += [used for used in _uses(functions[current]) if used in functions and used not in seen]
                reached[name] = set().union(*(_proxy_names(functions[f]) for f in seen))
    return reached


def graded_names(lab: Lab, source_notebook: Path) -> list[dict]:
    """[{"name", "task"}] in the order the source notebook defines them."""
    reached = reached_names(lab)
    nb = nbformat.read(source_notebook, as_version=4)
    found: dict[str, str] = {}
    task = ""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("## "):
                    heading = task_heading(line)
                    task = heading[0] if heading else ""
            continue
        if cell.cell_type != "code" or set(cell.metadata.get("tags", [])) & SKIPPED_TAGS:
            continue
        solution = bool(cell.metadata.get("nbgrader", {}).get("solution"))
        for name in defined_names(cell.source):
            if name in reached and name not in found:
                found[name] = task if solution else ""
    return [{"name": name, "task": task} for name, task in found.items()]


def public_copy(path: Path, public: set[str], lab: Lab) -> str:
    """The suite file at `path` cut down to its tests in `public` and what they use."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    body = [node for node in ast.parse(text, filename=str(path)).body if not _is_docstring(node)]
    binds = [statement_names(node) for node in body]
    needed, kept = set(public), set()
    grew = True
    while grew:
        grew = False
        for i, node in enumerate(body):
            # A statement that binds nothing sets the module up (a thread count, a log
            # level); so does an autouse fixture. Both apply to every test, the public ones too.
            if i not in kept and (binds[i] & needed or not binds[i] or _autouse(node) or _future(node)):
                kept.add(i)
                needed |= _uses(node)
                grew = True
    where = f"course.yaml marks {', '.join(sorted(public))} of lab {lab.id} public"
    nodes = [body[i] for i in sorted(kept)]
    hidden = {n.name for node in nodes for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
              and n.name.startswith("test") and n.name not in public}
    if hidden:
        raise ConfigError(f"{where}, but {path.name} makes it use {min(hidden)}, a test that is not "
                          "public: mark both public, or move the code they share out of the test")
    if any("__file__" in _uses(node) for node in nodes):
        raise ConfigError(f"{where}, but the code it needs in {path.name} reads files beside the suite "
                          "(__file__), which students do not have: such a test cannot be public")
    if any(isinstance(node, (ast.Import, ast.ImportFrom)) and _beside_suite(node, path.parent) for node in nodes):
        raise ConfigError(f"{where}, but the code it needs in {path.name} imports a module beside the "
                          "suite, which students do not have: such a test cannot be public")
    header = (f'"""Public checks of lab {lab.id}: the tests course.yaml marks public, copied from\n'
              f'{path.name} by `course release` with the code they use. Students run them with\n'
              '`course validate`. Edit the suite and release again, not this copy."""')
    parts, previous = [header], None
    for node in nodes:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        is_import = isinstance(node, (ast.Import, ast.ImportFrom))
        separator = "\n" if is_import and previous else "\n\n" if previous is None else "\n\n\n"
        parts.append(separator + "\n".join(lines[first - 1:node.end_lineno]))
        previous = is_import
    return "".join(parts) + "\n"


def write_public(root: Path, lab: Lab) -> None:
    """public/<lab>/ under `root`, made afresh: the graded names and the public tests' copies."""
    folder = root / "public" / lab.id
    shutil.rmtree(folder, ignore_errors=True)
    names = graded_names(lab, root / "source" / lab.id / lab.notebook)
    write_atomic(folder / GRADED_NAMES_FILE, json.dumps({"lab": lab.id, "names": names}, indent=1) + "\n")
    public = set(lab.public_tests)
    found = set()
    for path in suite_files(lab):
        tests = {node.name for node in ast.parse(path.read_text(encoding="utf-8")).body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))} & public
        if tests:
            write_atomic(folder / path.name, public_copy(path, tests, lab))
            found |= tests
    if public - found:
        raise ConfigError(f"course.yaml marks {min(public - found)} of lab {lab.id} public, but no "
                          f"test_*.py of {lab.suite_dir} defines it")


def read_graded_names(lab: Lab) -> list[dict]:
    path = lab.public_dir / GRADED_NAMES_FILE
    try:
        names = json.loads(path.read_text(encoding="utf-8"))["names"]
        return [{"name": str(n["name"]), "task": str(n["task"])} for n in names]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the lab's graded names are missing; the instructor makes them with "
                                f"`course release {lab.id}`") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: not a file `course release` wrote; run `course release {lab.id}`") from None


def copied_tests(lab: Lab) -> set[str]:
    """The test functions the committed public copies define."""
    return {node.name for path in sorted(lab.public_dir.glob("*.py"))
            for node in ast.parse(path.read_text(encoding="utf-8")).body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")}


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _future(node: ast.stmt) -> bool:
    return isinstance(node, ast.ImportFrom) and node.module == "__future__"


def _autouse(node: ast.stmt) -> bool:
    return any(isinstance(d, ast.Call) and any(k.arg == "autouse" and getattr(k.value, "value", False) is True
                                               for k in d.keywords)
               for d in getattr(node, "decorator_list", []))


def _uses(node: ast.AST) -> set[str]:
    """The module-level names a statement may use: every name it reads, and the parameters
    of its functions (pytest passes a fixture by its name)."""
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    for fn in ast.walk(node):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names |= {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs}
    return names


def _beside_suite(node: ast.Import | ast.ImportFrom, folder: Path) -> bool:
    if isinstance(node, ast.ImportFrom) and node.level:
        return True
    modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
    return any(m and ((folder / f"{m.split('.')[0]}.py").exists() or (folder / m.split(".")[0]).is_dir())
               for m in modules)
