"""Grading many submissions: find them, grade each in its own worker process,
several at a time, skip what an earlier run already graded, and write the
gradebook.

A submission is keyed on its content, its lab and the lab's suite, so a rerun
after an interruption regrades only what is missing or what changed; what a
regrade replaces is kept (coursekit.regrade), and lateness (coursekit.late) is
assessed again on every run, since extensions change without the work changing.
"""
from __future__ import annotations

import datetime as dt
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from coursekit.config import Course, Lab
from coursekit.keys import key_of, key_parts
from coursekit.late import Lateness, assess, read_timestamp
from coursekit.notebook import SubmissionError, notebook_lab, read_notebook
from coursekit.regrade import UNCHANGED, ScoreChange, keep_previous, now_stamp, why_graded
from coursekit.results import (GRADEBOOK_FILE, RESULTS_FILE, Results, failed_results, read_gradebook, read_results,
                               save_submission, write_gradebook)
from coursekit.runners import Job, LocalRunner, Runner
from coursekit.tables import text_table


@dataclass
class Submission:
    name: str           # its folder under --out: <student>/<lab> in an nbgrader tree, else the notebook's name
    notebook: Path | None
    lab: Lab | None
    problem: str = ""   # why it cannot be graded (no lab, no notebook)
    in_nbgrader_tree: bool = False
    note: str = ""      # graded, but the student should know (zip entries that were refused)
    only: tuple[str, ...] = ()  # grade only these test functions (a check of one part of a suite)
    submitted: dt.datetime | None = None   # when it was handed in (coursekit.late's timestamp files)

    @property
    def student(self) -> str:
        """The student's id, as nbgrader's gradebook and grades.csv know it."""
        return self.name.split("/")[0]


def discover(course: Course, paths: list[Path], lab_id: str | None, unpack_dir: Path | None = None) -> list[Submission]:
    """Notebooks, folders of them, nbgrader submitted/ trees and zip files of
    notebooks. A zip is unpacked under `unpack_dir` (the results folder's
    .unpacked/); an nbgrader assignment folder without a notebook is a submission
    too, so that its student gets a zero with the reason."""
    forced = course.lab(lab_id) if lab_id else None
    found: list[tuple[Path, Path, str, str]] = []   # (base, notebook, note, name)
    empty: list[tuple[str, str, str]] = []      # (student, lab id, problem)
    for path in paths:
        if path.is_dir():
            found += [(path, nb, "", "") for nb in sorted(path.rglob("*.ipynb"))
                      if ".ipynb_checkpoints" not in nb.parts and not (unpack_dir and unpack_dir in nb.parents)]
            empty += _empty_nbgrader_folders(course, path)
            for archive in sorted(path.rglob("*.zip")):
                found += _unpack(archive, path, unpack_dir, empty)
        elif path.suffix == ".zip" and path.is_file():
            found += _unpack(path, path.parent, unpack_dir, empty)
        elif path.exists():
            found.append((path.parent, path, "", ""))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    submissions, names = [], set()

    def unique(name: str) -> str:
        while name in names:
            name += "_"
        names.add(name)
        return name

    for base, notebook, note, name in found:
        tree_name, tree_lab = _name_and_lab(course, base, notebook)
        lab, wrong_lab = _lab_of(course, notebook, tree_lab, forced)
        note = "; ".join(filter(None, (note, wrong_lab)))
        problem = "" if lab else (f"cannot tell which lab {notebook.name} is for (no course metadata, no lab "
                                  "folder, and its name matches no lab's notebook); pass --lab")
        submissions.append(Submission(unique(name or tree_name), notebook, lab, problem,
                                      in_nbgrader_tree=tree_lab is not None, note=note,
                                      submitted=read_timestamp(notebook, tree_lab is not None)))
    for student, lab_id_, problem in empty:
        lab = forced or course.labs.get(lab_id_)
        submissions.append(Submission(unique(student), None, lab, problem, in_nbgrader_tree=lab_id_ in course.labs))
    return submissions


