"""What a hidden suite's oracle answers the same way for every submission (the reference
trainer's merges on the course's text, transformers' logits of a real model on a fixed
prompt), computed once and kept beside the suite: `autograder/<lab>/.cache/`, which the
student's sandbox never sees. Suites reach it through the `oracle_cache` fixture."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from coursekit import wire
from coursekit.results import write_atomic


class OracleCache:
    """One file per answer, named by a hash of what the answer depends on: change the
    reference's source, the input, a library's version or the device in `key`, and the
    answer is computed again. Files are the project's by-value format (JSON; never
    pickled), written whole and renamed, so that a batch's workers may race to write one.
    A file that cannot be read is computed again; a folder that cannot be written (a
    read-only suite) only means every submission computes its own."""

    def __init__(self, folder: Path):
        self.folder = folder

    def get(self, name: str, key: Iterable[str | bytes], compute: Callable[[], Any]) -> Any:
        path = self.path(name, key)
        try:
            return wire.loads(path.read_bytes())
        except (OSError, ValueError):
            pass
        value = compute()
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            write_atomic(path, wire.dumps(value))
        except OSError:
            pass
        return value

    def path(self, name: str, key: Iterable[str | bytes]) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"oracle_cache: {name!r} is not a plain file-name stem (letters, digits, _ . -)")
        digest = hashlib.sha256(name.encode())
        for part in key:
            data = part.encode() if isinstance(part, str) else bytes(part)
            # Each part's length first: ("ab", "c") and ("a", "bc") are different keys.
            digest.update(len(data).to_bytes(8, "little") + data)
        return self.folder / f"{name}-{digest.hexdigest()[:20]}.json"
