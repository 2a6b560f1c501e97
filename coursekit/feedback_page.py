"""feedback.html: the student's page for one graded submission (coursekit.feedback
says what is on it). One self-contained file, readable on a phone: inline CSS, no
script, font or image from anywhere; every text it shows is escaped."""
from __future__ import annotations

import datetime as dt
import re
from html import escape
from typing import TYPE_CHECKING

from coursekit.feedback import (
    NOT_RUN,
    CellProblem,
    Feedback,
    TaskLine,
    TestLine,
    gather,
)

if TYPE_CHECKING:
    from coursekit.results import Results
    from coursekit.tasks import Task

STYLE = """
*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#fff;
-webkit-text-size-adjust:100%}
main{max-width:46rem;margin:0 auto;padding:1rem}
h1{font-size:1.35rem;line-height:1.3;margin:.2rem 0 .6rem}
h2{font-size:1.15rem;margin:1.8rem 0 .5rem;padding-bottom:.2rem;border-bottom:1px solid #d0d7de}
h3{font-size:1rem;margin:0 0 .2rem;overflow-wrap:anywhere}
p,ul{margin:.4rem 0} ul{padding-left:1.2rem}
.score{margin:0;font-size:1.05rem}.score b{font-size:2rem;margin-right:.2rem}
.bar{height:.6rem;background:#e5e7eb;border-radius:.3rem;overflow:hidden;margin:.4rem 0 1rem}
.bar span{display:block;height:100%;background:#1a7f37}
code,pre{font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
code{background:#f3f4f6;padding:0 .2em;border-radius:3px;overflow-wrap:anywhere}
pre{background:#f3f4f6;padding:.6rem;margin:.4rem 0;white-space:pre-wrap;overflow-wrap:anywhere;border-radius:4px}
.badge{display:inline-block;font-size:.8rem;font-weight:600;padding:0 .5em;border-radius:1em;color:#fff;
white-space:nowrap;background:#6e7781}
.passed .badge{background:#1a7f37}.partly .badge{background:#9a6700}.failed .badge{background:#cf222e}
.boxes{list-style:none;padding:0}
.boxes>li,details.problem{border:1px solid #d0d7de;border-radius:6px;margin:.5rem 0}
summary{cursor:pointer;padding:.5rem .7rem}
details[open]>summary{border-bottom:1px solid #d0d7de}
.meta{display:block;font-size:.85rem;color:#57606a}
.task summary code{font-size:12px}
.tests{margin:.3rem .7rem .6rem;padding-left:1rem;font-size:.9rem}
.failure{border-left:4px solid #cf222e;padding:.1rem 0 .1rem .7rem;margin:1.1rem 0}
.hint{background:#fff8c5;border-left:4px solid #d4a72c;padding:.4rem .7rem}
.notice{background:#ffebe9;border-left:4px solid #cf222e;padding:.5rem .8rem;white-space:pre-line}
details.problem pre{margin:0;border-radius:0 0 6px 6px}
small,.muted{color:#57606a}
"""

MARKS = {"passed": "✓ passed", "partly": "◐ partly", "failed": "✗ failed", NOT_RUN: "– not run"}


def render(results: Results, title: str, tasks: list[Task], due: dt.datetime | None = None,
           now: dt.datetime | None = None, published: bool = False) -> str:
    return page(gather(results, title, tasks, due, now, published))


def page(feedback: Feedback) -> str:
    body = "".join([_header(feedback), _tasks(feedback), _failures(feedback), _notebook(feedback), _about(feedback)])
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(feedback.title)}</title><style>{STYLE}</style></head>"
            f"<body><main>{body}</main></body></html>\n")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _points(value: float) -> str:
    return f"{round(value, 2):g}"


