"""What decides a grade, as one key: a result is reused only while its key holds.

The key is a digest of its parts, and results.json records the parts too
(extra_data.key_parts), so that a rerun can say which one changed: the submission,
the suite, the points, the limits, ..."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import coursekit
from coursekit.config import Lab


def key_parts(lab: Lab, notebook: Path, only: tuple[str, ...] = ()) -> dict:
    """Each part as a value a person can compare (points, limits) or, for files, a digest."""
    suite = hashlib.sha256(lab.id.encode())
    for path in sorted(lab.suite_dir.rglob("*.py")):
        suite.update(path.relative_to(lab.suite_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "engine": coursekit.__version__,
        "submission": hashlib.sha256(notebook.read_bytes()).hexdigest(),
        "suite": suite.hexdigest(),
        "points": {name: spec.points for name, spec in lab.tests.items()},
        "visibility": {name: spec.visibility for name, spec in lab.tests.items()},
        # What the reference needs is part of it: a student past a limit is told that too.
        "limits": {**dataclasses.asdict(lab.limits),
                   **{f"{name}.{what}": getattr(spec, what) for name, spec in lab.tests.items()
                      for what in ("timeout", "reference_seconds") if getattr(spec, what) is not None}},
        "only": sorted(only),
    }


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def submission_key(lab: Lab, notebook: Path, only: tuple[str, ...] = ()) -> str:
    """The content that decides a grade: the notebook, the lab's suite and its config."""
    return key_of(key_parts(lab, notebook, only))
