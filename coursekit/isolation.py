"""Who the student's code runs as.

When the grader runs as root (as in the grader container), the student's kernel
runs as an unprivileged user (``COURSE_STUDENT_USER``, default ``nobody``): it
cannot read the hidden suites (the grader makes autograder/ private to itself),
write the results folder, or signal the grader. A process-count limit then holds,
since it counts per user. Where that user cannot run this Python at all (an
interpreter under a private home directory, say), the kernel runs as the
grader's user and every result says so.
"""
from __future__ import annotations

import functools
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StudentUser:
    name: str
    uid: int
    gid: int

    def become(self) -> None:
        """In a child process, before exec: drop every privilege of root."""
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)

    def give(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)


@dataclass(frozen=True)
class Isolation:
    user: StudentUser | None
    description: str


@functools.lru_cache(maxsize=1)
def student_isolation() -> Isolation:
    if os.geteuid() != 0:
        return Isolation(None, f"the grader's own user ({pwd.getpwuid(os.geteuid()).pw_name}); "
                               "run the grader as root (as its container does) to isolate students")
    name = os.environ.get("COURSE_STUDENT_USER", "nobody")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return Isolation(None, f"root: the student user {name!r} does not exist (set COURSE_STUDENT_USER)")
    user = StudentUser(name, entry.pw_uid, entry.pw_gid)
    try:
        probe = subprocess.run([sys.executable, "-c", "import coursekit.runtime"], preexec_fn=user.become,
                               capture_output=True, cwd="/", timeout=120)
        runs = probe.returncode == 0
    except OSError:
        runs = False
    if not runs:
        return Isolation(None, f"root: the student user {name!r} cannot run {sys.executable} "
                               "(is the Python environment under a private directory?)")
    return Isolation(user, f"the unprivileged user {name!r}")


def protect(path: Path) -> None:
    """Make a grader-only folder unreadable to everyone else."""
    if path.exists() and path.stat().st_mode & 0o077:
        path.chmod(0o700)
