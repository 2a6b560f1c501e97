"""Each lab's hidden suite tells right from plausibly wrong: its reference keeps full
marks, its release stub scores 0 without breaking the grader, and every mutant in
mutants/<lab>.py loses points on each test it names (graded on those tests alone).
Every notebook goes through the real engine (worker process, kernel, proxy), all of
one lab's in one batch."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import nbformat
import pytest

from coursekit.batch import Submission, grade_batch
from coursekit.config import load_course
from coursekit.results import RESULTS_FILE, Results, read_results

COURSE = load_course(Path(__file__).resolve().parent.parent / "course.yaml")
REFERENCE = "reference"
STUB = "release-stub"


# The mutants marked always=True run every time; COURSE_ALL_MUTANTS=1 grades them all (each
# mutant is a grading of its own, and CI has two cores).
ALL_MUTANTS = os.environ.get("COURSE_ALL_MUTANTS") == "1"


def _all_mutants(lab_id: str) -> list:
    try:
        return importlib.import_module(f"mutants.{lab_id}").MUTANTS
    except ModuleNotFoundError:
        return []


def _mutants(lab_id: str) -> list:
    mutants = _all_mutants(lab_id)
    return mutants if ALL_MUTANTS else [m for m in mutants if m.always]


CASES = [(lab_id, mutant) for lab_id in COURSE.labs for mutant in _mutants(lab_id)]
LABS = list(COURSE.labs)


@pytest.fixture(scope="session")
def graded(tmp_path_factory):
    """Grade a lab's reference and mutants once, on first use."""
    cache: dict[str, dict[str, Results]] = {}

    def grade(lab_id: str) -> dict[str, Results]:
        if lab_id not in cache:
            lab = COURSE.lab(lab_id)
            folder = tmp_path_factory.mktemp(f"mutants-{lab_id}")
            source = nbformat.read(lab.notebook_in("source"), as_version=4)
            subs = [Submission(REFERENCE, lab.notebook_in("source"), lab),
                    Submission(STUB, lab.notebook_in("release"), lab)]
            for mutant in _mutants(lab_id):
                path = folder / f"{mutant.name}.ipynb"
                nbformat.write(mutant.apply(source), path)
                # Only the tests the mutant names: what it must lose is all this grading proves,
                # and a full grading per mutant would cost CI minutes per lab.
                subs.append(Submission(mutant.name, path, lab, only=tuple(mutant.loses)))
            out = folder / "out"
            grade_batch(COURSE, subs, out, workers=2, progress=False)
            cache[lab_id] = {s.name: read_results(out / s.name / RESULTS_FILE) for s in subs}
        return cache[lab_id]

    return grade


@pytest.mark.parametrize("lab_id", LABS)
def test_release_stub_scores_zero(graded, lab_id):
    results = graded(lab_id)[STUB]
    assert results.problem == "", results.problem
    assert results.score == 0, {t.name: t.score for t in results.tests if t.score}
    assert len(results.tests) == len(COURSE.lab(lab_id).tests)


@pytest.mark.parametrize("lab_id", LABS)
def test_every_lab_has_mutants_that_always_run(lab_id):
    mutants = _all_mutants(lab_id)
    assert any(m.always for m in mutants), f"mutants/{lab_id}.py marks no mutant always=True"
    names = [m.name for m in mutants]
    assert len(names) == len(set(names)), f"mutants/{lab_id}.py names a mutant twice"


@pytest.mark.parametrize("lab_id", LABS)
def test_reference_keeps_full_marks(graded, lab_id):
    results = graded(lab_id)[REFERENCE]
    failing = {t.name: t.output for t in results.tests if t.score != t.max_score}
    assert not failing, f"the reference loses points: {failing}"
    assert results.score == COURSE.lab(lab_id).max_score


@pytest.mark.parametrize("lab_id,mutant", CASES, ids=[f"{lab}-{m.name}" for lab, m in CASES])
def test_mutant_loses_points(graded, lab_id, mutant):
    results = graded(lab_id)[mutant.name]
    assert mutant.loses, f"{mutant.name} names no test that should catch it"
    assert results.problem == "", f"grading the mutant failed: {results.problem}"
    assert results.extra["only_tests"] == sorted(mutant.loses)
    by_name = {t.name: t for t in results.tests}
    for name in mutant.loses:
        assert name in by_name, f"{mutant.name}: no test named {name} in course.yaml"
        # A test that did not run would lose its points for nothing: it must have run and failed.
        assert "This test did not run." not in by_name[name].output, f"{mutant.name}: {name} did not run"
        assert by_name[name].score < by_name[name].max_score, (
            f"{mutant.name} ({mutant.why}) keeps full marks on {name}")
