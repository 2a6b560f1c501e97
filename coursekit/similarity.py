"""``course similarity OUT --lab LAB``: which of a lab's graded submissions share too much code.

Every pair of the lab's submissions in a results folder is compared on the code the grader
runs (the notebook's graded code cells), with copydetect's MOSS-style fingerprints: the code is
tokenized as Python and every name, string and comment normalised away, so renamed variables
and reformatting hide nothing, and the cells are fingerprinted apart, so their order does not
matter either. The code the lab's release notebook already holds (imports, stubs,
docstrings, self-checks) is subtracted first: only what students wrote counts.

Submissions are untrusted: their notebooks are only read, as text.
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from coursekit.config import Lab
from coursekit.export import graded_results
from coursekit.notebook import SubmissionError, graded_cells, nbformat, read_notebook  # nbformat: see notebook.py

if TYPE_CHECKING:
    import numpy as np
    from copydetect import CodeFingerprint

# A pair is flagged when this fraction of either student's own code is found in the other's.
# On lab 01 two honest full-marks answers share 20-26% (the short idioms every answer
# writes); a copy renamed, reformatted and with its cells reordered, 100% (README).
DEFAULT_THRESHOLD = 0.5
# copydetect's defaults: a match counts from 25 characters of normalised code (about a line),
# and every k-gram is a fingerprint (a winnowing window of 1), so no match is left to chance.
NOISE_CHARACTERS = 25
WINDOW = 1
# Written between cells: a line the tokenizer keeps as 34 characters, the same in every
# notebook, the release's included (so subtracted). Longer than a k-gram, it leaves no
# fingerprint spanning two cells: moving cells around changes no fingerprint.
CELL_BREAK = "pass; pass; pass; pass; pass; pass; pass\n"


class SimilarityError(ValueError):
    pass


@dataclass(frozen=True)
class GradedCode:
    text: str                                  # the graded cells, each between two CELL_BREAKs
    cells: tuple[tuple[int, int, int], ...]    # (cell number, start, end) of each cell in text


@dataclass(frozen=True)
class StudentCode:
    student: str
    notebook: Path
    code: GradedCode
    fingerprint: CodeFingerprint


@dataclass(frozen=True)
class Match:
    first: StudentCode
    second: StudentCode
    shares: tuple[float, float]      # of each one's own code, the fraction also in the other's
    tokens: int                      # normalised tokens they share
    regions: tuple[np.ndarray, np.ndarray]   # each one's shared code: (2, n) start and end offsets

    @property
    def similarity(self) -> float:
        return max(self.shares)


@dataclass(frozen=True)
class Comparison:
    lab: Lab
    threshold: float
    compared: list[StudentCode]
    unreadable: list[tuple[str, str]]   # (student, why their notebook could not be compared)
    flagged: list[Match]                 # most similar first

    @property
    def pairs(self) -> int:
        n = len(self.compared)
        return n * (n - 1) // 2


def compare_lab(lab: Lab, out: Path, threshold: float = DEFAULT_THRESHOLD,
                progress: bool = True) -> Comparison:
    if not 0 < threshold <= 1:
        raise SimilarityError(f"--threshold {threshold:g}: give a fraction above 0 and at most 1 "
                              "(0.5 flags pairs that share half of either one's code)")
    everything = graded_results(out)
    graded = [g for g in everything if g.results.lab == lab.id]
    if not graded:
        found = sorted({g.results.lab for g in everything})
        raise SimilarityError(f"{out}: no results of lab {lab.id} ({lab.title}) in this folder, only of "
                              f"{', '.join(found)}: pass one of those with --lab, or the --out folder "
                              f"`course grade` wrote {lab.id}'s results to")
    provided, boilerplate = _release(lab)
    compared, unreadable = [], []
    for g in tqdm(graded, desc="reading", unit="nb", disable=not progress, file=sys.stderr):
        try:
            notebook, code = _submitted_code(g.results.extra, provided)
        except SubmissionError as exc:
            unreadable.append((g.student, str(exc)))
            continue
        compared.append(StudentCode(g.student, notebook, code, fingerprint(code.text, boilerplate)))
    flagged = _flag_pairs(compared, threshold, progress)
    return Comparison(lab, threshold, compared, unreadable, flagged)


def graded_code(nb: nbformat.NotebookNode, provided: frozenset[str] = frozenset()) -> GradedCode:
    """The code cells the grader runs, in the notebook's order, each between two CELL_BREAKs,
    less those exactly as the release notebook has them (`provided`): all their fingerprints
    would be subtracted anyway, and not tokenizing them is most of the time saved."""
    text, cells = CELL_BREAK, []
    for cell in graded_cells(nb):
        if cell.source in provided:
            continue
        cells.append((cell.number, len(text), len(text) + len(cell.source)))
        text += cell.source + "\n" + CELL_BREAK
    return GradedCode(text, tuple(cells))


def fingerprint(code: str, boilerplate: frozenset[int] = frozenset()) -> CodeFingerprint:
    """The fingerprints of this code, less those of the boilerplate. Subtracted here rather than
    through CodeFingerprint(boilerplate=...), whose removal (numpy's intersect1d with
    assume_unique, on hashes that repeat) also drops repeats of the student's own fingerprints."""
    from copydetect.utils import get_token_coverage

    whole = _fingerprint(code)
    # As Python ints, not numpy's: the set intersection each pair costs runs twice as fast.
    whole.hash_idx = {int(h): idx for h, idx in whole.hash_idx.items() if int(h) not in boilerplate}
    whole.hashes = set(whole.hash_idx)
    whole.token_coverage = get_token_coverage(whole.hash_idx, whole.k, len(whole.filtered_code))
    return whole


