"""Where a submission's worker runs.

The batch decides what to grade and keeps the results; a runner only runs one
``python -m coursekit.worker`` for one submission and leaves results.json (and
feedback.html, grader.log) in the submission's folder. The local runner starts the
worker on this machine; other backends run the same worker elsewhere (a container,
a cluster node) and bring the folder's files back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from coursekit.config import Course, Lab

# Past the submission's own limit, the worker gets this long to write its results
# before it is killed.
WORKER_GRACE_SECONDS = 60


@dataclass
class Job:
    """One submission to grade: everything a worker needs, wherever it runs."""
    course: Course
    lab: Lab
    notebook: Path
    folder: Path                  # where results.json, feedback.html and grader.log must end up
    extra: dict = field(default_factory=dict)
    threads: int = 1              # OMP threads for the worker and the student's kernel

    @property
    def timeout(self) -> float:
        return self.lab.limits.submission_seconds + WORKER_GRACE_SECONDS

    def worker_args(self, course_yaml: str, notebook: str, out: str) -> list[str]:
        """The worker's arguments, with the paths as the place it runs sees them."""
        return ["-m", "coursekit.worker", "--course", course_yaml, "--lab", self.lab.id,
                "--notebook", notebook, "--out", out, "--extra", json.dumps(self.extra)]


class Runner(Protocol):
    def run(self, job: Job) -> str:
        """Run the worker for `job`; return "" or why it did not end normally."""


class LocalRunner:
    """A fresh worker process on this machine per submission."""

    def run(self, job: Job) -> str:
        command = [sys.executable, *job.worker_args(str(job.course.path), str(job.notebook), str(job.folder))]
        with open(job.folder / "grader.log", "wb") as log:
            try:
                proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=worker_env(job.threads),
                                      timeout=job.timeout)
            except subprocess.TimeoutExpired:
                return "grading ran past the submission's time limit and was stopped"
        return "" if proc.returncode == 0 else f"the grader's worker exited with status {proc.returncode}"


def worker_env(threads: int) -> dict[str, str]:
    """Each worker and its student's kernel share the cores evenly: torch's default of
    one thread per core, times several workers, makes everything many times slower."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    return env
