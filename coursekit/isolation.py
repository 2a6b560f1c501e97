"""Who the student's code runs as, and what it can see (the grader's side of
coursekit.sandbox).

When the grader runs as root (as in the grader container), the student's kernel
runs as an unprivileged user (course.yaml's ``sandbox.student_user``, default ``nobody``), which
makes a process-count limit bind and keeps the grader's files out of reach by
permissions too. Where that user cannot run this Python at all, the kernel runs as
the grader's user and every result says so.

Whatever the user, the kernel's sandbox plan covers the grader's private folders:
the hidden suites, the results, the submissions, the other kernels' folders and
the grader's home, keeping visible only the paths the kernel needs (the course,
the Python environment, its own folder).
"""
from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coursekit.sandbox import read_status

PLAN_FILE = ".sandbox-plan.json"
_REACHES_RUNTIME = ("import importlib.util as u, sys; "
                    "sys.exit(not all(u.find_spec(m) for m in ('torch', 'ipykernel', 'coursekit.runtime')))")


@dataclass(frozen=True)
class StudentUser:
    name: str
    uid: int
    gid: int

    def give(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)


@dataclass(frozen=True)
class Isolation:
    user: StudentUser | None
    description: str


def needed_paths(course_root: Path, workdir: Path) -> list[Path]:
    """What the kernel must still see: the course (minus what is covered inside it),
    the Python environment, its own folder."""
    paths = [course_root, Path(sys.prefix), Path(sys.base_prefix), workdir,
             *(Path(p) for p in sys.path if p and os.path.isdir(p))]
    return [p.resolve() for p in paths]


def sandbox_plan(workdir: Path, course_root: Path, private: list[Path], user: StudentUser | None = None,
                 address_space_bytes: int | None = None, memory_bytes: int | None = None,
                 max_processes: int | None = None, sandbox: bool = True) -> dict:
    """`sandbox`: course.yaml's sandbox.enabled (off: the kernel runs without namespaces and
    control groups, only with the user and limits above)."""
    workdir = workdir.resolve()
    needed = needed_paths(course_root, workdir)
    folders = [Path(tempfile.gettempdir()), Path.home(), *private]
    covers = []
    for folder in sorted({f.resolve() for f in folders if f.is_dir()}, key=lambda f: len(f.parts)):
        if folder == Path("/") or folder in needed:
            continue
        keep = [p for p in needed if folder in p.parents]
        keep = [p for p in keep if not any(q in p.parents for q in keep)]  # the outermost suffice
        covers.append([str(folder), sorted(map(str, keep))])
    plan = {
        "workdir": str(workdir),
        "writable": [str(workdir)],
        "cover": covers,
        "address_space_bytes": address_space_bytes,
        "memory_bytes": memory_bytes,
        "max_processes": max_processes,
        "sandbox": sandbox,
    }
    if user is not None:
        plan["user"] = {"uid": user.uid, "gid": user.gid}
        plan["give"] = [str(workdir / ".kernel.json")]
    return plan


def write_plan(plan: dict) -> Path:
    path = Path(plan["workdir"]) / PLAN_FILE
    path.write_text(json.dumps(plan))
    return path


_forge: str | None = None


def use_forge(socket_path: str | None) -> None:
    """From now on, this process's kernels are forked from the forge listening at
    `socket_path` (coursekit.forge) rather than started afresh."""
    global _forge
    _forge = socket_path


def launcher(plan_path: Path) -> list[str]:
    """The command that starts a kernel (the argv after it) in the sandbox of `plan_path`."""
    if _forge:
        return [sys.executable, "-m", "coursekit.forge", "relay", _forge, str(plan_path), "--"]
    return [sys.executable, "-m", "coursekit.sandbox", str(plan_path), "--"]


@functools.lru_cache(maxsize=None)
def student_isolation(course_root: Path, name: str = "nobody") -> Isolation:
    """`name`: course.yaml's sandbox.student_user."""
    if os.geteuid() != 0:
        return Isolation(None, f"the grader's own user ({pwd.getpwuid(os.geteuid()).pw_name}); "
                               "run the grader as root (as its container does) to isolate students")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return Isolation(None, f"root: the student user {name!r} does not exist "
                               "(course.yaml's sandbox.student_user names who it should be)")
    user = StudentUser(name, entry.pw_uid, entry.pw_gid)
    # The student's Python must run as that user inside the sandbox the kernel will get, and
    # reach the runtime and torch. Finding them is enough: importing torch here would cost every
    # grader worker (each a fresh process) seconds of CPU.
    runs, _ = probe(course_root, [sys.executable, "-c", _REACHES_RUNTIME], user=user)
    if not runs:
        return Isolation(None, f"root: the student user {name!r} cannot run {sys.executable} "
                               "(is the Python environment under a private directory?)")
    return Isolation(user, f"the unprivileged user {name!r}")


def probe(course_root: Path, argv: list[str], user: StudentUser | None = None, **limits) -> tuple[bool, dict]:
    """Run `argv` once in a kernel's sandbox, in a scratch folder: whether it exited 0,
    and what the launcher achieved (coursekit.sandbox.read_status)."""
    workdir = Path(tempfile.mkdtemp(prefix="course-probe-"))
    try:
        if user is not None:
            user.give(workdir)
        plan = write_plan(sandbox_plan(workdir, course_root, [], user=user, **limits))
        try:
            runs = subprocess.run([*launcher(plan), *argv], capture_output=True, cwd="/",
                                  timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            runs = False
        return runs, read_status(str(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def student_environment(data_dir: Path, workdir: Path) -> dict[str, str]:
    """The student's process gets a minimal environment: nothing of the grader's
    beyond what Python and the libraries need to start, and a home of its own."""
    keep = ("PATH", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
            "LD_LIBRARY_PATH", "OMP_NUM_THREADS")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
        "COURSE_DATA_DIR": str(data_dir),
        "HOME": str(workdir),
        "TMPDIR": str(workdir),  # the rest of the file system is read-only to the student
        "MPLCONFIGDIR": str(workdir / ".matplotlib"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # No TF32 in the student's process either (coursekit.runtime.full_float32).
        "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "0",
        "NVIDIA_TF32_OVERRIDE": "0",
    })
    return env


def scratch_dir(kind: str) -> Path:
    """A fresh folder under the system's temporary folder, named for this process, so that
    whoever outlives a killed process can remove what it left (remove_scratch)."""
    return Path(tempfile.mkdtemp(prefix=f"course-{kind}-{os.getpid()}-"))


def remove_scratch(pid: int) -> None:
    """Remove every scratch folder process `pid` made (a worker killed before its own cleanup)."""
    for folder in Path(tempfile.gettempdir()).glob(f"course-*-{pid}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def protect(path: Path) -> None:
    """Make a grader-only folder unreadable to everyone else."""
    if path.exists() and path.stat().st_mode & 0o077:
        path.chmod(0o700)
