"""Importing ahead what some code is about to import: the zygote for the hidden suites'
imports, a kernel started ahead for the lab's own notebook and what its suite builds
there. Nothing heavy of its own (a kernel imports this before any student cell runs)."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

# `student.lib("transformers.BartConfig")` in a hidden suite: a library object built in the student's process.
_LIBRARY_REQUEST = re.compile(r"""\.lib\(\s*["']([A-Za-z_][\w.]*)["']""")


def preload(wanted: list[tuple[str, str | None]]) -> None:
    """Import the (module, name) pairs found below (import_pairs, suite_imports,
    library_requests), ahead of the code that imports them (the zygote for the hidden
    suites, a kernel started ahead for the lab's notebook and suite), and touch each imported
    name, which is where transformers loads a model's code. What fails is left for the
    code itself to import, and report."""
    for module, name in wanted:
        try:
            loaded = importlib.import_module(module)
            if name:
                getattr(loaded, name, None)
        except Exception:  # noqa: BLE001  (see above)
            pass


def library_requests(suite_dir: Path) -> list[tuple[str, str]]:
    """The library objects a hidden suite asks the student's process for by name
    (``student.lib("transformers.BartConfig")``), as pairs for preload: a kernel that has
    them loaded ahead saves their import in every submission (BART's model code: 1.8 s in
    lab 10). Library names only, which the notebooks name as their oracles; nothing of a
    test or of what it expects. Which prefix of a dotted path is the module is only known
    on import, so every split is listed (one that is not a module fails at once)."""
    pairs = set()
    for path in sorted(suite_dir.glob("*.py")):
        for dotted in _LIBRARY_REQUEST.findall(path.read_text(encoding="utf-8")):
            parts = dotted.split(".")
            pairs |= {(".".join(parts[:i]), parts[i]) for i in range(1, len(parts))}
    return sorted(pairs)


def suite_imports(source: str) -> list[tuple[str, str | None]]:
    """What a hidden suite's file imports, wherever it does: at its top, inside a test or a
    helper (`from transformers import get_linear_schedule_with_warmup` in lab 05), or through
    ``pytest.importorskip("peft")`` (lab 08): each otherwise imported again in every
    submission's worker. As pairs for preload; relative imports left out."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = set(import_pairs(ast.walk(tree)))
    found |= {(node.args[0].value, None) for node in ast.walk(tree)
              if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)}
    return sorted(found, key=str)


def import_pairs(nodes) -> list[tuple[str, str | None]]:
    """The import statements among `nodes`, as pairs for preload: (module, name) for `from
    module import name`, (module, None) for `import module`; relative imports left out."""
    found: list[tuple[str, str | None]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.module, alias.name if alias.name != "*" else None) for alias in node.names]
    return found
