"""What `course similarity` shows: a summary for the terminal, and one self-contained page
(no script, nothing fetched) with each flagged pair's code side by side, the code they share
marked, cell by cell. Cells with nothing shared are folded away."""
from __future__ import annotations

from html import escape
from pathlib import Path

from coursekit.similarity import Comparison, Match, StudentCode
from coursekit.tables import text_table

STYLE = """
body{font:15px/1.5 system-ui,sans-serif;margin:2em auto;padding:0 1em;max-width:1500px;color:#222}
table{border-collapse:collapse} td,th{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:left}
.sides{display:grid;grid-template-columns:1fr 1fr;gap:1em} section{margin-top:2.5em}
pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap;word-break:break-word;margin:.2em 0 .8em;font-size:12.5px}
mark{background:#ffd1d1} h3 small,.cell{color:#666;font-weight:normal;font-size:13px}
"""


def summary(comparison: Comparison, page: Path) -> str:
    lab, flagged = comparison.lab, comparison.flagged
    lines = [(f"{lab.title} ({lab.id}): {len(comparison.compared)} notebook(s) compared, {comparison.pairs} "
              f"pair(s), threshold {comparison.threshold:.0%} of either one's own code")]
    if flagged:
        lines.append(f"{len(flagged)} pair(s) above the threshold, most similar first:")
        table = text_table(("student", "student", "1st's code in 2nd", "2nd's in 1st", "shared tokens"),
                           [(m.first.student, m.second.student, f"{m.shares[0]:.0%}", f"{m.shares[1]:.0%}",
                             m.tokens) for m in flagged])
        lines += ["  " + line for line in table.splitlines()]
    else:
        lines.append("No pair above the threshold.")
    if comparison.unreadable:
        lines.append(f"Not compared, {len(comparison.unreadable)} notebook(s) could not be read:")
        lines += [f"  {student}: {why}" for student, why in comparison.unreadable]
    lines.append(f"Side by side: {page}")
    return "\n".join(lines)


def page(comparison: Comparison) -> str:
    lab = comparison.lab
    title = f"Similar code: {lab.title} ({lab.id})"
    rows = "".join(
        f"<tr><td><a href='#pair-{i}'>{i}</a></td><td>{escape(m.first.student)}</td><td>{escape(m.second.student)}</td>"
        f"<td>{m.shares[0]:.0%}</td><td>{m.shares[1]:.0%}</td><td>{m.tokens}</td></tr>"
        for i, m in enumerate(comparison.flagged, start=1))
    table = ("<table><tr><th></th><th>student</th><th>student</th><th>1st's code in 2nd</th><th>2nd's in 1st</th>"
             f"<th>shared tokens</th></tr>{rows}</table>") if rows else "<p>No pair above the threshold.</p>"
    unreadable = "".join(f"<li>{escape(s)}: {escape(why)}</li>" for s, why in comparison.unreadable)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f"<p>{len(comparison.compared)} notebooks, {comparison.pairs} pairs compared on the code the grader runs, "
            "less the code the release notebook already holds; names, strings, comments and layout are ignored. "
            f"A pair is listed when at least {comparison.threshold:.0%} of either one's own code is also in the "
            "other's. Shared code is <mark>marked</mark>. A match is a reason to look, not proof.</p>"
            f"{table}" + (f"<p>Not compared (notebook unreadable):</p><ul>{unreadable}</ul>" if unreadable else "")
            + "".join(_pair(i, m) for i, m in enumerate(comparison.flagged, start=1)) + "</body></html>\n")


def _pair(number: int, match: Match) -> str:
    return (f"<section id='pair-{number}'><h2>{number}. {escape(match.first.student)} and "
            f"{escape(match.second.student)}: {match.shares[0]:.0%} and {match.shares[1]:.0%}</h2>"
            f"<div class='sides'>{_side(match.first, match.regions[0])}{_side(match.second, match.regions[1])}"
            "</div></section>")


def _side(code: StudentCode, regions) -> str:
    spans = sorted(zip(regions[0].tolist(), regions[1].tolist()))
    cells = []
    for number, start, end in code.code.cells:
        inside = [(max(s, start) - start, min(e, end) - start) for s, e in spans if s < end and e > start]
        source = code.code.text[start:end]
        body = f"<pre>{_marked(source, inside)}</pre>"
        if inside:
            cells.append(f"<div class='cell'>cell {number}</div>{body}")
        else:
            cells.append(f"<details><summary class='cell'>cell {number}: nothing shared</summary>{body}</details>")
    return (f"<div><h3>{escape(code.student)} <small>{escape(str(code.notebook))}</small></h3>"
            f"{''.join(cells)}</div>")


def _marked(source: str, spans: list[tuple[int, int]]) -> str:
    parts, done = [], 0
    for start, end in spans:
        start = max(start, done)
        if end > start:
            parts.append(escape(source[done:start]) + f"<mark>{escape(source[start:end])}</mark>")
            done = end
    return "".join(parts) + escape(source[done:])