def _empty_nbgrader_folders(course: Course, root: Path) -> list[tuple[str, str, str]]:
    """submitted/<student>/<lab>/ folders with no notebook in them."""
    missing = []
    for submitted in [root] if root.name == "submitted" else sorted(root.rglob("submitted")):
        for folder in sorted(submitted.glob("*/*")):
            if folder.is_dir() and folder.name in course.labs and not any(folder.glob("*.ipynb")):
                expected = course.labs[folder.name].notebook
                missing.append((f"{folder.parent.name}/{folder.name}", folder.name,
                                f"no notebook was found in {folder}: the lab expects {expected}; "
                                "submit the notebook itself (not a copy under another extension)"))
    return missing


def _unpack(archive: Path, base: Path, unpack_dir: Path | None, empty: list) -> list[tuple[Path, Path, str, str]]:
    from coursekit.archive import unpack

    if unpack_dir is None:
        raise ValueError(f"{archive}: zip files can be graded only with a folder to unpack them into")
    stem = "__".join(archive.relative_to(base).with_suffix("").parts)
    into = unpack_dir / stem
    unpacked = unpack(archive, into)
    note = "; ".join(unpacked.problems)
    if not unpacked.notebooks:
        empty.append((stem, "", f"no notebook could be taken from {archive.name}"
                      + (f": {note}" if note else " (it holds no .ipynb file)")))
    # A zip is named after itself; several notebooks in one, after their paths inside it too.
    return [(into, nb, note, stem if len(unpacked.notebooks) == 1 else "")
            for nb in unpacked.notebooks]


def _name_and_lab(course: Course, base: Path, notebook: Path) -> tuple[str, str | None]:
    """nbgrader's submitted/<student>/<lab>/<notebook>.ipynb names the student and
    the lab; any other layout is named by the notebook's path under the folder given."""
    parts = notebook.parts
    if len(parts) >= 4 and parts[-2] in course.labs and "submitted" in parts[:-3]:
        return f"{parts[-3]}/{parts[-2]}", parts[-2]
    relative = notebook.relative_to(base).with_suffix("")
    return "__".join(relative.parts), None


def _lab_of(course: Course, notebook: Path, tree_lab: str | None, forced: Lab | None) -> tuple[Lab | None, str]:
    """The lab to grade against, and a note when the notebook says it is another's.
    --lab wins, then the nbgrader folder it was submitted to, then the notebook's
    own metadata, then its file name."""
    try:
        own = notebook_lab(read_notebook(notebook))
    except (SubmissionError, OSError):
        own = None
    lab = forced or course.labs.get(tree_lab or "") or course.labs.get(own or "") or next(
        (lab for lab in course.labs.values() if lab.notebook == notebook.name), None)
    note = ""
    if lab and own and own != lab.id:
        note = (f"This notebook says it belongs to lab {own!r}, but it was submitted for {lab.id!r} "
                f"({lab.title}) and was graded as that lab: did you submit the wrong notebook?")
    return lab, note


@dataclass
class Planned:
    """A submission, and why a run grades it (or [UNCHANGED]: its results still hold)."""
    sub: Submission
    key: str
    parts: dict
    previous: Results | None
    reasons: list[str]


def plan_batch(submissions: list[Submission], out: Path, force: bool = False) -> list[Planned]:
    """What a run over `out` would grade and why, reading only (`course grade --dry-run`)."""
    plans = []
    for sub in submissions:
        folder = out / sub.name
        previous = read_results(folder / RESULTS_FILE)
        if sub.problem:
            plans.append(Planned(sub, "", {}, previous, [f"cannot be graded, scores 0: {sub.problem}"]))
            continue
        parts = key_parts(sub.lab, sub.notebook, sub.only)
        key = key_of(parts)
        plans.append(Planned(sub, key, parts, previous, why_graded(folder, previous, key, parts, force)))
    return plans


