"""The student's process seen from the grader, without pytest in between."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from coursekit.notebook import Cell
from coursekit.proxy import Student
from coursekit.kernel import StudentKernel
from coursekit.session import (_RUNTIME_BOOT, GradingSession, StudentTimeout, make_workdir,
                               student_environment)


@pytest.fixture
def session():
    workdir = make_workdir()
    s = GradingSession([Cell(1, "import torch")], workdir, student_environment(Path("data"), workdir), 300)
    s.ensure_running()
    yield s
    s.close()


def test_printing_gigabytes_reaches_the_grader_as_a_megabyte():
    workdir = make_workdir()
    kernel = StudentKernel(str(workdir), student_environment(Path("data"), workdir))
    try:
        kernel.start()
        kernel.execute(_RUNTIME_BOOT, timeout=120)
        result = kernel.execute("print('x' * 50_000_000)", timeout=120)
    finally:
        kernel.shutdown()
    received = len(result.output) + result.output_dropped
    assert 2**20 <= received < 2 * 2**20, f"the grader received {received} characters of output"


def test_the_student_process_has_its_own_environment(session):
    student = Student(session)
    env = student.lib("os.environ.copy")()
    assert env["HOME"] == str(session.workdir) and "COURSE_DATA_DIR" in env
    assert not any(k.startswith(("PYTEST", "COURSE_YAML")) for k in env)


def test_tf32_is_off_in_the_student_process_whatever_the_image_says(monkeypatch):
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")  # as NGC images may set it
    workdir = make_workdir()
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
