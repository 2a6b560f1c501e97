"""What the student's process can do to a test, as exceptions the suites and the
plugin catch: the student's own exception (re-raised with its builtin type), a name
the notebook does not define, a call past its deadline, a process that died."""
from __future__ import annotations


class StudentError(Exception):
    """An exception raised by the student's code, re-raised in the grader."""

    def __init__(self, type_name: str, message: str, traceback: str):
        super().__init__(message)
        self.type_name = type_name
        self.message = message
        self.student_traceback = traceback

    def __str__(self) -> str:
        head = f"{self.type_name}: {self.message}" if self.message else self.type_name
        return f"{head}\n{self.student_traceback}" if self.student_traceback else head


class MissingName(AssertionError):
    """The notebook does not define a name the tests need."""


class StudentTimeout(AssertionError):
    """A call into the student's code ran past the time limit."""


class StudentCrashed(AssertionError):
    """The student's process died or could not be (re)started."""
