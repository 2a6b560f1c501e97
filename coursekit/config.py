"""course.yaml: loaded once, validated on load, every error naming the key."""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

DEVICE_POLICIES = ("cpu", "cuda", "auto")
VISIBILITIES = ("visible", "hidden", "after_due_date", "after_published")
LIMIT_KEYS = ("test_seconds", "submission_seconds", "cell_seconds", "memory_mb", "processes", "cpus", "gpus")
# One notebook cell, while the notebook runs before the tests: a cell that loops at
# import is stopped at this limit and the cells after it still run.
DEFAULT_CELL_SECONDS = 300
DEFAULT_GRADER_IMAGE = "nlp-course/grader"
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    test_seconds: float
    submission_seconds: float
    cell_seconds: float
    memory_mb: int
    processes: int
    cpus: float
    gpus: float
    reference_cell_seconds: float | None = None   # the reference's slowest graded cell, measured


@dataclass(frozen=True)
class TestSpec:
    points: float
    visibility: str
    timeout: float | None = None
    reference_seconds: float | None = None        # what the reference needs for this test, measured
    # Students may run it before submitting (`course validate`, from the copy `course release`
    # writes under public/); not part of a submission's key (coursekit.keys): it changes no grade.
    public: bool = False


@dataclass(frozen=True)
class LatePolicy:
    """What late work costs: `percent_per_day` of the score per day past the due date (a
    started day counts as a day), at most `max_percent`; past `cutoff`, all of it."""
    percent_per_day: float = 0.0
    max_percent: float = 100.0
    cutoff: dt.datetime | None = None


@dataclass(frozen=True)
class Lab:
    id: str
    title: str
    notebook: str
    limits: Limits
    tests: dict[str, TestSpec]
    settings: dict[str, Any]
    root: Path
    due: dt.datetime | None = None
    late: LatePolicy | None = None
    extensions: dict[str, float] = field(default_factory=dict)   # student id: days added to due (and cutoff)
    preload: tuple[str, ...] = ()   # modules its student processes import before the notebook runs

    @property
    def max_score(self) -> float:
        return sum(t.points for t in self.tests.values())

    def notebook_in(self, folder: str) -> Path:
        """The lab's notebook under source/, release/ or solutions/."""
        return self.root / folder / self.id / self.notebook

    @property
    def suite_dir(self) -> Path:
        return self.root / "autograder" / self.id

    @property
    def public_dir(self) -> Path:
        """What students may see of the suite (coursekit.public): its graded names, its public tests."""
        return self.root / "public" / self.id

    @property
    def public_tests(self) -> list[str]:
        return [name for name, spec in self.tests.items() if spec.public]


@dataclass(frozen=True)
class Course:
    course_id: str
    title: str
    image_base: str
    image_grader: str
    device: str
    labs: dict[str, Lab]
    root: Path
    path: Path = field(repr=False)
    sandbox: bool = True            # namespaces, read-only file system, control groups (coursekit.sandbox)
    student_user: str = "nobody"    # who the student's code runs as when the grader is root

    def lab(self, lab_id: str) -> Lab:
        try:
            return self.labs[lab_id]
        except KeyError:
            raise ConfigError(
                f"no lab {lab_id!r} in {self.path}; the labs are: {', '.join(self.labs)}") from None

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


TIMINGS_FILE = "reference-timings.json"
LIMIT_FACTOR = 20      # a derived limit is this many times what the reference needs...
LIMIT_FLOOR = 30       # ...and never under this many seconds


def derived_limit(seconds: float) -> float:
    """LIMIT_FACTOR x the reference, at least LIMIT_FLOOR, rounded up to 10 s so that the
    noise of one measurement against the next rarely moves it (a moved limit regrades)."""
    return float(max(LIMIT_FLOOR, math.ceil(LIMIT_FACTOR * seconds / 10) * 10))


def default_course_path() -> Path:
    """COURSE_YAML, else the course.yaml of the repository this package sits in,
    else ./course.yaml."""
    if os.environ.get("COURSE_YAML"):
        return Path(os.environ["COURSE_YAML"])
    beside = Path(__file__).resolve().parent.parent / "course.yaml"
    return beside if beside.exists() else Path("course.yaml")


