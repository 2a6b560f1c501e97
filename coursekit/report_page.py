"""The instructor's report of one lab as files: a self-contained HTML page (its plots
embedded as PNG, no script, no stylesheet or font fetched: it opens offline and can be
mailed), and each plot's PNG beside it (OUT/report/<lab>.html, OUT/report/<lab>-<plot>.png).

matplotlib is imported only when a page is drawn, and drawn with its Agg canvas directly
(no pyplot, no global backend), so nothing else of the batch side pays for it.
"""
from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

from coursekit.feedback_page import STYLE
from coursekit.report import VARIES, LabReport, bin_labels
from coursekit.results import write_atomic

REPORT_FOLDER = "report"         # under the results folder
SHOWN_FAILURES = 5               # message groups per test
SHOWN_CELLS = 10
SHOWN_NAMES = 12                 # students named per row, then "and N more"
MESSAGE_CHARACTERS = 300
PAGE_STYLE = STYLE + """
body{max-width:1100px} img{max-width:100%;height:auto} td.n{text-align:right;white-space:nowrap}
h2{margin-top:1.8em;border-bottom:1px solid #ccc} .names{color:#555;font-size:13px}
"""


def write_lab_page(report: LabReport, folder: Path) -> Path:
    """The page and its plots' PNGs, each written atomically; the page's path."""
    plots = draw_plots(report)
    for name, png in plots.items():
        write_atomic(folder / f"{report.lab_id}-{name}.png", png)
    page = folder / f"{report.lab_id}.html"
    write_atomic(page, render(report, plots))
    return page


def draw_plots(report: LabReport) -> dict[str, bytes]:
    """PNGs by name: scores, tests, and cells and times where there is something to draw."""
    plots = {"scores": _bars(bin_labels(), report.histogram, "submissions", f"{report.title}: scores", vertical=True)}
    tests = [t for t in report.tests if t.rate is not None]
    if tests:
        plots["tests"] = _bars([t.name for t in tests], [100 * t.rate for t in tests], "pass rate (%)",
                               "Tests, the hardest first", limit=100)
    if report.cells:
        cells = report.cells[:SHOWN_CELLS]
        plots["cells"] = _bars([f"#{'/'.join(map(str, c.numbers))} {c.first_line[:40]}" for c in cells],
                               [len(c.students) for c in cells], "students", "Cells that raised")
    if report.grading_seconds:
        plots["times"] = _histogram(report.grading_seconds, "seconds per submission", "Grading times")
    return plots


