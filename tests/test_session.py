"""The student's process seen from the grader, without pytest in between."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from coursekit.notebook import Cell
from coursekit.proxy import Student
from coursekit.kernel import KernelTimeout, StudentKernel
from coursekit.isolation import sandbox_plan, student_environment
from coursekit.session import _RUNTIME_BOOT, GradingSession, StudentTimeout, make_workdir

from .test_hostile import sandbox_contains


@pytest.fixture
def workdir():
    path = make_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def session(workdir):
    s = GradingSession([Cell(1, "import torch")], workdir, student_environment(Path("data"), workdir), 300)
    s.ensure_running()
    yield s
    s.close()


def test_printing_gigabytes_reaches_the_grader_as_a_megabyte(workdir):
    kernel = StudentKernel(str(workdir), student_environment(Path("data"), workdir))
    try:
        kernel.start()
        kernel.execute(_RUNTIME_BOOT, timeout=120)
        result = kernel.execute("print('x' * 50_000_000)", timeout=120)
    finally:
        kernel.shutdown()
    received = len(result.output) + result.output_dropped
    assert 2**20 <= received < 2 * 2**20, f"the grader received {received} characters of output"


def _kernel_command_and_interrupt() -> str:
    """Start a kernel as grading does, read what its process is, and interrupt a loop in it:
    the kernel must survive the interrupt and go on answering."""
    workdir = make_workdir()
    kernel = StudentKernel(str(workdir), student_environment(Path("data"), workdir))
    try:
        kernel.start()
        command = kernel.execute("print(open('/proc/self/cmdline').read().replace(chr(0), ' '))", timeout=60).output
        # The student's temporary folder, whatever the forge's imports cached (peft asks for it at import).
        made = kernel.execute("import tempfile; print(tempfile.mkdtemp())", timeout=60)
        assert made.status == "ok" and made.output.startswith(str(workdir)), made
        with pytest.raises(KernelTimeout):
            kernel.execute("while True:\n    pass", timeout=2)
        assert kernel.execute("print(6 * 7)", timeout=30).output.strip() == "42"
        return command
    finally:
        kernel.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def _first_numpy_draw() -> str:
    workdir = make_workdir()
    kernel = StudentKernel(str(workdir), student_environment(Path("data"), workdir))
    try:
        kernel.start()
        return kernel.execute("import numpy\nprint(numpy.random.randint(2**62))", timeout=60).output.strip()
    finally:
        kernel.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def test_kernels_are_forked_from_the_forge_and_start_afresh_without_it(tmp_path):
    from coursekit.isolation import use_forge
    from coursekit.zygote import start_forge

    if sandbox_contains():
        pytest.skip("kernels are forked only where the sandbox's namespaces can be built")
    folder = tmp_path / "forge"
    folder.mkdir(mode=0o700)
    forge = start_forge(str(folder), '[["peft", null]]')
    try:
        assert "coursekit.forge serve" in _kernel_command_and_interrupt()
        # Each forked kernel draws its own numbers from numpy's global generator, as a fresh one would.
        draws = [_first_numpy_draw() for _ in range(2)]
        assert draws[0] != draws[1] and all(d.isdigit() for d in draws), draws
        use_forge(str(folder / "gone.sock"))   # a forge that is not there: the kernel starts afresh
        assert "ipykernel_launcher" in _kernel_command_and_interrupt()
    finally:
        use_forge(None)
        forge.kill()
        forge.wait()


def test_sigterm_to_the_launcher_ends_the_kernel_and_its_control_groups(workdir):
    """How the grader ends a kernel: the launcher it started kills the kernel, removes the
    kernel's control groups itself and exits, with nothing left for the grader to clean up."""
    import os
    import signal

    from tests.test_orphans import wait_for

    if sandbox_contains():
        pytest.skip("the launcher builds namespaces and control groups only where the machine allows it")
    plan = sandbox_plan(workdir, Path.cwd(), [], max_processes=64)
    kernel = StudentKernel(str(workdir), student_environment(Path("data"), workdir), plan)
    try:
        kernel.start()
        groups = [Path(g) for g in kernel.sandbox["control_group"].split(",")]
        inside = {int(pid) for g in groups for pid in (g / "cgroup.procs").read_text().split()}
        launcher = kernel.km.provisioner.process
        assert launcher.pid in inside and len(inside) >= 2, inside   # the launcher and the kernel
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=10) is not None

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        assert wait_for(lambda: not any(g.exists() for g in groups), 5), "the launcher left its control groups"
        assert all(gone(pid) for pid in inside - {launcher.pid}), "the kernel outlived its launcher"
    finally:
        kernel.shutdown()


