"""A hostile submission, graded beside honest ones: it is contained, it scores only
what its honest part earns, and the rest of the batch is untouched.

The hostile notebook knows everything an attacker could find out (the course's
path, the results folder, a listening port on this machine) and tries, in order:
a loop at import, gigabytes of output, a daemon left running, reading the hidden
suite and the grader's memory, a network connection, overwriting results, a fork
bomb, killing the grader, and exiting. The honest parts (test_double,
test_still_graded) are 4 of its 10 points.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import sys
import threading
import uuid
from pathlib import Path

import nbformat
import pytest

from coursekit.batch import discover, grade_batch
from coursekit.config import load_course
from coursekit.isolation import probe, sandbox_plan
from coursekit.results import GRADEBOOK_FILE, RESULTS_FILE

from .conftest import TOY, toy_notebook

MARKER = f"coursekit-hostile-{uuid.uuid4().hex[:8]}"
HONEST = [
    ("import torch", None),
    ("def double(x):\n    return 2 * x", None),
]


def hostile_cells(course_root: Path, out: Path, port: int) -> list[tuple[str, None]]:
    code = [
        "import os, re, signal, socket, subprocess, sys, time\nimport torch",
        "while True:\n    pass",
        "for _ in range(2000):\n    print('x' * 1_000_000)",
        "def double(x):\n    return 2 * x",
        # A daemon in its own session, and a double-forked one: both must die with the kernel.
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(900)', '{MARKER}'],"
        " start_new_session=True)\n"
        f"if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(900)', '{MARKER}'])\n"
        "    os._exit(0)",
        f"def steal_secret():\n"
        f"    places = ['{course_root}/autograder/hostile/test_hostile.py',\n"
        f"              os.environ['COURSE_DATA_DIR'] + '/../autograder/hostile/test_hostile.py']\n"
        "    for pid in os.listdir('/proc'):\n"
        "        if pid.isdigit():\n"
        "            places += [f'/proc/{pid}/cwd/test_hostile.py', f'/proc/{pid}/environ', f'/proc/{pid}/cmdline']\n"
        "    for place in places:\n"
        "        try:\n"
        "            found = re.search(r'SECRET = \"(.*?)\"', open(place, errors='replace').read())\n"
        "        except OSError:\n"
        "            continue\n"
        "        if found:\n"
        "            return found.group(1)",
        f"def phone_home():\n    try:\n        socket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n"
        "        return True\n    except OSError:\n        return False",
        f"def overwrite_results():\n    done = False\n"
        f"    for path in ['{out}/victim/{RESULTS_FILE}', '{out}/hostile/{RESULTS_FILE}', '{out}/{GRADEBOOK_FILE}']:\n"
        "        try:\n"
        "            with open(path, 'w') as handle:\n"
        "                handle.write('{\"score\": 1000}')\n"
        "            done = True\n"
        "        except OSError:\n"
        "            pass\n"
        "    return done",
        # Bounded, so that a sandbox that failed to contain it would not take the machine down.
        "def fork_bomb():\n    me, made = os.getpid(), 0\n    while made < 3000:\n        try:\n"
        "            if os.fork() == 0:\n                time.sleep(900)\n                os._exit(0)\n"
        "            made += 1\n        except OSError:\n            break\n    return made if os.getpid() == me else 0",
        "def kill_grader():\n    killed = False\n    for pid in os.listdir('/proc'):\n"
        "        try:\n            line = open(f'/proc/{pid}/cmdline', 'rb').read()\n        except OSError:\n"
        "            continue\n"
        "        if b'coursekit.worker' in line or b'pytest' in line:\n"
        "            try:\n                os.kill(int(pid), signal.SIGKILL)\n                killed = True\n"
        "            except OSError:\n                pass\n    return killed",
        "def exit_now():\n    sys.exit(0)",
    ]
    return [(c, None) for c in code]


def sandbox_contains() -> str:
    """Empty where the machine lets the grader build the sandbox; otherwise why not."""
    _, status = probe(TOY, ["/bin/true"], max_processes=64)
    return "" if status.get("namespaces") and status.get("control_group") else json.dumps(status)


class Listener:
    """A TCP port on this machine's loopback that records every connection."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def marked_processes() -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if MARKER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def hostile_batch(tmp_path_factory):
    why = sandbox_contains()
    # As root (CI, the grader container) the sandbox must be there: no skipping.
    assert not (why and os.geteuid() == 0), why
    if why:
        pytest.skip(f"this machine does not let the grader build the sandbox: {why}")
    course = load_course(TOY / "course.yaml")
    groups_before = control_groups()
    folder = tmp_path_factory.mktemp("hostile")
    out, submissions = folder / "out", folder / "submissions"
    submissions.mkdir()
    listener = Listener()
    nbformat.write(toy_notebook(HONEST, lab="hostile"), submissions / "victim.ipynb")
    # The victim is graded first; its results are what the hostile one will try to overwrite.
    grade_batch(course, discover(course, [submissions / "victim.ipynb"], None), out, progress=False)
    victim_before = (out / "victim" / RESULTS_FILE).read_bytes()
    nbformat.write(toy_notebook(hostile_cells(course.root, out, listener.port), lab="hostile"),
                   submissions / "hostile.ipynb")
    nbformat.write(toy_notebook(HONEST, lab="hostile"), submissions / "bystander.ipynb")
    rows = grade_batch(course, discover(course, [submissions / "hostile.ipynb", submissions / "bystander.ipynb"],
                                        None), out, workers=2, progress=False)
    return {"rows": {r["student"]: r for r in rows}, "out": out, "listener": listener, "groups_before": groups_before,
            "victim_before": victim_before,
            "hostile": json.loads((out / "hostile" / RESULTS_FILE).read_text())}


