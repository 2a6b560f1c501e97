"""Where a submission's worker runs.

The batch decides what to grade and keeps the results; a runner only runs one
``python -m coursekit.worker`` for one submission and leaves results.json (and
feedback.html, grader.log) in the submission's folder. The local runner starts the
worker on this machine; the docker runner in a fresh grader container; the Ray
runner on a node of a Ray cluster. The last two bring the worker's files back as
bytes and write them here, so the files are this machine's user's, written
atomically, whatever user or machine graded them.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from coursekit.config import ConfigError, Course, Lab, Limits, load_course
from coursekit.isolation import remove_scratch
from coursekit.keys import submission_key
from coursekit.notebook import lab_imports
from coursekit.preload import library_requests
from coursekit.results import FEEDBACK_FILE, RESULTS_FILE, write_atomic

# Past the submission's own limit, the worker gets this long to write its results
# before it is killed.
WORKER_GRACE_SECONDS = 60
WORKER_MODULE = ["-m", "coursekit.worker"]
LOG_FILE = "grader.log"


@dataclass
class Job:
    """One submission to grade: everything a worker needs, wherever it runs."""
    course: Course
    lab: Lab
    notebook: Path
    folder: Path                  # where results.json, feedback.html and grader.log must end up
    extra: dict = field(default_factory=dict)
    threads: int = 1              # OMP threads for the worker and the student's kernel
    only: tuple[str, ...] = ()    # grade only these test functions (the others score 0, "not run")
    private: tuple[Path, ...] = ()  # the batch's folders no student may see: results, submissions

    @property
    def timeout(self) -> float:
        return self.lab.limits.submission_seconds + WORKER_GRACE_SECONDS

    def worker_args(self, course_yaml: str, notebook: str, out: str) -> list[str]:
        """The worker's arguments (after WORKER_MODULE), with the paths as the place it
        runs sees them."""
        args = ["--course", course_yaml, "--lab", self.lab.id, "--notebook", notebook, "--out", out,
                "--extra", json.dumps(self.extra), "--device", self.course.device]
        return args + [arg for name in self.only for arg in ("--only", name)]


class Runner:
    """Runs the worker of each submission the batch hands it."""

    def run(self, job: Job) -> str:
        """Run the worker for `job`; return "" or why it did not end normally."""
        raise NotImplementedError

    def expect(self, jobs: list[Job]) -> None:
        """The batch is about to hand over these jobs, in this order."""

    def close(self) -> None:
        """The batch is over (or interrupted): release what the runner holds."""


class LocalRunner(Runner):
    """A fresh worker process on this machine per submission, forked by the batch's
    zygote (coursekit.zygote: torch, transformers and the engine imported once) and
    taken from a pool of warm ones: each is forked, and starts the sandboxed kernel of
    the submission it expects, while the submission before it is graded, then serves
    exactly one submission."""

    def __init__(self):
        self._zygote: ZygoteClient | None = None
        self._pool: list[int] = []   # warm workers, oldest first: warmed for the next jobs in order
        self._lock = threading.Lock()
        self._queue: list[Job] = []
        self._given = 0   # jobs handed a worker so far
        self._imports: dict[str, list] = {}   # per lab, what its kernels import: read once per batch

    def expect(self, jobs: list[Job]) -> None:
        self._queue, self._given = list(jobs), 0

    def run(self, job: Job) -> str:
        worker = self._take(job)
        args = job.worker_args(str(job.course.path), str(job.notebook), str(job.folder))
        self._zygote.send(worker, json.dumps({"args": args, "log": str(job.folder / LOG_FILE)}))
        status = self._zygote.wait(worker, timeout=job.timeout)
        if status is None:
            self._zygote.kill(worker)
            self._zygote.wait(worker, timeout=None)
            return "grading ran past the submission's time limit and was stopped"
        if status == ZYGOTE_GONE:
            return "the grader's worker was lost: the process that starts workers (coursekit.zygote) ended while it ran"
        return "" if status == 0 else f"the grader's worker exited with status {status}"

    def _take(self, job: Job) -> int:
        with self._lock:
            if self._zygote is None:
                labs = {j.lab.id: j.lab for j in [job, *self._queue]}
                suites = sorted(str(lab.suite_dir) for lab in labs.values())
                self._imports = {lab_id: student_imports(lab) for lab_id, lab in labs.items()}
                kernel_imports = sorted({pair for pairs in self._imports.values() for pair in pairs}, key=str)
                self._zygote = ZygoteClient(worker_env(job.threads), kernel_imports, suites,
                                            (str(job.course.root), job.course.student_user))
            worker = self._pool.pop(0) if self._pool else self._spawn(job)
            self._given += 1
            upcoming = self._given + len(self._pool)
            if upcoming < len(self._queue):
                self._pool.append(self._spawn(self._queue[upcoming]))  # warming up meanwhile
        return worker

    def _spawn(self, job: Job) -> int:
        """A worker told which submission to expect, so that it starts that one's kernel; a
        worker handed another (workers finishing out of order) starts a fresh one instead."""
        prepare = {"course": str(job.course.path), "lab": job.lab.id, "device": job.course.device,
                   "private": [str(p) for p in job.private], "imports": self._imports[job.lab.id]}
        return self._zygote.spawn(json.dumps({"prepare": prepare}))

    def close(self) -> None:
        """Tell the spare workers there is nothing more to grade, then end the zygote."""
        with self._lock:
            pool, self._pool = self._pool, []
            zygote, self._zygote = self._zygote, None
        if zygote is None:
            return
        for worker in pool:
            zygote.send(worker, "")
        for worker in pool:
            if zygote.wait(worker, timeout=30) is None:
                zygote.kill(worker)
        zygote.close()


def student_imports(lab: Lab) -> list[tuple[str, str | None]]:
    """What a kernel of `lab` imports ahead of its submission: what the lab's notebook imports,
    the library objects its hidden suite builds in the student's process, and the modules
    course.yaml's `preload:` names (those a library imports lazily on first use)."""
    return sorted(set(lab_imports(lab)) | set(library_requests(lab.suite_dir)) | {(m, None) for m in lab.preload},
                  key=str)