def grade_batch(course: Course, submissions: list[Submission], out: Path, workers: int = 1,
                force: bool = False, progress: bool = True, gradebook: bool = False,
                runner: Runner | None = None, stamp: str | None = None) -> list[dict]:
    """Grade what changed; one gradebook row per submission. A regraded submission's
    row holds its ScoreChange under "regrade"; the results it replaces are kept as
    history/<stamp>-results.json (`stamp`: this run's time by default)."""
    runner = runner or LocalRunner()
    out.mkdir(parents=True, exist_ok=True)
    stamp = stamp or now_stamp()
    rows: dict[str, dict] = {}
    graded: dict[str, Results] = {}   # read or written once per submission, kept for the gradebook and regrades
    todo: list[Planned] = []
    replaced: dict[str, tuple[Planned, Path | None]] = {}   # results a regrade replaces, and where they are kept
    for plan in plan_batch(submissions, out, force):
        sub = plan.sub
        problem = sub.problem or (_unreadable(sub.notebook) if plan.reasons != [UNCHANGED] else "")
        if problem:
            results = _ungradable(sub, problem)
            if results is not None:
                if plan.previous and plan.previous.key:   # a grade about to become a zero
                    replaced[sub.name] = plan, keep_previous(out / sub.name, stamp)
                save_submission(out / sub.name, sub.lab, results)
                graded[sub.name] = results
            rows[sub.name] = _row(sub, results, problem)
        elif plan.reasons == [UNCHANGED]:
            graded[sub.name] = _reassess_lateness(out / sub.name, sub, plan.previous)
            rows[sub.name] = _row(sub, graded[sub.name])
        else:
            kept = keep_previous(out / sub.name, stamp)
            if plan.previous is not None:
                replaced[sub.name] = plan, kept
            todo.append(plan)

    bar = tqdm(total=len(todo), desc="grading", unit="nb", disable=not progress, file=sys.stderr)
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    # What no student's code may see: every result, and every folder submissions came from.
    private = (out.resolve(), *sorted({submissions_root(p.sub.notebook.resolve()) for p in todo}))
    jobs = [(p.sub, _job(course, p, out, threads, private)) for p in todo]
    runner.expect([job for _, job in jobs])
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(_grade_one, runner, sub, job): sub for sub, job in jobs}
            for future in as_completed(futures):
                sub = futures[future]
                graded[sub.name] = future.result()
                rows[sub.name] = _row(sub, graded[sub.name])
                bar.update(1)
                bar.set_postfix_str(sub.name[:30])
    finally:
        bar.close()
        runner.close()
    for name, (plan, kept) in replaced.items():
        rows[name]["regrade"] = ScoreChange(plan.sub.student, plan.sub.lab.id, tuple(plan.reasons), plan.previous,
                                            graded[name], kept)
    ordered = [rows[s.name] for s in submissions]
    write_gradebook(out / GRADEBOOK_FILE, _merge_gradebook(out, ordered))
    if gradebook:
        _record_in_nbgrader(course, [s for s in submissions if s.in_nbgrader_tree and s.lab and s.notebook], graded)
    return ordered


def _reassess_lateness(folder: Path, sub: Submission, results: Results) -> Results:
    """Unchanged work, but an extension, a late policy or a timestamp may have changed:
    its results and feedback follow them without a regrade."""
    late = _late_record(sub)
    if results.extra.get("late") != late:
        results.extra["late"] = late
        save_submission(folder, sub.lab, results)
    return results


def _late_record(sub: Submission) -> dict:
    return assess(sub.lab, sub.student, sub.submitted).to_json()


def _record_in_nbgrader(course: Course, submissions: list[Submission], graded: dict[str, Results]) -> None:
    from coursekit.gradebook import open_gradebook, record, register_lab

    with open_gradebook(course) as book:
        for lab in {s.lab.id: s.lab for s in submissions}.values():
            register_lab(course, lab, book)
        for sub in submissions:
            if sub.name in graded:
                record(course, sub.lab, book, sub.student, sub.notebook, graded[sub.name])


