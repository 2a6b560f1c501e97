"""Plausible wrong implementations, built by patching a lab's source notebook.

A mutant is a list of exact substring replacements on the solution code. Each
replacement must match exactly once in the notebook, so a mutant that no longer
applies fails loudly instead of silently grading the reference.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import nbformat


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str
    patches: list[tuple[str, str]]
    loses: list[str] = field(default_factory=list)   # the hidden tests that must catch it
    always: bool = False    # graded on every run of the project's tests, not only with COURSE_ALL_MUTANTS=1

    def apply(self, nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
        mutated = copy.deepcopy(nb)
        code_cells = [c for c in mutated.cells if c.cell_type == "code"]
        for old, new in self.patches:
            hits = [c for c in code_cells if old in c.source]
            count = sum(c.source.count(old) for c in hits)
            if count != 1:
                raise AssertionError(
                    f"mutant {self.name!r}: the text {old!r} occurs {count} times in the "
                    "notebook's code cells (expected exactly once); update the patch"
                )
            hits[0].source = hits[0].source.replace(old, new)
        return mutated
