"""Tables for the book's notebooks: a list of dicts shown as an HTML table."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

__all__ = ["html_table", "show_table"]


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
