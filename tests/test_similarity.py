"""`course similarity`: copied notebooks of a lab are flagged, honest ones are not.

The check reads a results folder and the notebooks its results.json files name, never the
grades themselves, so the batch here is written directly as results (coursekit.results):
no notebook is graded. The honest answers are lab 01's reference solution and an independent
full-marks one (tests/fixtures/similarity/attention_independent.py); the copy is that
independent answer renamed, reformatted and with its cells reordered."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from coursekit.cli import main
from coursekit.config import load_course
from coursekit.results import Results, save_submission
from coursekit.similarity import compare_lab, fingerprint, graded_code

FIXTURES = Path(__file__).parent / "fixtures" / "similarity"
LAB = "01_attention"


def answer_cells(path: Path) -> dict[str, str]:
    """A fixture's "# %% grade_id" blocks: the student's version of each solution cell."""
    blocks = re.split(r"^# %% (\S+)\n", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {grade_id: source.strip() + "\n" for grade_id, source in zip(blocks[1::2], blocks[2::2])}


def answered(lab, cells: dict[str, str]) -> nbformat.NotebookNode:
    """The lab's release notebook with its solution cells answered as `cells` says."""
    nb = nbformat.read(lab.notebook_in("release"), as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in cells:
            cell.source = cells[grade_id]
    return nb


def reordered(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The same cells, code cells in reverse order: a copier moving cells around."""
    backwards = iter([c for c in nb.cells if c.cell_type == "code"][::-1])
    nb.cells = [next(backwards) if c.cell_type == "code" else c for c in nb.cells]
    return nb


@pytest.fixture(scope="module")
def course():
    return load_course()


@pytest.fixture(scope="module")
def batch(course, tmp_path_factory):
    """A graded batch of lab 01, as `course grade --out` leaves it: OUT/<student>/results.json
    naming each student's notebook."""
    lab = course.lab(LAB)
    root = tmp_path_factory.mktemp("similarity")
    independent = answer_cells(FIXTURES / "attention_independent.py")
    notebooks = {
        "alice": nbformat.read(lab.notebook_in("solutions"), as_version=4),   # the reference answer
        "bob": answered(lab, independent),                                   # an independent answer
        "eve": reordered(answered(lab, answer_cells(FIXTURES / "attention_disguised.py"))),  # bob's, disguised
        "carol": nbformat.read(lab.notebook_in("release"), as_version=4),     # handed in untouched
        "dave": nbformat.read(lab.notebook_in("release"), as_version=4),      # the same
    }
    out = root / "out"
    for student, nb in notebooks.items():
        path = root / "submitted" / f"{student}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        _graded(out, lab, student, path)
    _graded(out, lab, "mallory", root / "submitted" / "mallory.ipynb")    # moved away since grading
    (root / "submitted" / "frank.ipynb").write_text("{not json", encoding="utf-8")
    _graded(out, lab, "frank", root / "submitted" / "frank.ipynb")        # a damaged file
    return out


def _graded(out: Path, lab, student: str, notebook: Path) -> None:
    save_submission(out / student, lab, Results(lab.id, 0.0, lab.max_score, [],
                                                extra={"student": student, "notebook": str(notebook)}))


@pytest.fixture(scope="module")
def comparison(course, batch):
    return compare_lab(course.lab(LAB), batch, progress=False)


def pair(match) -> set[str]:
    return {match.first.student, match.second.student}


def test_only_the_copied_pair_is_flagged(comparison):
    assert sorted(c.student for c in comparison.compared) == ["alice", "bob", "carol", "dave", "eve"]
    assert comparison.pairs == 10
    assert [pair(m) for m in comparison.flagged] == [{"bob", "eve"}]
    assert comparison.flagged[0].similarity > 0.9


def test_honest_answers_share_little_once_the_release_code_is_subtracted(course, batch):
    everything = compare_lab(course.lab(LAB), batch, threshold=1e-9, progress=False)
    shares = {frozenset(pair(m)): m.similarity for m in everything.flagged}
    assert shares[frozenset({"alice", "bob"})] < 0.3 and shares[frozenset({"alice", "eve"})] < 0.3
    # Two untouched release notebooks are identical, yet share nothing the students wrote.
    assert frozenset({"carol", "dave"}) not in shares


def test_renaming_reformatting_and_reordering_hide_nothing(course):
    lab = course.lab(LAB)
    independent = answer_cells(FIXTURES / "attention_independent.py")
    ours = fingerprint(graded_code(answered(lab, independent)).text)
    moved = fingerprint(graded_code(reordered(answered(lab, independent))).text)
    assert ours.filtered_code != moved.filtered_code and ours.hashes == moved.hashes


def test_unreadable_notebooks_are_listed_not_fatal(comparison):
    unreadable = dict(comparison.unreadable)
    assert sorted(unreadable) == ["frank", "mallory"]
    assert "mallory.ipynb: no such notebook" in unreadable["mallory"]
    assert "frank.ipynb: frank.ipynb is not valid JSON" in unreadable["frank"]


def test_the_command_prints_the_pairs_and_writes_a_side_by_side_page(batch, capsys):
    assert main(["similarity", str(batch), "--lab", LAB]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"bob\s+eve\s+\d+%\s+\d+%", printed), printed
    assert "alice" not in printed.split("not compared")[0].split("threshold")[1]
    assert "mallory" in printed and "frank" in printed
    page = (batch / f"similarity-{LAB}.html").read_text(encoding="utf-8")
    assert page.count("<mark>") > 5 and "bob" in page and "eve" in page
    assert "<script" not in page and "http" not in page     # offline, self-contained
    assert "cell 10" in page


def test_a_folder_without_the_labs_results_is_a_clear_error(batch, tmp_path, capsys):
    assert main(["similarity", str(batch), "--lab", "02_transformer_block"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("course: ") and "no results of lab 02_transformer_block" in err and LAB in err
    assert main(["similarity", str(tmp_path), "--lab", LAB]) == 2
    assert "no graded submissions" in capsys.readouterr().err


def test_a_threshold_outside_0_1_is_refused(batch, capsys):
    assert main(["similarity", str(batch), "--lab", LAB, "--threshold", "50"]) == 2
    assert "--threshold 50" in capsys.readouterr().err