def load_course(path: Path | str | None = None) -> Course:
    path = Path(path) if path else default_course_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (run `course` from the course repository "
                          "or set COURSE_YAML)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return _Validator(path).course(data)


class _Validator:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, expected: str, got: Any) -> None:
        raise ConfigError(f"{self.path}: {key}: expected {expected}, got {got!r}")

    def mapping(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            self.fail(key, "a mapping", value)
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "a non-empty string", value)
        return value

    def number(self, value: Any, key: str, positive: bool = True) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0) or value < 0:
            self.fail(key, "a positive number" if positive else "a number >= 0", value)
        return value

    def choice(self, value: Any, key: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            self.fail(key, "one of " + ", ".join(choices), value)
        return value

    def unknown(self, data: dict, key: str, allowed: tuple[str, ...]) -> None:
        extra = sorted(set(data) - set(allowed))
        if extra:
            raise ConfigError(f"{self.path}: {key}: unknown key {extra[0]!r} (allowed: {', '.join(allowed)})")

    def course(self, data: Any) -> Course:
        data = self.mapping(data, "(top level)")
        self.unknown(data, "(top level)", ("course_id", "title", "image", "device", "sandbox", "defaults", "labs",
                                           "extensions"))
        image = self.mapping(data.get("image", {}), "image")
        sandbox = self.mapping(data.get("sandbox", {}), "sandbox")
        self.unknown(sandbox, "sandbox", ("enabled", "student_user"))
        if not isinstance(sandbox.get("enabled", True), bool):
            self.fail("sandbox.enabled", "true or false", sandbox["enabled"])
        defaults = self.mapping(data.get("defaults", {}), "defaults")
        self.unknown(defaults, "defaults", ("limits", "visibility"))
        device = self.choice(data.get("device", "auto"), "device", DEVICE_POLICIES)
        default_limits = self.limits(defaults.get("limits"), "defaults.limits", None, device)
        default_visibility = self.choice(defaults.get("visibility", "visible"), "defaults.visibility", VISIBILITIES)
        labs_data = data.get("labs")
        if not isinstance(labs_data, list) or not labs_data:
            self.fail("labs", "a non-empty list of labs", labs_data)
        root = self.path.resolve().parent
        labs: dict[str, Lab] = {}
        for i, lab_data in enumerate(labs_data):
            lab = self.lab(lab_data, f"labs[{i}]", default_limits, default_visibility, root)
            if lab.id in labs:
                raise ConfigError(f"{self.path}: labs[{i}].id: {lab.id!r} is used twice")
            labs[lab.id] = lab
        labs = self.extensions(data.get("extensions", {}), labs)
        return Course(
            course_id=self.text(data.get("course_id"), "course_id"),
            title=self.text(data.get("title"), "title"),
            image_base=self.text(image.get("base"), "image.base"),
            image_grader=self.text(image.get("grader", DEFAULT_GRADER_IMAGE), "image.grader"),
            device=device, labs=labs, root=root, path=self.path, sandbox=sandbox.get("enabled", True),
            student_user=self.text(sandbox.get("student_user", "nobody"), "sandbox.student_user"),
        )

    def limits(self, data: Any, key: str, base: Limits | None, device: str = "auto") -> Limits:
        data = self.mapping(data if data is not None else {}, key)
        self.unknown(data, key, LIMIT_KEYS)
        # The optional limits. cpus and gpus are what a submission asks of the machine that
        # grades it (a container's CPU quota, a Ray task's resources): a course that always
        # grades on CUDA needs a GPU per submission unless it says otherwise.
        values = {"cpus": 1, "gpus": 1 if device == "cuda" else 0, "cell_seconds": DEFAULT_CELL_SECONDS}
        for name in LIMIT_KEYS:
            if name in data:
                values[name] = self.number(data[name], f"{key}.{name}", positive=name != "gpus")
            elif base is not None:
                values[name] = getattr(base, name)
            elif name not in values:
                self.fail(f"{key}.{name}", "a positive number", None)
        return Limits(**values)

    def lab(self, data: Any, key: str, limits: Limits, visibility: str, root: Path) -> Lab:
        data = self.mapping(data, key)
        self.unknown(data, key, ("id", "title", "notebook", "limits", "tests", "settings", "visibility", "due", "late",
                                 "preload"))
        lab_id = self.text(data.get("id"), f"{key}.id")
        if "/" in lab_id or lab_id.startswith("."):
            self.fail(f"{key}.id", "a folder name", lab_id)
        notebook = self.text(data.get("notebook"), f"{key}.notebook")
        if not notebook.endswith(".ipynb"):
            self.fail(f"{key}.notebook", "a .ipynb file name", notebook)
        visibility = self.choice(data.get("visibility", visibility), f"{key}.visibility", VISIBILITIES)
        due = self.when(data.get("due"), f"{key}.due")
        tests = {}
        for name, spec in self.mapping(data.get("tests", {}), f"{key}.tests").items():
            tests[name] = self.test(spec, f"{key}.tests.{name}", visibility)
        return Lab(
            id=lab_id, title=self.text(data.get("title"), f"{key}.title"), notebook=notebook,
            **self.measured(self.limits(data.get("limits"), f"{key}.limits", limits), tests, root / "autograder" / lab_id,
                            set(data.get("limits") or {}), f"{key}"),
            settings=self.mapping(data.get("settings", {}), f"{key}.settings"), root=root,
            due=due, late=self.late(data.get("late"), f"{key}.late", due),
            preload=self.module_names(data.get("preload", []), f"{key}.preload"),
        )

    def module_names(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and _MODULE.fullmatch(v) for v in value):
            self.fail(key, "a list of module names (torch.fx.experimental.symbolic_shapes)", value)
        return tuple(value)

    def late(self, data: Any, key: str, due: dt.datetime | None) -> LatePolicy | None:
        if data is None:
            return None
        data = self.mapping(data, key)
        self.unknown(data, key, ("percent_per_day", "max_percent", "cutoff"))
        if "percent_per_day" not in data and "cutoff" not in data:
            self.fail(key, "percent_per_day and/or cutoff", data)
        if due is None:
            raise ConfigError(f"{self.path}: {key}: a late policy needs the lab's due date (add `due:` to the lab)")
        policy = LatePolicy(
            percent_per_day=self.number(data.get("percent_per_day", 0), f"{key}.percent_per_day", positive=False),
            max_percent=self.number(data.get("max_percent", 100), f"{key}.max_percent", positive=False),
            cutoff=self.when(data.get("cutoff"), f"{key}.cutoff"))
        if policy.max_percent > 100:
            self.fail(f"{key}.max_percent", "a percentage of the score, 0 to 100", policy.max_percent)
        if policy.cutoff is not None and policy.cutoff <= due:
            raise ConfigError(f"{self.path}: {key}.cutoff: {policy.cutoff.isoformat()} is not after the lab's due "
                              f"date {due.isoformat()}; late work is accepted until the cutoff, so it must come later")
        return policy

    def extensions(self, data: Any, labs: dict[str, Lab]) -> dict[str, Lab]:
        """extensions: {student: {lab: days}}, kept on each lab (its due date and cutoff
        move by that many days for that student)."""
        granted: dict[str, dict[str, float]] = {lab_id: {} for lab_id in labs}
        for student, per_lab in self.mapping(data, "extensions").items():
            key = f"extensions.{student}"
            for lab_id, days in self.mapping(per_lab, key).items():
                if lab_id not in labs:
                    raise ConfigError(f"{self.path}: {key}.{lab_id}: no such lab; the labs are: {', '.join(labs)}")
                if labs[lab_id].due is None:
                    raise ConfigError(f"{self.path}: {key}.{lab_id}: lab {lab_id} has no due date to extend "
                                      "(add `due:` to the lab, or remove the extension)")
                granted[lab_id][str(student)] = self.number(days, f"{key}.{lab_id}")
        return {lab_id: replace(lab, extensions=granted[lab_id]) for lab_id, lab in labs.items()}

    def measured(self, limits: Limits, tests: dict[str, TestSpec], suite_dir: Path, explicit: set[str],
                 key: str) -> dict:
        """Limits that fit the lab: `course check` records what the reference needs
        (TIMINGS_FILE beside the suite); a cell or test limit the lab does not set itself
        is derived from it. Without the file, the course's defaults apply."""
        path = suite_dir / TIMINGS_FILE
        if not path.exists():
            return {"limits": limits, "tests": tests}
        try:
            timings = json.loads(path.read_text(encoding="utf-8"))
            cell = float(timings["slowest_cell_seconds"])
            per_test = {str(k): float(v) for k, v in timings["tests"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{path}: not a timings file `course check` wrote ({key}); delete it and "
                              "run `course check` again") from None
        limits = replace(limits, reference_cell_seconds=cell,
                         cell_seconds=limits.cell_seconds if "cell_seconds" in explicit else derived_limit(cell))
        tests = {name: replace(spec, reference_seconds=per_test.get(name),
                               timeout=spec.timeout or (derived_limit(per_test[name]) if name in per_test
                                                        and "test_seconds" not in explicit else None))
                 for name, spec in tests.items()}
        return {"limits": limits, "tests": tests}

    def when(self, value: Any, key: str) -> dt.datetime | None:
        """A due date: YAML timestamps, read as UTC when they name no zone; a date alone
        (quoted or not) is the end of that day."""
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = (dt.date.fromisoformat(value) if len(value) == len("2026-12-01")
                         else dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
            except ValueError:
                self.fail(key, "a date and time such as 2026-12-01T23:59:00Z", value)
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime.combine(value, dt.time(23, 59, 59))
        if not isinstance(value, dt.datetime):
            self.fail(key, "a date and time such as 2026-12-01T23:59:00Z", value)
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)

    def test(self, spec: Any, key: str, visibility: str) -> TestSpec:
        if not isinstance(spec, dict):
            return TestSpec(points=self.number(spec, key, positive=False), visibility=visibility)
        self.unknown(spec, key, ("points", "visibility", "timeout", "public"))
        timeout = spec.get("timeout")
        public = spec.get("public", False)
        if not isinstance(public, bool):
            self.fail(f"{key}.public", "true or false (true: students may run this test before submitting, "
                      "with `course validate`)", public)
        visibility = self.choice(spec.get("visibility", visibility), f"{key}.visibility", VISIBILITIES)
        if public and visibility == "hidden":
            raise ConfigError(f"{self.path}: {key}: a public test cannot have visibility 'hidden': students "
                              "run it before submitting; drop one of the two")
        return TestSpec(
            points=self.number(spec.get("points"), f"{key}.points", positive=False),
            visibility=visibility,
            timeout=None if timeout is None else self.number(timeout, f"{key}.timeout"),
            public=public,
        )