class ZygoteClient:
    """The batch's side of coursekit.zygote: ask for workers, hand each its job, learn
    how each ended. Workers are numbered here; their exits come back on a reader thread."""

    def __init__(self, env: dict[str, str], kernel_imports: list, suite_dirs: list[str], student: tuple[str, str]):
        """`student`: the course's root and its student user, whom the zygote probes once for all workers."""
        self._process = subprocess.Popen([sys.executable, "-m", "coursekit.zygote", json.dumps(kernel_imports),
                                          json.dumps(list(student)), *suite_dirs],
                                         stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self._write = threading.Lock()
        self._exited: dict[int, int] = {}
        self._ended = threading.Condition()
        self._next = 0
        self._gone = False   # the zygote itself ended: no worker of it can still exit normally
        threading.Thread(target=self._read_replies, name="zygote-replies", daemon=True).start()

    def spawn(self, first_line: str) -> int:
        with self._write:
            worker, self._next = self._next, self._next + 1
        self._request({"spawn": worker, "line": first_line})
        return worker

    def send(self, worker: int, line: str) -> None:
        self._request({"send": worker, "line": line})

    def kill(self, worker: int) -> None:
        self._request({"kill": worker})

    def wait(self, worker: int, timeout: float | None) -> int | str | None:
        """The worker's exit status, or None if it is still running after `timeout`."""
        with self._ended:
            self._ended.wait_for(lambda: worker in self._exited or self._gone, timeout)
            if worker in self._exited:
                return self._exited[worker]
            return ZYGOTE_GONE if self._gone else None

    def close(self) -> None:
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        remove_scratch(self._process.pid)   # the forge's folder, if the zygote could not remove it

    def _request(self, message: dict) -> None:
        with self._write:
            try:
                self._process.stdin.write((json.dumps(message) + "\n").encode())
                self._process.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass   # the zygote is gone: wait() says so

    def _read_replies(self) -> None:
        for line in self._process.stdout:
            reply = json.loads(line)
            if "exited" in reply:
                with self._ended:
                    self._exited[reply["exited"]] = reply["status"]
                    self._ended.notify_all()
        with self._ended:
            self._gone = True
            self._ended.notify_all()


# What wait() says of a worker whose zygote died before it reported the worker's exit.
ZYGOTE_GONE = "gone"


def worker_env(threads: int) -> dict[str, str]:
    """Each worker and its student's kernel share the cores evenly: torch's default of
    one thread per core, times several workers, makes everything many times slower."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    return env


def _bring_back(folder: Path, files: dict[str, bytes]) -> None:
    """Write a worker's files that came back from elsewhere; results.json last, since
    the batch takes a submission as graded once it exists."""
    for name in sorted(files.keys() & {LOG_FILE, FEEDBACK_FILE, RESULTS_FILE}, key=lambda n: n == RESULTS_FILE):
        write_atomic(folder / name, files[name].decode("utf-8", errors="replace"))


# -- docker ----------------------------------------------------------------------------

# docker/Dockerfile's grader image: where the course is installed in it.
IMAGE_COURSE_YAML = "/opt/course/course.yaml"
CONTAINER_NOTEBOOK = "/submission/submission.ipynb"
# In the container's own /tmp, made root's before the student's code exists, so the
# student can neither write the results nor put anything beside them.
CONTAINER_OUT = "/tmp/results"
# The container's stdout carries only a tar of the results (the worker's output goes to
# stderr, into grader.log): a bind-mounted results folder would get files owned by the
# container's root, mode 0600, that an instructor who is not root could not even read.
CONTAINER_SCRIPT = (f'mkdir -m 700 {CONTAINER_OUT} && python "$@" >&2; status=$?; '
                    f'tar -C {CONTAINER_OUT} -cf - .; exit $status')
# Beside the student's limits, what the grader process itself needs: torch, the
# suite's reference models and its own threads. Its peak on CPU, measured grading the
# solutions of labs 04-06: 358-535 MB; a CUDA context adds about as much again.
GRADER_MEMORY_MB = 2048
GRADER_PROCESSES = 256
# The grader is root in its container only to hand the student's kernel to `nobody`
# (coursekit/isolation.py and sandbox.py) and manage it, and keeps just that:
#   SETUID, SETGID  become `nobody` (setgroups, setgid, setuid) in the kernel's launcher;
#   CHOWN           give the kernel its folder and connection file;
#   DAC_OVERRIDE    write into and clean up that folder once it is `nobody`'s (mode 0700);
#   KILL            signal the kernel's processes (interrupts, kills): they are another user's.
# (Checked in the grader image: without any one of the first four the kernel runs as root,
# which extra_data.student_user then says; without KILL the grader fails.)
# Not FOWNER: the grader only changes the modes of its own files (autograder/ is made
# private when the image is built). Not SYS_ADMIN: the container is already the
# namespaces, read-only file system and control group the sandbox would build, and the
# sandbox says so in results (extra_data.sandbox). The kernel keeps none of these: setuid
# to a non-root user clears them, and no-new-privileges stops setuid binaries giving any back.
GRADER_CAPABILITIES = ("SETUID", "SETGID", "CHOWN", "DAC_OVERRIDE", "KILL")


def docker_command(job: Job, image: str, name: str, gpus: bool) -> list[str]:
    """`docker run` for one submission: nothing of the host but the notebook (read-only),
    no network, a read-only root file system, the lab's limits on the whole container."""
    limits = job.lab.limits
    memory = f"{int(limits.memory_mb + GRADER_MEMORY_MB)}m"
    # More threads than the container's CPU quota only adds contention.
    threads = max(1, min(job.threads, math.ceil(limits.cpus)))
    command = [
        "docker", "run", "--rm", "--name", name, "--init",  # --init reaps what a submission leaves behind
        "--network", "none", "--read-only",
        # exec: torch.compile and Triton load the libraries they build under /tmp.
        "--tmpfs", "/tmp:rw,exec,nosuid,nodev",
        "--memory", memory, "--memory-swap", memory,  # equal: no swap, an over-limit container is killed
        "--pids-limit", str(int(limits.processes + GRADER_PROCESSES)),
        "--cpus", f"{limits.cpus:g}",
        "--security-opt", "no-new-privileges", "--cap-drop", "ALL",
        *(arg for cap in GRADER_CAPABILITIES for arg in ("--cap-add", cap)),
        "--env", "PYTHONUNBUFFERED=1", "--env", f"OMP_NUM_THREADS={threads}",
        "--mount", _bind_mount(job.notebook.resolve(), CONTAINER_NOTEBOOK),
    ]
    if gpus:
        # All of them, as the local runner's worker sees them: a count would give every
        # container the same first GPUs anyway.
        command += ["--gpus", "all"]
    return [*command, "--entrypoint", "sh", image, "-c", CONTAINER_SCRIPT, "sh",
            *WORKER_MODULE, *job.worker_args(IMAGE_COURSE_YAML, CONTAINER_NOTEBOOK, CONTAINER_OUT)]


def _bind_mount(source: Path, target: str) -> str:
    """--mount's value is one CSV record: a comma in a path must be quoted."""
    record = io.StringIO()
    csv.writer(record, lineterminator="").writerow(["type=bind", f"source={source}", f"target={target}", "readonly"])
    return record.getvalue()


# Printed by the image: the key of an empty notebook for a lab, which names the engine's
# version, the lab's tests, points, limits and suite as the image has them.
IMAGE_KEY_SCRIPT = ("import sys; from pathlib import Path; from coursekit.keys import submission_key; "
                    "from coursekit.config import load_course; "
                    "print(submission_key(load_course(sys.argv[1]).lab(sys.argv[2]), Path('/dev/null')))")


class DockerRunner(Runner):
    """A fresh container of the grader image per submission (docker/Dockerfile's grader target)."""

    def __init__(self, image: str):
        if shutil.which("docker") is None:
            raise FileNotFoundError("docker: command not found (--backend docker needs the docker client)")
        self.image = image
        self._image_problems: dict[str, tuple[str, str]] = {}  # lab id: (problem, docker's output)
        self._lock = threading.Lock()

    def run(self, job: Job) -> str:
        problem, output = self._image_problem(job.lab)
        if problem:
            write_atomic(job.folder / LOG_FILE, output)
            return problem
        name = f"course-grade-{uuid.uuid4().hex[:12]}"
        command = docker_command(job, self.image, name, gpus=job.course.resolved_device() == "cuda")
        with open(job.folder / LOG_FILE, "wb") as log:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
            try:
                archive, _ = proc.communicate(timeout=job.timeout)
            except subprocess.TimeoutExpired:
                # Stopping the client would leave the container running.
                subprocess.run(["docker", "kill", name], check=False, capture_output=True, timeout=60)
                proc.communicate()
                return "grading ran past the submission's time limit and its container was stopped"
        _bring_back(job.folder, _untar(archive))
        if proc.returncode == 125:  # docker's own failure: no such image, no daemon, a bad option
            return f"docker could not start a container of {self.image}"
        if proc.returncode == 137:
            return "the grader's container was killed (out of memory?)"
        return "" if proc.returncode == 0 else f"the grader's worker exited with status {proc.returncode}"

    def _image_problem(self, lab: Lab) -> tuple[str, str]:
        """The image grades with its own copy of the course, built from a checkout at some
        point; results are filed under this checkout's key, so the two must be the same
        (a suite or points edited since the image was built would grade silently wrong).
        Asked once per lab."""

        with self._lock:
            if lab.id not in self._image_problems:
                probe = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python",
                                        self.image, "-c", IMAGE_KEY_SCRIPT, IMAGE_COURSE_YAML, lab.id],
                                       capture_output=True, text=True, check=False, timeout=600)
                if probe.returncode != 0:
                    problem = f"docker could not run the grader image {self.image}"
                elif probe.stdout.strip() != submission_key(lab, Path(os.devnull)):
                    problem = (f"the grader image {self.image} holds another version of lab {lab.id} than this "
                               "course (rebuild it: docker/build_and_test.sh)")
                else:
                    problem = ""
                self._image_problems[lab.id] = (problem, probe.stdout + probe.stderr)
            return self._image_problems[lab.id]