def _rich(text: str) -> str:
    """Instructor's text (a task's title): escaped, with `code` spans kept."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def _header(feedback: Feedback) -> str:
    percent = 100 * feedback.score / feedback.max_score if feedback.max_score else 0.0
    notice = f"<p class='notice' role='alert'>{escape(feedback.problem)}</p>" if feedback.problem else ""
    late = f"<p class='late'>{escape(feedback.late)}</p>" if feedback.late else ""
    if feedback.penalty:
        late += (f"<p class='late'>After the late penalty: <b>{_points(feedback.score - feedback.penalty)} / "
                 f"{_points(feedback.max_score)}</b> points.</p>")
    return (f"<h1>{escape(feedback.title)}</h1>"
            f"<p class='score' id='score'><b>{_points(feedback.score)} / {_points(feedback.max_score)}</b> points"
            f" <span class='muted'>({percent:.0f}%)</span></p>"
            f"<div class='bar' aria-hidden='true'><span style='width:{percent:.1f}%'></span></div>{late}{notice}")


def _tasks(feedback: Feedback) -> str:
    items = "".join(_task(task) for task in feedback.tasks)
    return f"<section id='tasks'><h2>Tasks</h2><ul class='boxes'>{items}</ul></section>" if items else ""


def _task(task: TaskLine) -> str:
    passed = sum(t.status == "passed" for t in task.tests)
    tests = "".join(f"<li class='{t.status}'>{_test_link(t)} <span class='muted'>{_points(t.score)} / "
                    f"{_points(t.max_score)}, {escape(t.status)}</span></li>" for t in task.tests)
    return (f"<li class='task {task.status}'><details><summary><span class='badge'>{MARKS[task.status]}</span> "
            f"<b>{_rich(task.title)}</b><span class='meta'>{_points(task.score)} / {_points(task.max_score)} points"
            f" · {passed} of {_count(len(task.tests), 'test')} passed</span></summary>"
            f"<ul class='tests'>{tests}</ul></details></li>")


def _anchor(test: TestLine) -> str:
    return escape(f"test-{test.name}")


def _test_link(test: TestLine) -> str:
    name = f"<code>{escape(test.name)}</code>"
    return f"<a href='#{_anchor(test)}'>{name}</a>" if test.status == "failed" else name


def _failures(feedback: Feedback) -> str:
    failed = feedback.failed
    if not failed:
        ran = any(t.status != NOT_RUN for task in feedback.tasks for t in task.tests)
        text = "Nothing: every test shown here passed." if ran else "No test ran: see why above."
        return f"<section id='failed'><h2>What failed</h2><p>{text}</p></section>"
    articles = "".join(
        f"<article class='failure' id='{_anchor(t)}'><h3><code>{escape(t.name)}</code> "
        f"<span class='muted'>{_points(t.score)} / {_points(t.max_score)}</span></h3>"
        f"<p class='meta'>{_rich(t.task)}</p><pre>{escape(t.details)}</pre>"
        + (f"<p class='hint'><b>Hint:</b> {escape(t.hint)}</p>" if t.hint else "") + "</article>"
        for t in failed)
    return f"<section id='failed'><h2>What failed ({len(failed)})</h2>{articles}</section>"


def _notebook(feedback: Feedback) -> str:
    if not feedback.cell_problems and not feedback.restarts:
        return ""
    intro = ("<p>When the grader ran your notebook from top to bottom, these cells raised an error. "
             "Open one to see its traceback.</p>" if feedback.cell_problems else "")
    restarts = (f"<p>Your notebook's process was restarted {_count(feedback.restarts, 'time')} after it hung or crashed.</p>"
                if feedback.restarts else "")
    problems = "".join(_cell_problem(p) for p in feedback.cell_problems)
    return (f"<section id='notebook'><h2>Problems in your notebook ({len(feedback.cell_problems)})</h2>"
            f"{intro}{problems}{restarts}</section>")


def _cell_problem(problem: CellProblem) -> str:
    message = f": {escape(problem.message[:300])}" if problem.message.strip() else ""
    at = problem.at
    where = ""
    if at:
        cell = "" if at["cell"] == problem.cell else f"cell #{at['cell']}, "
        code = f": <code>{escape(at['code'])}</code>" if at.get("code") else ""
        where = f"<span class='meta'>at {cell}line {at['line']}{code}</span>"
    return (f"<details class='problem'><summary><b>Cell #{problem.cell}</b> <span class='muted'>"
            f"({escape(problem.first_line)})</span> raised <code>{escape(problem.error)}</code>{message}{where}"
            f"</summary><pre class='traceback'>{escape(problem.traceback or 'No traceback: the grader stopped this cell.')}"
            "</pre></details>")


def _about(feedback: Feedback) -> str:
    seconds = feedback.seconds
    parts = [f"your notebook's cells {seconds['notebook']:.1f} s" if "notebook" in seconds else "",
             f"the hidden tests {seconds['tests']:.1f} s" if "tests" in seconds else ""]
    split = ", ".join(p for p in parts if p)
    lines = [f"Graded in {seconds.get('total', 0.0):.1f} s" + (f" ({split})." if split else ".")]
    by_tag: dict[str, list[str]] = {}
    for cell in feedback.skipped_cells:
        by_tag.setdefault(" and ".join(cell["tags"]), []).append(f"#{cell['cell']}")
    lines += [f"Cells {', '.join(numbers)} (tagged {escape(tag)}) are not run by the grader: they are yours to run "
              "in Jupyter (plots, studies, training), and no test depends on them." for tag, numbers in by_tag.items()]
    if feedback.not_run:
        names = ", ".join(f"<code>{escape(t.name)}</code>" for t in feedback.not_run)
        why = "the instructor graded only some tests" if feedback.only else "the grading stopped before them"
        lines.append(f"Not run in this grading ({why}): {names}; they score 0 here.")
    if feedback.withheld:
        lines.append(f"{_count(feedback.withheld, 'more test')} will be shown later (after the due date or when grades are "
                     "published); the score above counts only the tests shown.")
    items = "".join(f"<li>{line}</li>" for line in lines)
    return f"<section id='about'><h2>About this grading</h2><ul>{items}</ul></section>"