def _score(results, name):
    return next(t["score"] for t in results["tests"] if t["name"] == name)


def test_hostile_submission_scores_only_its_honest_part(hostile_batch):
    results = hostile_batch["hostile"]
    assert _score(results, "test_double") == 3
    assert _score(results, "test_still_graded") == 1, results["tests"]
    assert results["score"] == 4, [(t["name"], t["score"], t["output"][:200]) for t in results["tests"]]


def test_the_batch_around_it_is_intact(hostile_batch):
    assert hostile_batch["rows"]["bystander"]["score"] == 4
    victim = hostile_batch["out"] / "victim" / RESULTS_FILE
    assert victim.read_bytes() == hostile_batch["victim_before"]
    with open(hostile_batch["out"] / GRADEBOOK_FILE, newline="") as handle:
        rows = {row["student"]: row for row in csv.DictReader(handle)}
    assert float(rows["victim"]["score"]) == 4 and float(rows["hostile"]["score"]) == 4


def test_no_connection_left_the_sandbox(hostile_batch):
    assert hostile_batch["listener"].connections == 0


def control_groups() -> set[Path]:
    groups = set()
    for hierarchy in ("", "pids/", "memory/"):
        base = Path("/sys/fs/cgroup") / hierarchy
        groups |= set(base.glob("coursekit-*")) if base.is_dir() else set()
    return groups


def test_nothing_it_started_outlives_it(hostile_batch):
    assert marked_processes() == []
    # The batch's own groups, not those of gradings before it: a group is left behind when the
    # launcher that made it (coursekit-<pid>) is gone.
    made = control_groups() - hostile_batch["groups_before"]
    leftovers = [g for g in made if not Path(f"/proc/{g.name.rsplit('-', 1)[1]}").exists()]
    assert leftovers == [], leftovers


def test_the_loop_at_import_and_the_output_are_cut_short(hostile_batch):
    output = hostile_batch["hostile"]["output"]
    assert "ran past the cell time limit of 5 s" in output
    assert len(json.dumps(hostile_batch["hostile"])) < 2_000_000


def test_results_say_how_the_student_was_contained(hostile_batch):
    extra = hostile_batch["hostile"]["extra_data"]
    assert "namespaces" in extra["sandbox"] and "control group" in extra["sandbox"]
    if os.geteuid() == 0:
        assert extra["student_user"] == "the unprivileged user 'nobody'"


def test_plan_covers_private_folders_and_keeps_what_the_kernel_needs(tmp_path):
    workdir = tmp_path / "student"
    workdir.mkdir()
    plan = sandbox_plan(workdir, TOY, [TOY / "autograder", tmp_path])
    covers = dict((folder, keep) for folder, keep in plan["cover"])
    assert covers[str((TOY / "autograder").resolve())] == []
    assert covers[str(tmp_path.resolve())] == [str(workdir.resolve())]
    assert plan["writable"] == [str(workdir.resolve())]
    assert sys.prefix not in covers
