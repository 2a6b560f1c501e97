"""feedback.html: one self-contained page per submission that a student can open.

It is built from results.json alone, which already holds only what a student may
read (messages written for them, never test source or expected values), and it
shows each test as its visibility allows: `hidden` tests never, `after_due_date`
ones only once the lab's due date has passed, `after_published` ones only once the
instructor publishes grades (a page rendered at grading time is before that; Gradescope
shows them itself from results.json).
"""
from __future__ import annotations

import datetime as dt
from html import escape
from typing import TYPE_CHECKING

from coursekit.late import Lateness

if TYPE_CHECKING:
    from coursekit.results import Results

STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:920px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} .score{font-size:1.2em;margin:.3em 0 1em}
table{border-collapse:collapse;width:100%} td,th{padding:.45em .6em;border-bottom:1px solid #ddd;
vertical-align:top;text-align:left} .passed{color:#176b2c} .failed{color:#a4161a}
pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap;word-break:break-word;margin:.3em 0;font-size:13px}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.5em .8em;margin:1em 0}
"""


def shown(visibility: str, due: dt.datetime | None, now: dt.datetime, published: bool = False) -> bool:
    if visibility == "hidden":
        return False
    if visibility == "after_due_date":
        return due is not None and now >= due
    if visibility == "after_published":
        return published
    return True


def late_note(results: Results) -> str:
    """When the work was handed in, against the student's due date, and any late penalty."""
    sentence = Lateness.from_json(results.extra.get("late")).describe()
    return f"<p class='late'>{escape(sentence)}</p>" if sentence else ""


def render(results: Results, title: str, due: dt.datetime | None = None, now: dt.datetime | None = None,
           published: bool = False) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    tests = [t for t in results.tests if shown(t.visibility, due, now, published)]
    withheld = len(results.tests) - len(tests)
    score = sum(t.score for t in tests)
    max_score = sum(t.max_score for t in tests)
    rows = []
    for test in tests:
        status = "passed" if test.status == "passed" else "failed"
        detail = f"<pre>{escape(test.output)}</pre>" if test.output else ""
        rows.append(f"<tr><td>{escape(test.name)}{detail}</td>"
                    f"<td class='{status}'>{status}</td><td>{test.score:g} / {test.max_score:g}</td></tr>")
    notes = [late_note(results)]
    if results.output:
        notes.append(f"<div class='note'><b>About your notebook</b><pre>{escape(results.output)}</pre></div>")
    if withheld:
        notes.append(f"<p>{withheld} more test(s) will be shown later (after the due date or when grades "
                     "are published); the score above counts only the tests shown.</p>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f"<div class='score'>Score: <b>{score:g} / {max_score:g}</b></div>{''.join(notes)}"
            f"<table><tr><th>test</th><th>status</th><th>points</th></tr>{''.join(rows)}</table>"
            f"<p><small>Graded in {results.execution_time:g} s.</small></p></body></html>\n")
