"""A small table that prints aligned in a terminal and renders as HTML in a notebook."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from typing import Any


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}"
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
    """Rows of values under named columns, with footer rows (per-group lines, a total).

    ``rows`` and ``footer`` keep the raw values (ints, tuples) for programs; ``str()`` and the
    notebook rendering (``_repr_html_``) format them. Public as ``hybrid_jax.Table``: the
    package's reports return one, and a notebook can make its own.

    Examples:
      >>> table = Table(("recipe", "val loss"), (("fp32", 1.61), ("bf16-mixed", 1.62)))
      >>> print(table)
      recipe      val loss
      ----------  --------
      fp32        1.61
      bf16-mixed  1.62
      >>> table.column("val loss")
      [1.61, 1.62]
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    footer: tuple[tuple[Any, ...], ...] = ()

    def __post_init__(self):
        for row in (*self.rows, *self.footer):
            if len(row) != len(self.columns):
                raise ValueError(f"row {row!r} has {len(row)} cells, not {len(self.columns)}")

    def column(self, name: str) -> list[Any]:
        """The values of one column, in row order (footer rows left out)."""
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    @staticmethod
    def _text(rows: Sequence[tuple[Any, ...]]) -> list[list[str]]:
        return [[_cell(v) for v in row] for row in rows]

    def __str__(self) -> str:
        body, foot = self._text(self.rows), self._text(self.footer)
        widths = [
            max(len(r[i]) for r in [self.columns, *body, *foot]) for i in range(len(self.columns))
        ]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [line(self.columns), rule, *map(line, body)]
        if foot:
            lines += [rule, *map(line, foot)]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        def cells(row, tag):
            return "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)

        head = cells(self.columns, "th")
        rows = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in self._text(self.rows))
        foot = "".join(f"<tr>{cells(r, 'th')}</tr>" for r in self._text(self.footer))
        foot = f"<tfoot>{foot}</tfoot>" if foot else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>{foot}</table>"
