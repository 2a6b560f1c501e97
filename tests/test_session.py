"""The student's process seen from the grader, without pytest in between."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coursekit.notebook import Cell
from coursekit.proxy import Student
from coursekit.session import GradingSession, make_workdir, student_environment


@pytest.fixture
def session():
    workdir = make_workdir()
    s = GradingSession([Cell(1, "import torch")], workdir, student_environment(Path("data"), workdir), 300)
    s.ensure_running()
    yield s
    s.close()


def test_printing_gigabytes_reaches_the_grader_as_a_megabyte(session):
    result = session.kernel.execute("print('x' * 50_000_000)", timeout=120)
    received = len(result.output) + result.output_dropped
    assert received < 2 * 2**20, f"the grader received {received} characters of output"


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


def test_large_arguments_cross_intact_through_a_file(session):
    student = Student(session)
    big = torch.randn(20_000, 50)  # 4 MB: over the inline limit, so it travels as a file
    back = student.lib("torch.clone")(big)
    assert torch.equal(back, big)
    assert not list(session.workdir.glob(".request-*")), "the request file was not removed"
