"""Tables for the book's notebooks: a list of dicts shown as an HTML table, and the markdown tables of
``benchmarks/results/`` read back into such dicts."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

__all__ = ["html_table", "markdown_table", "show_table"]


def html_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, fmt: dict[str, str] | None = None
) -> str:
    """HTML of ``rows`` (one dict per row); ``fmt`` maps a column to a format spec such as ``".2f"``.

    A ``None`` value is a missing one and shows as "-" in any column.
    """
    if not rows:
        raise ValueError("html_table needs at least one row")
    columns = list(columns if columns is not None else rows[0])
    fmt = fmt or {}
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row[c], fmt.get(c, "")) for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_table(text: str) -> list[dict[str, str]]:
    """The rows of the first pipe table in ``text`` (a header line, a ``|---|`` line, rows), one dict
    per row keyed by the header's cells; every cell a stripped string, in the header's order.

    The benchmarks write their figures as such tables (``benchmarks/harness.py``), and the book reads
    them back from there rather than typing the numbers.

    Raises:
        ValueError: no table in ``text``, or a row with more or fewer cells than the header.
    """
    lines = [line.strip() for line in text.splitlines()]
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and lines[i + 1].startswith("|-"):
            break
    else:
        raise ValueError("no markdown table (a '| ... |' header followed by a '|---|' line) in the text")

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")]

    columns = cells(lines[i])
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break  # the table ends at its first line that is not a row
        values = cells(line)
        if len(values) != len(columns):
            raise ValueError(f"a table row has {len(values)} cells where the header has {len(columns)}: {line!r}")
        rows.append(dict(zip(columns, values, strict=True)))
    return rows


def _cell(value: Any, spec: str) -> str:
    """One ``<td>``; text gets ``class="text"``, which the book's stylesheet aligns left (numbers right).

    ``None`` is a missing value: it is shown as "-" whatever the column's format (a number format
    such as ``".2f"`` would reject it).
    """
    if value is None:
        return '<td class="text">-</td>'
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    attribute = "" if numeric else ' class="text"'
    return f"<td{attribute}>{escape(format(value, spec))}</td>"


def show_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, fmt: dict[str, str] | None = None
) -> None:
    """Display :func:`html_table` in a notebook."""
    from IPython.display import HTML, display

    display(HTML(html_table(rows, columns, fmt)))