def _job(course: Course, plan: Planned, out: Path, threads: int, private: tuple[Path, ...]) -> Job:
    sub = plan.sub
    # The notebook's path absolute, so that later commands (course similarity) find it from any folder.
    extra = {"key": plan.key, "key_parts": plan.parts, "student": sub.student, "notebook": str(sub.notebook.resolve()),
             "note": sub.note, "late": _late_record(sub)}
    return Job(course, sub.lab, sub.notebook, out / sub.name, extra, threads, sub.only, private)


def _grade_one(runner: Runner, sub: Submission, job: Job) -> Results:
    """Run the worker; whatever happens to it, the submission ends with results."""
    job.folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results_path = job.folder / RESULTS_FILE
    results_path.unlink(missing_ok=True)
    try:
        problem = runner.run(job)
    except Exception as exc:  # a backend's failure is this submission's, never the batch's
        problem = f"the grading backend failed: {type(exc).__name__}: {exc}"
    results = read_results(results_path)
    if results is None:
        # Without its key: the grader failed, not the submission, so a rerun tries again.
        results = failed_results(sub.lab, f"Grading failed: {problem or 'no results were written'}. "
                                 f"The instructor can see {job.folder / 'grader.log'}.",
                                 time.monotonic() - started, {k: v for k, v in job.extra.items() if k != "key"})
        save_submission(job.folder, sub.lab, results)
    return results


def submissions_root(notebook: Path) -> Path:
    """The folder of this submission and its neighbours: an nbgrader tree's
    submitted/, or the notebook's own folder."""
    return next((p for p in notebook.parents if p.name == "submitted"), notebook.parent)


def _ungradable(sub: Submission, problem: str) -> Results | None:
    """A zero with the reason, for the student's feedback when the lab is known."""
    if sub.lab is None:
        return None
    return failed_results(sub.lab, problem, 0.0, {"student": sub.student})


def _unreadable(notebook: Path) -> str:
    """Why a file cannot be graded at all (not a notebook, damaged, too large): found here,
    before a worker is started for it."""
    try:
        read_notebook(notebook)
    except SubmissionError as exc:
        return str(exc)
    return ""


def _row(sub: Submission, results: Results | None, problem: str = "") -> dict:
    """Its grades.csv row: the raw score, the late penalty on top, and what is left of it."""
    score = results.score if results else 0.0
    max_score = results.max_score if results else (sub.lab.max_score if sub.lab else 0.0)
    problem = problem or (results.problem if results else "")
    late = Lateness.from_json(results.extra.get("late") if results else None)
    final = late.final(score)
    return {"student": sub.student, "lab": sub.lab.id if sub.lab else "", "score": score,
            "late_penalty": late.penalty(score), "final_score": final, "max_score": max_score,
            "percent": round(100 * final / max_score, 1) if max_score else 0.0,
            "submitted": late.submitted.isoformat() if late.submitted else "", "days_late": late.days_late,
            "problem": problem}


def _merge_gradebook(out: Path, rows: list[dict]) -> list[dict]:
    """Keep the rows of students graded into the same folder by earlier runs."""
    merged = {(row["student"], row["lab"]): row for row in read_gradebook(out / GRADEBOOK_FILE)}
    for row in rows:
        merged[(row["student"], row["lab"])] = row
    return sorted(merged.values(), key=lambda r: (r["lab"], r["student"]))


def format_table(rows: list[dict]) -> str:
    """Scores after any late penalty, which is named beside them."""
    header = ("student", "lab", "score", "percent", "problem")
    body = [(r["student"], r["lab"], f"{float(r['final_score']):g} / {float(r['max_score']):g}"
             + (f" (raw {float(r['score']):g}, late -{float(r['late_penalty']):g})" if float(r["late_penalty"]) else ""),
             f"{float(r['percent']):.1f}%", r["problem"][:60]) for r in rows]
    return text_table(header, body)
