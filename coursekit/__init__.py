"""The course's grading engine: configuration, release, the isolated student
process and the proxy the hidden suites use, batch grading and checks."""

__version__ = "0.2.0"
