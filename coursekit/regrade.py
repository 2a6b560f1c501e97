"""Regrades that explain themselves: why a submission is graded again (which part of
its key changed since its results were written), the results it had before (kept
under its folder's history/, never overwritten), and how its score moved, test by
test (OUT/regrade-<time>.csv and a table on the terminal)."""
from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

from coursekit.results import RESULTS_FILE, Results, write_atomic
from coursekit.tables import text_table

HISTORY_DIR = "history"
REPORT_PREFIX = "regrade-"
# What each part of the key (coursekit.keys.key_parts) changing means.
REASONS = {"submission": "submission changed", "suite": "suite changed", "points": "points changed",
           "limits": "limits changed", "visibility": "visibility changed", "engine": "engine changed",
           "only": "tests selected (--only) changed"}
NEW, UNCHANGED, FORCED = "new", "unchanged", "forced (--force)"
SHOWN_DETAILS = 3


def now_stamp() -> str:
    """The regrade's time, in the names of its report and of the results it kept."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def why_graded(folder: Path, previous: Results | None, key: str, parts: dict, force: bool) -> list[str]:
    """Why this submission is graded now; [UNCHANGED] when its results still hold."""
    if previous is None:
        return ["its results.json is unreadable"] if (folder / RESULTS_FILE).exists() else [NEW]
    if previous.key == key:
        return [FORCED] if force else [UNCHANGED]
    if not previous.key:
        return ["its last grading failed"]
    before = previous.extra.get("key_parts")
    if not isinstance(before, dict):
        return ["graded by an engine that did not record its key's parts"]
    reasons = [_reason(name, before.get(name), now) for name, now in parts.items() if before.get(name) != now]
    return reasons or ["its key changed"]


def _reason(part: str, before, now) -> str:
    """"points changed (test_a 3 -> 5)": the entries of a mapping that moved."""
    reason = REASONS.get(part, f"{part} changed")
    if isinstance(before, dict) and isinstance(now, dict):
        moved = [f"{name} {_value(before.get(name))} -> {_value(now.get(name))}"
                 for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
        more = f", {len(moved) - SHOWN_DETAILS} more" if len(moved) > SHOWN_DETAILS else ""
        reason += f" ({', '.join(moved[:SHOWN_DETAILS])}{more})" if moved else ""
    elif part == "engine":
        reason += f" ({before} -> {now})"
    return reason


def _value(value) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def keep_previous(folder: Path, stamp: str) -> Path | None:
    """Copy the results about to be replaced to history/<stamp>-results.json (never
    overwriting an earlier copy); None when there were none."""
    try:
        text = (folder / RESULTS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    target = unique_path(folder / HISTORY_DIR / f"{stamp}-{RESULTS_FILE}")
    write_atomic(target, text)
    return target


def unique_path(path: Path) -> Path:
    """`path`, or `path` with -2, -3, ... before its suffix where it is taken."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


@dataclass(frozen=True)
class ScoreChange:
    """One regraded submission: its results before and after, and why it was regraded."""
    student: str
    lab: str
    reasons: tuple[str, ...]
    before: Results
    after: Results
    kept: Path | None      # where the results before are kept

    @property
    def change(self) -> float:
        return round(self.after.score - self.before.score, 4)

    def moved_tests(self) -> list[str]:
        """"test_a 3 -> 5" for every test whose score (or presence) changed."""
        before = {t.name: t.score for t in self.before.tests}
        after = {t.name: t.score for t in self.after.tests}
        return [f"{name} {_value(before.get(name))} -> {_value(after.get(name))}"
                for name in [*before, *(n for n in after if n not in before)] if before.get(name) != after.get(name)]


REPORT_COLUMNS = ["student", "lab", "reason", "score_before", "score_after", "change", "max_before", "max_after",
                  "tests", "problem", "previous_results"]


def write_report(path: Path, changes: list[ScoreChange]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(REPORT_COLUMNS)
    for c in changes:
        writer.writerow([c.student, c.lab, "; ".join(c.reasons), f"{c.before.score:g}", f"{c.after.score:g}",
                         f"{c.change:+g}", f"{c.before.max_score:g}", f"{c.after.max_score:g}",
                         "; ".join(c.moved_tests()), c.after.problem, str(c.kept or "")])
    write_atomic(path, buffer.getvalue())


def format_changes(changes: list[ScoreChange], report: Path) -> str:
    """The students whose score moved, for the terminal."""
    moved = [c for c in changes if c.change or c.moved_tests()]
    lines = [f"Regraded {len(changes)} submission(s) graded before; {len(moved)} moved (report: {report})."]
    if moved:
        rows = [(c.student, c.lab, f"{c.before.score:g} -> {c.after.score:g}", f"{c.change:+g}",
                 "; ".join(c.reasons)[:60], "; ".join(c.moved_tests())[:80]) for c in moved]
        lines.append(text_table(("student", "lab", "score", "change", "reason", "tests"), rows))
    return "\n".join(lines)


def format_plan(plan: list[tuple[str, str, list[str]]]) -> str:
    """`course grade --dry-run`: (student, lab, reasons) per submission."""
    body = [(student, lab, "; ".join(reasons)) for student, lab, reasons in plan]
    graded = sum(reasons != [UNCHANGED] for _, _, reasons in plan)
    return text_table(("student", "lab", "would grade because"), body) + \
        f"\n\n{graded} of {len(plan)} submission(s) would be graded (dry run: nothing was graded)."