def _figure(rows: int = 0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, max(3.0, 0.3 * rows + 1.2)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _bars(labels: list[str], values: list[float], axis: str, title: str, vertical: bool = False,
          limit: float | None = None) -> bytes:
    figure = _figure(0 if vertical else len(labels))
    ax = figure.add_subplot()
    if vertical:
        ax.bar(range(len(values)), values, color="#3b6ea5")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_ylabel(axis)
        ax.yaxis.get_major_locator().set_params(integer=True)
    else:  # the first row on top
        ax.barh(range(len(values)), values, color="#3b6ea5")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(axis)
        if limit is not None:
            ax.set_xlim(0, limit)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    return _png(figure)


def _histogram(values: list[float], axis: str, title: str) -> bytes:
    figure = _figure()
    ax = figure.add_subplot()
    ax.hist(values, bins=min(30, max(5, len(values))), color="#3b6ea5")
    ax.set_xlabel(axis)
    ax.set_ylabel("submissions")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    return _png(figure)


def render(report: LabReport, plots: dict[str, bytes]) -> str:
    title = f"{report.title} ({report.lab_id}): where the class struggles"
    mean = sum(report.percents) / len(report.percents) if report.percents else 0.0
    sections = [
        (f"<p>{report.submissions} submission(s); mean score {mean:.1f}% of {report.max_score:g} points. Scores "
         "here are raw, before any late penalty: what the class could do.</p>"),
        _section("Score distribution", plots.get("scores"), _table(
            "scores", ("score", "submissions"), list(zip(bin_labels(), report.histogram)), numeric=(1,))),
        _section("Tests, the hardest first", plots.get("tests"), _table(
            "tests", ("test", "points", "passed / ran", "pass rate", "mean points"),
            [(escape(t.name), f"{t.points:g}", f"{t.passed} / {t.ran}",
              f"{100 * t.rate:.0f}%" if t.rate is not None else "not run", f"{t.mean_points:.2f}")
             for t in report.tests], numeric=(1, 2, 3, 4)),
            "<p>A test passes when all its cases pass. It counts only where it ran: not for a submission graded "
            "with <code>--only</code> without it, nor for one that could not be graded.</p>"),
        _section("Most frequent failures", None, _failures(report)),
        _section("Cells that raised", plots.get("cells"), _cells(report)),
        _section("Grading times and limits that fired", plots.get("times"), _times(report)),
        _section("Students with a problem", None, _table(
            "problems", ("student", "score", "why"),
            [(escape(p.student), "—" if p.score is None else f"{p.score:g}", _pre(p.why))
             for p in report.problems], numeric=(1,)) if report.problems else "<p>None.</p>"),
    ]
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body><h1>{escape(title)}</h1>{''.join(sections)}</body></html>\n")


def _failures(report: LabReport) -> str:
    rows = []
    for test in report.tests:
        groups = report.failures.get(test.name, [])
        for group in groups[:SHOWN_FAILURES]:
            cases = ", ".join(c for c in group.cases if c)
            rows.append((escape(test.name), len(group.students),
                         _pre(group.message[:MESSAGE_CHARACTERS])
                         + (f"<div class='names'>cases: {escape(cases)}</div>" if cases else "")
                         + f"<div class='names'>{_names(group.students)}</div>"))
        if len(groups) > SHOWN_FAILURES:
            rows.append((escape(test.name), "", f"and {len(groups) - SHOWN_FAILURES} more message(s)"))
    if not rows:
        return "<p>No test failed.</p>"
    return (f"<p>Per test, its failed cases grouped by message; a number that differs from student to student "
            f"is shown as {VARIES}</p>" + _table("failures", ("test", "students", "message"), rows, numeric=(1,)))


def _cells(report: LabReport) -> str:
    unrecorded = (f"<p>{report.unrecorded} graded submission(s) were graded before the grader recorded its cells "
                  "and limits (regrade them with <code>--force</code> to count them).</p>" if report.unrecorded else "")
    if not report.cells:
        return unrecorded + "<p>No cell raised.</p>"
    return unrecorded + _table("cells", ("cell (its first line)", "cell #", "students", "raised"), [
        (_pre(c.first_line), ", ".join(map(str, c.numbers)), len(c.students),
         ", ".join(f"{escape(name)} ({count})" for name, count in c.errors)
         + f"<div class='names'>{_names(c.students)}</div>") for c in report.cells], numeric=(1, 2))


def _times(report: LabReport) -> str:
    times = _table("times", ("part", "submissions", "median s", "90% under s", "max s"),
                   [(escape(t.part), t.count, f"{t.median:.1f}", f"{t.p90:.1f}", f"{t.max:.1f}")
                    for t in report.times], numeric=(1, 2, 3, 4))
    slowest = ("<p>Slowest: " + ", ".join(f"{escape(s)} ({seconds:.1f} s)" for s, seconds in report.slowest)
               + ".</p>" if report.slowest else "")
    limits = _table("limits", ("limit", "submissions", "times", "students"),
                    [(escape(f.limit), len(f.students), f.times, f"<span class='names'>{_names(f.students)}</span>")
                     for f in report.limits], numeric=(1, 2)) if report.limits else "<p>No limit fired.</p>"
    return (times + slowest + "<p>Limits that fired: a time limit (<code>test_seconds</code>, "
            "<code>cell_seconds</code>, <code>submission_seconds</code> in course.yaml), <code>memory</code> "
            "(the student's code ran out of it), <code>restarts</code> (its process hung or died and was "
            "restarted).</p>" + limits)


def _section(heading: str, png: bytes | None, body: str, note: str = "") -> str:
    image = (f"<img alt='{escape(heading)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"
             if png else "")
    return f"<h2>{escape(heading)}</h2>{note}{image}{body}"


def _table(table_id: str, header: tuple[str, ...], rows: list[tuple], numeric: tuple[int, ...] = ()) -> str:
    """Cells are HTML (escaped by the caller); the `numeric` columns are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='n'>{cell}</td>" if i in numeric else f"<td>{cell}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table id='{table_id}'><tr>{head}</tr>{body}</table>"


def _pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def _names(students: tuple[str, ...]) -> str:
    more = len(students) - SHOWN_NAMES
    return escape(", ".join(students[:SHOWN_NAMES])) + (f" and {more} more" if more > 0 else "")