def test_the_student_process_has_its_own_environment(session):
    student = Student(session)
    env = student.lib("os.environ.copy")()
    assert env["HOME"] == str(session.workdir) and "COURSE_DATA_DIR" in env
    assert not any(k.startswith(("PYTEST", "COURSE_YAML")) for k in env)


def test_tf32_is_off_in_the_student_process_whatever_the_image_says(monkeypatch, workdir):
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")  # as NGC images may set it
    s = GradingSession([Cell(1, "import torch")], workdir, student_environment(Path("data"), workdir), 300)
    try:
        student = Student(s)
        env = student.lib("os.environ.copy")()
        assert env["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] == "0" and env["NVIDIA_TF32_OVERRIDE"] == "0"
        assert student.lib("torch.get_float32_matmul_precision")() == "highest"
        assert student.lib("torch.backends.cudnn").allow_tf32 is False
    finally:
        s.close()


def test_handles_keep_identity_and_die_with_a_restart(session):
    student = Student(session)
    linear = student.lib("torch.nn.Linear")(2, 2)
    assert linear.weight.shape == (2, 2) and linear.eval()._id == linear._id
    session.kernel.shutdown()  # as if the student's code had killed its process
    with pytest.raises(AssertionError, match="lost when your notebook's process restarted"):
        linear(torch.ones(2))
    assert student.lib("math.sqrt")(4.0) == 2.0  # the restarted process answers


def test_kept_handles_are_built_once_per_process(session):
    student = Student(session)
    built = []

    def make():
        built.append(session.generation)
        return student.lib("builtins.list").keep([1, 2, 3])

    first = student.kept("numbers", make)
    assert student.kept("numbers", make) is first and len(built) == 1
    session.kernel.shutdown()  # the process restarts: its handles are dead, so it is built again
    again = student.kept("numbers", make)
    assert len(built) == 2 and built[1] > built[0] and again is not first
    assert student.lib("builtins.len")(again) == 3


def test_large_arguments_cross_intact(session):
    student = Student(session)
    big = torch.randn(200_000, 50)  # 40 MB each way
    back = student.lib("torch.clone")(big)
    assert torch.equal(back, big)


def test_the_channel_socket_leaves_no_name_behind(session):
    Student(session).lib("math.sqrt")(4.0)
    assert not list(session.workdir.glob(".channel-*")), "the channel's socket is still reachable by name"


def test_a_hung_call_is_interrupted_at_its_deadline_and_the_process_goes_on(session):
    student = Student(session)
    session.test_deadline = time.monotonic() + 2
    began = time.monotonic()
    with pytest.raises(StudentTimeout):
        student.lib("time.sleep")(600)
    assert time.monotonic() - began < 10
    session.test_deadline = None
    # Interrupted, not killed: the same process answers the next request, its objects intact.
    assert student.lib("math.sqrt")(9.0) == 3.0
    assert session.log.restarts == 0


def test_a_call_that_ignores_interrupts_costs_a_restart_not_the_grading(session):
    student = Student(session)
    session.test_deadline = time.monotonic() + 2
    with pytest.raises(StudentTimeout):
        student.lib("builtins.exec")(
            "import time\nwhile True:\n    try:\n        time.sleep(600)\n    except KeyboardInterrupt:\n        pass",
            {})
    session.test_deadline = None
    assert student.lib("math.sqrt")(16.0) == 4.0
    assert session.log.restarts == 1
