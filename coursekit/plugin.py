"""The pytest plugin through which a hidden suite grades one submission: it
provides the fixtures, puts each test under its time limit, and records each
test case's outcome with a message meant for the student."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from coursekit import wire
from coursekit.config import Lab
from coursekit.errors import MissingName, StudentCrashed, StudentError, StudentTimeout
from coursekit.oracle_cache import OracleCache
from coursekit.outcomes import MEMORY_ERRORS, CaseOutcome
from coursekit.proxy import Student
from coursekit.runtime import full_float32
from coursekit.session import GradingSession


class GradingPlugin:
    """Registered with pytest.main together with this module, whose fixtures find
    the plugin of the run in the config's stash."""

    def __init__(self, lab: Lab, session: GradingSession, device: str, only: tuple[str, ...] = ()):
        self.lab = lab
        self.session = session
        self.device_name = device
        self.only = set(only)
        self.outcomes: list[CaseOutcome] = []
        self.environment: dict = {}
        self._started: dict[str, float] = {}

    def pytest_configure(self, config: pytest.Config) -> None:
        config.stash[PLUGIN_KEY] = self
        full_float32()  # the oracles, like the student's code
        self.environment = grader_environment(self.device_name)

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if not self.only:
            return
        kept = [item for item in items if _function_name(item) in self.only]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept

    # -- time limits ----------------------------------------------------------------

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        # A case's time is its own: not the kernel's start or the notebook's run it waited for.
        self._started[item.nodeid] = time.monotonic() - self.session.log.wait_seconds
        if time.monotonic() >= self.session.submission_deadline:
            self.session.log.limits_fired["submission_seconds"] += 1
            pytest.fail("not run: the submission's total time limit had already run out", pytrace=False)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        spec = self.lab.tests.get(_function_name(item))
        timeout = spec.timeout if spec is not None and spec.timeout else self.lab.limits.test_seconds
        self.session.test_deadline = time.monotonic() + timeout
        self.session.test_limit = (timeout, spec.reference_seconds if spec is not None else None)
        try:
            yield
        finally:
            self.session.test_deadline = self.session.test_limit = None

    # -- outcomes -------------------------------------------------------------------

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = (yield).get_result()
        # One outcome per case: the call phase, or the setup phase when it failed or skipped.
        if report.when == "call" or (report.when == "setup" and not report.passed):
            now = time.monotonic() - self.session.log.wait_seconds
            seconds = now - self._started.get(item.nodeid, now)
            if report.skipped:
                message = "not run: " + _skip_reason(report)
            elif report.failed:
                message = student_message(call.excinfo)
                if _out_of_memory(call.excinfo):
                    self.session.log.limits_fired["memory"] += 1
            else:
                message = ""
            case = item.callspec.id if hasattr(item, "callspec") else ""
            self.outcomes.append(CaseOutcome(_function_name(item), case, report.passed, message, seconds))


PLUGIN_KEY = pytest.StashKey[GradingPlugin]()


@pytest.fixture(scope="session")
def student(request: pytest.FixtureRequest) -> Student:
    """The proxy to the submission's names. The kernel starts and the notebook runs
    here, in the first test's setup, so that this counts against the submission's
    time limit and not that test's."""
    plugin = request.config.stash[PLUGIN_KEY]
    try:
        plugin.session.ensure_running()
    except StudentCrashed:
        pass  # each test then fails with the reason
    student = Student(plugin.session)
    try:  # what the student's process computes with, for the record (never part of a score)
        plugin.environment["student_tf32"] = student.lib("coursekit.runtime.tf32_state")()
    except Exception as exc:  # noqa: BLE001  a crashed or hostile kernel must not stop grading
        plugin.environment["student_tf32"] = f"unknown ({type(exc).__name__})"
    return student


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """"cpu" or "cuda", from the course's device policy."""
    return request.config.stash[PLUGIN_KEY].device_name


@pytest.fixture(scope="session")
def lab_settings(request: pytest.FixtureRequest) -> dict:
    """The lab's `settings:` mapping in course.yaml."""
    return dict(request.config.stash[PLUGIN_KEY].lab.settings)


@pytest.fixture(scope="session")
def data_dir(request: pytest.FixtureRequest) -> Path:
    """The course's data folder (Tiny Shakespeare, SST-2, ...), as the grader sees it."""
    return request.config.stash[PLUGIN_KEY].lab.root / "data"


@pytest.fixture(scope="session")
def oracle_cache(request: pytest.FixtureRequest) -> OracleCache:
    """Answers of the suite's oracles that are the same for every submission, kept beside
    the suite across submissions and batches (coursekit.oracle_cache)."""
    return OracleCache(request.config.stash[PLUGIN_KEY].lab.suite_dir / ".cache")


def grader_environment(device: str) -> dict:
    """The grader's side of the record: where the oracles ran, and with which numerics."""
    import torch

    from coursekit.runtime import tf32_state

    return {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": str(torch.__version__), "cuda": torch.version.cuda, "grader_tf32": tf32_state()}


def _function_name(item: pytest.Item) -> str:
    return getattr(item, "originalname", None) or item.name


def _out_of_memory(excinfo: pytest.ExceptionInfo | None) -> bool:
    return excinfo is not None and isinstance(excinfo.value, StudentError) and excinfo.value.type_name in MEMORY_ERRORS


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return "skipped"


def student_message(excinfo: pytest.ExceptionInfo | None) -> str:
    """What a student is told about a failed case: never the test's source."""
    if excinfo is None:
        return "failed"
    exc = excinfo.value
    if isinstance(exc, StudentError):
        return f"Your code raised {exc}"
    if isinstance(exc, (MissingName, StudentTimeout, StudentCrashed)):
        return str(exc)
    if isinstance(exc, wire.WireError):
        return f"Your code returned something the grader cannot read: {exc}"
    if isinstance(exc, AssertionError):
        return str(exc) or "a check on your result failed"
    if type(exc).__name__ == "Failed":  # pytest.fail, and pytest.raises that saw nothing
        text = str(exc)
        if text.startswith("DID NOT RAISE"):
            return f"Expected your code to raise {text.removeprefix('DID NOT RAISE').strip()}, it did not"
        return text
    return (f"The check could not run on what your code returned ({type(exc).__name__}: "
            f"{str(exc)[:300]}). Compare your return types and shapes with the contract.")
