"""Importing ahead what some code is about to import: the zygote for the hidden suites'
top-level imports, a kernel started ahead for the lab's own notebook. Nothing heavy
of its own (a kernel imports this before any student cell runs)."""
from __future__ import annotations

import importlib


def preload(wanted: list[tuple[str, str | None]]) -> None:
    """Import what `imported` found, ahead of the code that imports it (the zygote for the
    hidden suites, a kernel started ahead for the lab's notebook), and touch each imported
    name, which is where transformers loads a model's code. What fails is left for the
    code itself to import, and report."""
    for module, name in wanted:
        try:
            loaded = importlib.import_module(module)
            if name:
                getattr(loaded, name, None)
        except Exception:  # noqa: BLE001  (see above)
            pass
