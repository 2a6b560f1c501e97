"""Broken submissions, graded in one batch: each gets a clear message in its
feedback and a score for what can be graded, and the batch goes on."""
from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import nbformat
import pytest

from coursekit.archive import unpack
from coursekit.batch import discover, grade_batch
from coursekit.results import FEEDBACK_FILE, RESULTS_FILE

from .conftest import TOY_CELLS, toy_notebook

HONEST = [TOY_CELLS[0], TOY_CELLS[1]]   # double(): test_double and test_double_rejects_strings, 4 points
HONEST_SCORE = 4


def _zip(path: Path, members: dict[str, bytes], links: dict[str, str] = {}) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _bomb(path: Path, megabytes: int = 64) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("toy.ipynb", "w", force_zip64=True) as member:
            for _ in range(megabytes):
                member.write(b"\0" * 2**20)
    return path


def _v3_notebook() -> str:
    from nbformat import v3

    cells = [v3.new_code_cell(input=source) for source, _ in HONEST]
    nb = v3.new_notebook(worksheets=[v3.new_worksheet(cells=cells)])
    nb.metadata["course"] = {"lab": "toy"}
    return v3.writes_json(nb)


def _huge_notebook(path: Path, megabytes: int) -> Path:
    nb = toy_notebook(HONEST)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="x" * (megabytes * 2**20))]
    path.write_text(json.dumps(nb))
    return path


@pytest.fixture(scope="module")
def broken_batch(toy_course, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    subs = root / "submissions"
    subs.mkdir()
    honest = nbformat.writes(toy_notebook(HONEST)).encode()
    _zip(subs / "zipped.zip", {"work/toy.ipynb": honest, "../escaped.ipynb": honest,
                               "/etc/absolute.ipynb": honest, ".ipynb_checkpoints/toy-checkpoint.ipynb": honest},
         links={"linked.ipynb": "/etc/passwd"})
    _bomb(subs / "bomb.zip")
    (subs / "old_format.ipynb").write_text(_v3_notebook())
    nbformat.write(toy_notebook([]), subs / "empty.ipynb")
    nbformat.write(toy_notebook([HONEST[0], ("def double(x) return 2 * x", None), HONEST[1]]),
                   subs / "syntax_error.ipynb")
    _huge_notebook(subs / "huge_outputs.ipynb", 150)
    with open(subs / "too_large.ipynb", "wb") as handle:  # sparse: no disk used
        handle.truncate(600 * 2**20)
    tree = root / "submitted"
    (tree / "carol" / "toy").mkdir(parents=True)            # submitted nothing
    (tree / "dave" / "toy").mkdir(parents=True)
    nbformat.write(toy_notebook(HONEST, lab="hostile"), tree / "dave" / "toy" / "toy.ipynb")
    out = root / "out"
    submissions = (discover(toy_course, [subs], "toy", unpack_dir=out / ".unpacked")
                   + discover(toy_course, [tree], None))
    rows = grade_batch(toy_course, submissions, out, workers=2, progress=False)
    return root, out, {row["student"]: row for row in rows}


def _results(out: Path, student: str) -> dict:
    return json.loads((out / student / RESULTS_FILE).read_text())


def test_every_submission_has_a_row(broken_batch):
    _, _, rows = broken_batch
    assert set(rows) == {"zipped", "bomb", "old_format", "empty", "syntax_error", "huge_outputs", "too_large",
                         "carol", "dave"}


def test_a_zip_gives_up_its_notebook_and_nothing_else(broken_batch):
    root, out, rows = broken_batch
    assert rows["zipped"]["score"] == HONEST_SCORE
    output = _results(out, "zipped")["output"]
    assert "'../escaped.ipynb' was not unpacked: its path leads outside" in output
    assert "'/etc/absolute.ipynb' was not unpacked" in output
    assert "'linked.ipynb' was not unpacked: it is a symbolic link" in output
    assert not list(root.rglob("escaped.ipynb")) and not list(out.rglob("linked.ipynb"))


def test_a_zip_bomb_is_refused_with_a_reason(broken_batch):
    _, _, rows = broken_batch
    assert rows["bomb"]["score"] == 0 and "zip bomb" in rows["bomb"]["problem"]


def test_old_nbformat_is_converted_and_graded(broken_batch):
    assert broken_batch[2]["old_format"]["score"] == HONEST_SCORE


def test_an_empty_notebook_scores_zero_and_says_what_is_missing(broken_batch):
    _, out, rows = broken_batch
    assert rows["empty"]["score"] == 0
    assert any("double" in t["output"] for t in _results(out, "empty")["tests"])


def test_a_syntax_error_costs_only_its_cell(broken_batch):
    _, out, rows = broken_batch
    assert rows["syntax_error"]["score"] == HONEST_SCORE
    assert "cell #2" in _results(out, "syntax_error")["output"] and "SyntaxError" in _results(out, "syntax_error")["output"]


def test_hundreds_of_megabytes_of_outputs_are_graded_and_an_oversized_file_is_refused(broken_batch):
    _, out, rows = broken_batch
    assert rows["huge_outputs"]["score"] == HONEST_SCORE
    assert rows["too_large"]["score"] == 0 and "over the 512 MB limit" in rows["too_large"]["problem"]
    assert "clear the outputs" in (out / "too_large" / FEEDBACK_FILE).read_text()


def test_an_nbgrader_folder_without_its_notebook_gets_a_zero_and_feedback(broken_batch):
    _, out, rows = broken_batch
    assert rows["carol"]["score"] == 0 and "no notebook was found" in rows["carol"]["problem"]
    assert "toy.ipynb" in (out / "carol" / "toy" / FEEDBACK_FILE).read_text()


def test_another_labs_notebook_is_graded_as_the_lab_it_was_submitted_for(broken_batch):
    _, out, rows = broken_batch
    assert rows["dave"]["lab"] == "toy" and rows["dave"]["score"] == HONEST_SCORE
    assert "says it belongs to lab 'hostile'" in _results(out, "dave/toy")["output"]


def test_a_zip_that_lies_about_its_sizes_is_cut_off(tmp_path, monkeypatch):
    """The sizes in a zip's directory are the sender's to choose: the bytes written count."""
    import coursekit.archive as archive

    monkeypatch.setattr(archive, "MAX_RATIO", 10**9)        # let the declared sizes through
    monkeypatch.setattr(archive, "MAX_NOTEBOOK_BYTES", 2**20)
    unpacked = unpack(_bomb(tmp_path / "bomb.zip", megabytes=4), tmp_path / "into")
    assert unpacked.notebooks == [] and "more than 1 MB" in unpacked.problems[0]
    assert not (tmp_path / "into" / "toy.ipynb").exists()
