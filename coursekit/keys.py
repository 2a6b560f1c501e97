"""What decides a grade, as one key: a result is reused only while its key holds."""
from __future__ import annotations

import hashlib
from pathlib import Path

import coursekit
from coursekit.config import Lab


def submission_key(lab: Lab, notebook: Path, only: tuple[str, ...] = ()) -> str:
    """The content that decides a grade: the notebook, the lab's suite and its config."""
    digest = hashlib.sha256(coursekit.__version__.encode())
    digest.update(notebook.read_bytes())
    digest.update(lab.id.encode())
    digest.update(repr(sorted(lab.tests.items())).encode())
    digest.update(repr(lab.limits).encode())
    if only:
        digest.update(repr(sorted(only)).encode())
    for path in sorted(lab.suite_dir.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()
