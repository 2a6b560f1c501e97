"""Plain-text tables for the terminal: the batch's scores, a regrade's moves, a dry run's plan."""
from __future__ import annotations


def text_table(header: tuple[str, ...], body: list[tuple]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])
