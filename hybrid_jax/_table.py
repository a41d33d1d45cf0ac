"""A small table that prints aligned in a terminal and renders as HTML in a notebook."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from typing import Any


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, tuple):
        return "(" + ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


@dataclasses.dataclass(frozen=True)
class Table:
    """Rows of values under named columns, with an optional total row.

    ``rows`` keep the raw values (ints, tuples, dtypes) for programs; ``str()`` and the notebook
    rendering format them.
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    total: tuple[Any, ...] | None = None

    def __post_init__(self):
        for row in (*self.rows, *([self.total] if self.total else [])):
            if len(row) != len(self.columns):
                raise ValueError(f"row {row!r} has {len(row)} cells, not {len(self.columns)}")

    def column(self, name: str) -> list[Any]:
        """The values of one column, in row order."""
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    def _text_rows(self) -> list[Sequence[str]]:
        rows = [[_cell(v) for v in row] for row in self.rows]
        return rows + ([[_cell(v) for v in self.total]] if self.total else [])

    def __str__(self) -> str:
        body = self._text_rows()
        widths = [max(len(r[i]) for r in [self.columns, *body]) for i in range(len(self.columns))]
        line = lambda cells: "  ".join(
            c.ljust(w) for c, w in zip(cells, widths, strict=True)
        ).rstrip()
        rule = "  ".join("-" * w for w in widths)
        lines = [line(self.columns), rule, *(line(r) for r in body[: len(self.rows)])]
        if self.total:
            lines += [rule, line(body[-1])]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        esc = lambda cells, tag: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells)
        body = self._text_rows()
        rows = "".join(f"<tr>{esc(r, 'td')}</tr>" for r in body[: len(self.rows)])
        foot = f"<tfoot><tr>{esc(body[-1], 'th')}</tr></tfoot>" if self.total else ""
        return (
            f"<table><thead><tr>{esc(self.columns, 'th')}</tr></thead>"
            f"<tbody>{rows}</tbody>{foot}</table>"
        )
