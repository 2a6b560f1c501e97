"""Scores and the files that hold them: results.json in Gradescope's schema, the
batch's grades.csv, all written atomically so an interrupted run never leaves a
half-written file behind."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from coursekit.config import Lab
from coursekit.outcomes import CaseOutcome, SessionLog

RESULTS_FILE = "results.json"
FEEDBACK_FILE = "feedback.html"
GRADEBOOK_FILE = "grades.csv"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_submission(folder: Path, lab: Lab, results: dict) -> None:
    """results.json, then the student's feedback.html made from it."""
    from coursekit.feedback import render

    write_atomic(folder / FEEDBACK_FILE, render(results, f"{lab.title}: your results", lab.due))
    write_atomic(folder / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def read_results(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def score_tests(lab: Lab, outcomes: list[CaseOutcome], hints: dict[str, str] | None = None) -> list[dict]:
    """One Gradescope test per test function; its cases share its points. A failed
    test gets the instructor's hint for it, if the source notebook has one."""
    tests = []
    for name, spec in lab.tests.items():
        cases = [o for o in outcomes if o.function == name]
        passed = sum(o.passed for o in cases)
        score = spec.points * passed / len(cases) if cases else 0.0
        failures = [f"[{o.case}] {o.message}" if o.case else o.message for o in cases if not o.passed]
        if not cases:
            failures = ["This test did not run."]
        output = f"{passed}/{len(cases)} cases passed" if len(cases) > 1 else ""
        if failures:
            output = "\n".join([output, *failures]).strip()
            if (hints or {}).get(name):
                output += f"\nHint: {hints[name]}"
        tests.append({
            "name": name,
            "extra_data": {"seconds": round(sum(o.seconds for o in cases), 3)},
            "score": round(score, 4),
            "max_score": spec.points,
            "status": "passed" if cases and passed == len(cases) else "failed",
            "output": output,
            "visibility": spec.visibility,
        })
    return tests


def build_results(lab: Lab, outcomes: list[CaseOutcome], log: SessionLog | None, seconds: float,
                  extra: dict, problem: str = "", hints: dict[str, str] | None = None) -> dict:
    tests = score_tests(lab, outcomes, hints)
    lines = [line for line in (problem, extra.get("note", "")) if line]
    if log is not None:
        lines += [f"Your notebook's {e.describe()}\n{e.traceback}" for e in log.cell_errors]
        if log.restarts:
            lines.append(f"Your notebook's process was restarted {log.restarts} time(s) after it hung or crashed.")
    unscored = sorted({o.function for o in outcomes} - set(lab.tests))
    tests_seconds = sum(o.seconds for o in outcomes)
    timing = {"total": round(seconds, 2)}
    if log is not None:
        # Case seconds exclude the waits for the kernel's start and the notebook's run (the plugin).
        timing.update(startup=round(log.startup_seconds, 2), notebook=round(log.notebook_seconds, 2),
                      tests=round(tests_seconds, 2), slowest_cell=round(log.slowest_cell_seconds, 2))
    return {
        "score": round(sum(t["score"] for t in tests), 4),
        "execution_time": round(seconds, 2),
        "output": "\n\n".join(lines),
        "tests": tests,
        "extra_data": {"lab": lab.id, "max_score": lab.max_score, "unscored_tests": unscored,
                       "problem": problem, "seconds": timing, **extra},
    }


def failed_results(lab: Lab, message: str, seconds: float, extra: dict) -> dict:
    """The results of a submission that could not be graded at all."""
    return build_results(lab, [], None, seconds, extra, problem=message)


def write_gradebook(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["student", "lab", "score", "max_score", "percent", "problem"])
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_atomic(path, buffer.getvalue())