def _fingerprint(code: str) -> CodeFingerprint:
    # Imported here: copydetect loads matplotlib.pyplot, which only this command needs.
    from copydetect import CodeFingerprint

    return CodeFingerprint("notebook.py", NOISE_CHARACTERS, WINDOW, language="python", fp=io.StringIO(code))


def _release(lab: Lab) -> tuple[frozenset[str], frozenset[int]]:
    """The graded cells the lab hands out, and their fingerprints."""
    release = lab.notebook_in("release")
    try:
        nb = read_notebook(release)
    except (SubmissionError, OSError) as exc:
        raise SimilarityError(f"{release}: the lab's release notebook cannot be read ({exc}); "
                              f"`course release {lab.id}` writes it") from None
    provided = frozenset(cell.source for cell in graded_cells(nb))
    return provided, frozenset(int(h) for h in _fingerprint(graded_code(nb).text).hashes)


def _submitted_code(extra: dict, provided: frozenset[str]) -> tuple[Path, GradedCode]:
    """The submitted notebook, as `course grade` recorded it in results.json (relative to where
    it ran, for results written before it recorded absolute paths), and its graded code."""
    recorded = extra.get("notebook")
    if not isinstance(recorded, str) or recorded in ("", "None"):
        raise SubmissionError("its results.json names no notebook (there was none to grade)")
    path = Path(recorded)
    if not path.is_file():
        raise SubmissionError(f"{path}: no such notebook any more (moved or deleted since it was graded?); "
                              "run `course similarity` where `course grade` ran, or regrade it")
    try:
        return path, graded_code(read_notebook(path), provided)
    except (SubmissionError, OSError) as exc:
        raise SubmissionError(f"{path}: {exc}") from None


def _flag_pairs(codes: list[StudentCode], threshold: float, progress: bool) -> list[Match]:
    from copydetect import compare_files

    flagged = []
    total = len(codes) * (len(codes) - 1) // 2
    with tqdm(total=total, desc="comparing", unit="pair", disable=not progress, file=sys.stderr) as bar:
        for i, first in enumerate(codes):
            for second in codes[i + 1:]:
                # Two notebooks of one student are versions, not copies.
                if first.student != second.student:
                    tokens, shares, regions = compare_files(first.fingerprint, second.fingerprint)
                    if max(shares) >= threshold:
                        flagged.append(Match(first, second, (float(shares[0]), float(shares[1])), int(tokens),
                                             regions))
            bar.update(len(codes) - 1 - i)
    return sorted(flagged, key=lambda m: (-m.similarity, m.first.student, m.second.student))
