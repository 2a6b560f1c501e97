"""The grading backends beside the local one.

Docker: the command a submission's container runs under, checked flag by flag, and
the runner driven through a stand-in `docker` (CI has no daemon; docker/'s own script
grades in real containers). Ray: a real two-node cluster on this machine grades the
toy lab as the local runner does, resumes, and turns a broken task into that
submission's failure.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from coursekit import runners
from coursekit.batch import discover, grade_batch
from coursekit.keys import submission_key
from coursekit.results import RESULTS_FILE
from coursekit.config import TestSpec
from coursekit.runners import DockerRunner, Job, LocalRunner, RayRunner, cluster_capacity, docker_command

from .conftest import TOY_CELLS, toy_notebook

# Imports, double() and Affine: three of the toy suite's tests pass, the rest fail fast.
SHORT_CELLS = TOY_CELLS[:3]
WRONG_DOUBLE = ("def double(x):\n    return x * 3", None)


def _job(course, notebook: Path, folder: Path, **limits) -> Job:
    lab = course.lab("toy")
    lab = dataclasses.replace(lab, limits=dataclasses.replace(lab.limits, **limits))
    folder.mkdir(parents=True, exist_ok=True)
    return Job(course, lab, notebook, folder, {"key": "k", "student": "alice"}, threads=4)


def _value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# -- docker ---------------------------------------------------------------------------

def test_docker_command_isolates_the_container(toy_course, tmp_path):
    job = _job(toy_course, tmp_path / "alice.ipynb", tmp_path / "out" / "alice", cpus=2)
    command = docker_command(job, "me/grader:1", "course-grade-1", gpus=False)
    assert command[:3] == ["docker", "run", "--rm"] and _value(command, "--name") == "course-grade-1"
    assert _value(command, "--network") == "none" and "--read-only" in command
    assert _value(command, "--tmpfs").startswith("/tmp:")
    limits = job.lab.limits  # memory_mb 4096, processes 256 in the toy course
    assert _value(command, "--memory") == _value(command, "--memory-swap") == "6144m"
    assert _value(command, "--pids-limit") == "512" and _value(command, "--cpus") == "2"
    assert (limits.memory_mb, limits.processes) == (4096, 256)
    assert _value(command, "--security-opt") == "no-new-privileges" and _value(command, "--cap-drop") == "ALL"
    added = [command[i + 1] for i, arg in enumerate(command) if arg == "--cap-add"]
    assert sorted(added) == sorted(runners.GRADER_CAPABILITIES) == ["CHOWN", "DAC_OVERRIDE", "KILL", "SETGID", "SETUID"]
    assert "OMP_NUM_THREADS=2" in command  # the job's 4 threads, capped at the container's 2 CPUs
    assert "--gpus" not in command
    # The notebook is the only host path inside, read-only; the results come back on stdout.
    assert _value(command, "--mount") == (f"type=bind,source={job.notebook.resolve()},"
                                          f"target={runners.CONTAINER_NOTEBOOK},readonly")
    assert not any(flag in command for flag in ("-v", "--volume", "--privileged", "--user"))
    assert str(job.folder) not in " ".join(command)
    # The image's entrypoint (`course`) is replaced; the worker gets the paths as the container sees them.
    assert _value(command, "--entrypoint") == "sh"
    image = command.index("me/grader:1")
    assert command[image + 1:image + 4] == ["-c", runners.CONTAINER_SCRIPT, "sh"]
    in_container = (runners.IMAGE_COURSE_YAML, runners.CONTAINER_NOTEBOOK, runners.CONTAINER_OUT)
    assert command[image + 4:] == [*runners.WORKER_MODULE, *job.worker_args(*in_container)]


def test_docker_command_asks_for_gpus_only_on_cuda(toy_course, tmp_path):
    job = _job(toy_course, tmp_path / "alice.ipynb", tmp_path / "out")
    command = docker_command(job, "img", "n", gpus=True)
    assert _value(command, "--gpus") == "all" and command.index("--gpus") < command.index("img")


def test_docker_mount_quotes_a_comma_in_the_path(toy_course, tmp_path):
    # Learning platforms name downloads after students: "Smith, Jo/lab.ipynb".
    job = _job(toy_course, tmp_path / "Smith, Jo" / "lab.ipynb", tmp_path / "out")
    mount = _value(docker_command(job, "img", "n", gpus=False), "--mount")
    assert mount == f'type=bind,"source={tmp_path}/Smith, Jo/lab.ipynb",target={runners.CONTAINER_NOTEBOOK},readonly'


FAKE_DOCKER = """\
#!{python}
# Stands in for the docker client: records its arguments; tells the key of the course its
# image holds; `run` writes a tar of results to stdout, as the grader container does, or
# hangs until `kill` names it.
import io, json, os, pathlib, signal, sys, tarfile, time
state = pathlib.Path(os.environ["FAKE_DOCKER_STATE"])
with open(state / "calls", "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "kill":
    os.kill(int((state / sys.argv[2]).read_text()), signal.SIGKILL)
    sys.exit(0)
if sys.argv[sys.argv.index("--entrypoint") + 1] == "python":
    print(os.environ["FAKE_DOCKER_IMAGE_KEY"])
    sys.exit(0)
(state / sys.argv[sys.argv.index("--name") + 1]).write_text(str(os.getpid()))
if os.environ.get("FAKE_DOCKER_HANG"):
    time.sleep(120)
print("the worker's output", file=sys.stderr)
archive = io.BytesIO()
with tarfile.open(fileobj=archive, mode="w") as tar:
    for name, text in (("results.json", '{{"score": 1.5}}'), ("feedback.html", "<p>ok</p>"), ("other", "x")):
        info = tarfile.TarInfo("./" + name)
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text.encode()))
sys.stdout.buffer.write(archive.getvalue())
sys.exit(int(os.environ.get("FAKE_DOCKER_STATUS", "0")))
"""


class FakeDocker:
    def __init__(self, state: Path, monkeypatch):
        self.state, self.monkeypatch = state, monkeypatch

    def image_holds(self, job: Job) -> None:
        """The image's course is the job's."""
        self.monkeypatch.setenv("FAKE_DOCKER_IMAGE_KEY", submission_key(job.lab, Path(os.devnull)))

    @property
    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in (self.state / "calls").read_text().splitlines()]


@pytest.fixture
def fake_docker(tmp_path, monkeypatch) -> FakeDocker:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable))
    docker.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(state))
    return FakeDocker(state, monkeypatch)


def test_docker_runner_brings_the_results_back(toy_course, tmp_path, fake_docker):
    job = _job(toy_course, tmp_path / "alice.ipynb", tmp_path / "out" / "alice")
    fake_docker.image_holds(job)
    assert DockerRunner("me/grader").run(job) == ""
    assert json.loads((job.folder / RESULTS_FILE).read_text()) == {"score": 1.5}
    assert (job.folder / "feedback.html").read_text() == "<p>ok</p>"
    assert (job.folder / "grader.log").read_text() == "the worker's output\n"
    assert not (job.folder / "other").exists()  # only the worker's known files are taken


def test_docker_runner_refuses_an_image_with_another_course(toy_course, tmp_path, fake_docker):
    job = _job(toy_course, tmp_path / "alice.ipynb", tmp_path / "out")
    fake_docker.image_holds(job)
    edited = dataclasses.replace(job, lab=dataclasses.replace(job.lab, tests={**job.lab.tests, "test_new": TestSpec(5, "visible")}))
    runner = DockerRunner("me/grader")
    for _ in range(2):
        assert "the grader image me/grader holds another version of lab toy" in runner.run(edited)
    calls = fake_docker.calls
    assert len(calls) == 1 and _value(calls[0], "--entrypoint") == "python"  # asked once; nothing graded


@pytest.mark.parametrize("status,message", [(125, "docker could not start a container of me/grader"),
                                            (137, "killed (out of memory?)"), (1, "exited with status 1")])
def test_docker_runner_explains_a_failed_container(toy_course, tmp_path, fake_docker, monkeypatch, status, message):
    monkeypatch.setenv("FAKE_DOCKER_STATUS", str(status))
    job = _job(toy_course, tmp_path / "a.ipynb", tmp_path / "out")
    fake_docker.image_holds(job)
    assert message in DockerRunner("me/grader").run(job)


def test_docker_runner_kills_the_container_past_the_time_limit(toy_course, tmp_path, fake_docker, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_HANG", "1")
    monkeypatch.setattr(runners, "WORKER_GRACE_SECONDS", 0)
    job = _job(toy_course, tmp_path / "a.ipynb", tmp_path / "out", submission_seconds=1)
    fake_docker.image_holds(job)
    assert "time limit" in DockerRunner("me/grader").run(job)
    calls = fake_docker.calls
    assert calls[-1] == ["kill", _value(calls[1], "--name")]
    assert not (job.folder / RESULTS_FILE).exists()


# -- ray ------------------------------------------------------------------------------

def test_cluster_capacity_counts_whole_tasks_per_live_node(toy_course):
    limits = dataclasses.replace(toy_course.lab("toy").limits, cpus=2, gpus=1, memory_mb=6144)  # + 2 GiB: 8 GiB
    wanted = runners.ray_resources(limits)
    assert wanted == {"num_cpus": 2, "num_gpus": 1, "memory": 8 * 2**30}
    nodes = [{"Alive": True, "Resources": {"CPU": 16, "GPU": 4, "memory": 30 * 2**30}},  # memory-bound: 3
             {"Alive": True, "Resources": {"CPU": 64, "memory": 500 * 2**30}},  # no GPU: 0
             {"Alive": False, "Resources": {"CPU": 8, "GPU": 8, "memory": 64 * 2**30}},
             {"Alive": True, "Resources": {"CPU": 3, "GPU": 2, "memory": 64 * 2**30}}]  # CPU-bound: 1
    assert cluster_capacity(nodes, wanted) == 4
    assert cluster_capacity(nodes, runners.ray_resources(dataclasses.replace(limits, gpus=0))) == 3 + 32 + 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a second node, one CPU each, on loopback. Each says it has 8 GiB of
    memory, whatever the machine has: a toy submission asks for 6 GiB (memory_mb
    4096 and the grader's share), so each node takes one at a time."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    # Short: Ray's Unix sockets live under it, and their paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    # The object store holds only a few notebooks and results: 100 MB spares a small CI machine's memory.
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--memory", str(8 * 2**30),
            "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # Connecting sets PYTHONBREAKPOINT and RAY_CLIENT_MODE and a SIGTERM handler in this
    # process; the tests after these get them back as they were.
    saved_env, saved_sigterm = dict(os.environ), signal.getsignal(signal.SIGTERM)
    try:
        for command in ([ray_cli, "start", "--head", "--port", str(port), "--include-dashboard=false",
                         "--ray-client-server-port", str(_free_port()), "--temp-dir", temp_dir, *node],
                        [ray_cli, "start", "--address", f"127.0.0.1:{port}", *node]):
            started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
            assert started.returncode == 0, started.stdout + started.stderr
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved_env)
        signal.signal(signal.SIGTERM, saved_sigterm)
        # Every Ray node of this machine: `ray stop` knows no other scope.
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, check=False, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_graded(ray_cluster, toy_course, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    (folder / "submissions").mkdir()
    for name, cells in (("alice", SHORT_CELLS), ("bob", [SHORT_CELLS[0], WRONG_DOUBLE, SHORT_CELLS[2]])):
        nbformat.write(toy_notebook(cells), folder / "submissions" / f"{name}.ipynb")
    submissions = discover(toy_course, [folder / "submissions"], None)
    runner = RayRunner(ray_cluster)
    rows = grade_batch(toy_course, submissions, folder / "ray", workers=2, progress=False, runner=runner)
    return runner, submissions, rows, folder


def test_ray_grades_as_the_local_runner_does(ray_graded, toy_course):
    _, submissions, rows, folder = ray_graded
    local = grade_batch(toy_course, submissions, folder / "local", workers=2, progress=False, runner=LocalRunner())
    assert [(r["student"], r["score"], r["problem"]) for r in rows] == \
        [(r["student"], r["score"], r["problem"]) for r in local] == [("alice", 6.0, ""), ("bob", 3.0, "")]
    for name in ("alice", "bob"):
        ray_tests = json.loads((folder / "ray" / name / RESULTS_FILE).read_text())["tests"]
        local_tests = json.loads((folder / "local" / name / RESULTS_FILE).read_text())["tests"]
        assert [(t["name"], t["score"]) for t in ray_tests] == [(t["name"], t["score"]) for t in local_tests]
        assert (folder / "ray" / name / "feedback.html").read_text().startswith("<!doctype html>")
    # Both nodes graded, one submission each: each takes one at a time.
    logs = [(folder / "ray" / name / "grader.log").read_text().splitlines()[0] for name in ("alice", "bob")]
    assert all(line.startswith("graded on Ray node ") for line in logs) and logs[0] != logs[1]


def test_a_node_keeps_no_grader_processes_once_its_task_is_done(ray_graded):
    """Ray keeps its worker processes for later tasks: a task's zygote and forge end with the task."""
    from tests.test_orphans import parent, processes

    left = [pid for pid in processes("coursekit.zygote") | processes("coursekit.forge\0serve")
            if b"ray" in Path(f"/proc/{parent(pid)}/cmdline").read_bytes().lower()
            or b"ray" in Path(f"/proc/{parent(parent(pid))}/cmdline").read_bytes().lower()]
    assert not left, f"grader processes left in Ray's workers: {left}"


