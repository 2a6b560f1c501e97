"""nbgrader's configuration for this course directory, derived from course.yaml so
that labs, notebooks and points are listed in one place only. Used when an
instructor runs nbgrader's own tools here (formgrader, autograde, export)."""
from pathlib import Path

from coursekit.config import load_course
from coursekit.release import nbgrader_config

root = Path(__file__).resolve().parent
c = get_config()  # noqa: F821 - provided by nbgrader when it loads this file
c.merge(nbgrader_config(load_course(root / "course.yaml"), root))