def _untar(archive: bytes) -> dict[str, bytes]:
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            return {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except tarfile.TarError:  # the container ended before writing it
        return {}


# -- ray -------------------------------------------------------------------------------

# Past the time limit the node enforces itself, how long the driver waits for the
# task's answer (scheduling, a worker process starting, the files coming back).
RAY_TRANSFER_SECONDS = 60


def ray_resources(limits: Limits) -> dict:
    """What one submission's task asks of the node that runs it."""
    return {"num_cpus": limits.cpus, "num_gpus": limits.gpus,
            "memory": int((limits.memory_mb + GRADER_MEMORY_MB) * 2**20)}


def cluster_capacity(nodes: list[dict], resources: dict) -> int:
    """How many tasks asking for `resources` the live nodes (ray.nodes()) run at once."""
    wanted = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"], "memory": resources["memory"]}
    return sum(min(int(node["Resources"].get(name, 0) // amount) for name, amount in wanted.items() if amount > 0)
               for node in nodes if node.get("Alive"))


class RayRunner(Runner):
    """Each submission is a Ray task on a node with the CPUs, memory and GPUs its lab
    asks for. Nodes share no files with this machine but the course, installed at the
    same path on each (or at `course_root_on_nodes`): the task gets the notebook's bytes
    and hands back the files the worker wrote."""

    def __init__(self, address: str, course_root_on_nodes: Path | None = None):
        try:
            import ray
        except ImportError:
            raise ConfigError("--backend ray needs Ray, an optional part of the course's install: "
                              "pip install -e '.[ray]' (the Makefile does)") from None

        if not ray.is_initialized():
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        self._ray = ray
        # No retries: one would start over inside the same time limit; a failure is the submission's.
        self._task = ray.remote(max_retries=0)(_grade_on_node)
        self.course_root_on_nodes = course_root_on_nodes
        self._slots: dict[tuple, threading.BoundedSemaphore | None] = {}
        self._lock = threading.Lock()

    def run(self, job: Job) -> str:
        resources = ray_resources(job.lab.limits)
        slots = self._slots_for(resources)
        if slots is None:
            return (f"no node of the Ray cluster has {resources['num_cpus']:g} CPUs, {resources['num_gpus']:g} "
                    f"GPUs and {resources['memory'] / 2**30:.1f} GiB of memory for it")
        course_yaml = (self.course_root_on_nodes or job.course.root) / job.course.path.name
        # Waiting for a slot here rather than in Ray's queue keeps the time limit for grading.
        with slots:
            ref = self._task.options(**resources).remote(str(course_yaml), job.lab.id, job.notebook.read_bytes(),
                                                         job.extra)
            try:
                problem, files = self._ray.get(ref, timeout=job.timeout + RAY_TRANSFER_SECONDS)
            except self._ray.exceptions.GetTimeoutError:
                self._ray.cancel(ref, force=True)
                return "grading ran past the submission's time limit and its Ray task was stopped"
            except self._ray.exceptions.RayError as exc:  # a lost node, a crashed worker, the task's own error
                write_atomic(job.folder / LOG_FILE, f"{type(exc).__name__}: {exc}\n")
                return f"its Ray task failed ({type(exc).__name__})"
        _bring_back(job.folder, files)
        return problem

    def _slots_for(self, resources: dict) -> threading.BoundedSemaphore | None:
        """As many slots as the cluster has room for such tasks (none: it cannot run one),
        counted at the first submission that asks for them."""
        key = tuple(sorted(resources.items()))
        with self._lock:
            if key not in self._slots:
                capacity = cluster_capacity(self._ray.nodes(), resources)
                self._slots[key] = threading.BoundedSemaphore(capacity) if capacity else None
            return self._slots[key]


def _grade_on_node(course_yaml: str, lab_id: str, notebook: bytes, extra: dict) -> tuple[str, dict[str, bytes]]:
    """The Ray task: grade with this node's copy of the course, in a folder of its own,
    and hand back what the worker wrote."""
    import ray

    where = f"Ray node {ray.get_runtime_context().get_node_id()[:12]} ({socket.gethostname()})"
    try:
        course = load_course(course_yaml)
        lab = course.lab(lab_id)
    except ConfigError as exc:
        return f"{where} has no usable course: {exc}", {}
    with tempfile.TemporaryDirectory(prefix="course-ray-") as tmp:
        notebook_path, folder = Path(tmp) / "submission.ipynb", Path(tmp) / "out"
        notebook_path.write_bytes(notebook)
        folder.mkdir()
        # The result is filed under the driver's key: grading with another suite, points
        # or limits than the driver's would file a wrong grade as right.
        if submission_key(lab, notebook_path) != extra.get("key"):
            return f"{where} has another version of the course at {course.root} than the machine grading the batch", {}
        # Closed here, not when Ray retires this worker process: its zygote and forge would stay
        # alive (a gigabyte of memory) until then, and a worker killed by Ray leaves their folders.
        runner = LocalRunner()
        try:
            problem = runner.run(Job(course, lab, notebook_path, folder, extra, threads=math.ceil(lab.limits.cpus)))
        finally:
            runner.close()
        files = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    files[LOG_FILE] = f"graded on {where}\n".encode() + files.get(LOG_FILE, b"")
    return problem, files