def test_ray_batch_resumes_without_regrading(ray_graded, toy_course):
    runner, submissions, rows, folder = ray_graded
    before = {name: (folder / "ray" / name / RESULTS_FILE).stat().st_mtime_ns for name in ("alice", "bob")}
    again = grade_batch(toy_course, submissions, folder / "ray", workers=2, progress=False, runner=runner)
    assert again == rows
    assert {name: (folder / "ray" / name / RESULTS_FILE).stat().st_mtime_ns for name in before} == before


def test_a_node_with_another_course_refuses_to_grade(ray_graded, toy_course, tmp_path):
    runner, submissions, _, _ = ray_graded
    job = _job(toy_course, submissions[0].notebook, tmp_path / "out")  # its key "k" names no real suite
    assert "another version of the course" in runner.run(job)
    assert not (tmp_path / "out" / RESULTS_FILE).exists()
    elsewhere = RayRunner("unused: already connected", course_root_on_nodes=tmp_path / "nowhere")
    problem = elsewhere.run(job)
    assert "has no usable course" in problem and "file not found" in problem


def test_a_failed_task_fails_only_its_submission(ray_graded, toy_course, tmp_path):
    import ray

    _, submissions, _, _ = ray_graded

    def crash(*args):  # defined here, so Ray ships it by value: the node need not import the tests
        os._exit(9)

    broken = RayRunner("unused: already connected")
    broken._task = ray.remote(max_retries=0)(crash)
    rows = grade_batch(toy_course, submissions, tmp_path / "out", workers=2, progress=False, runner=broken)
    for row in rows:
        assert row["score"] == 0 and "its Ray task failed (WorkerCrashedError)" in row["problem"], row
        assert "The worker died" in (tmp_path / "out" / row["student"] / "grader.log").read_text()
