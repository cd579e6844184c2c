"""Rows of a CSV or TSV dataset file, the way a spreadsheet exports them.

A header row names the columns; every later row becomes one object keyed by those names, so an
alpaca table (``instruction,input,output``) reads like the same rows in JSON Lines and everything after
reading (format detection, column mapping, row checks) is shared. A cell holding a JSON array of
objects or of arrays (a ``messages``, ``conversations`` or alpaca ``history`` column written by
``df.to_csv``) is read as that array; any other cell stays text.

Problems that make the whole table unreadable raise ``TableError`` with the line they are on: a
row with more or fewer cells than the header usually means an unquoted comma, and guessing which
cell it belongs to would train on shifted text.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

DELIMITERS = {".csv": ",", ".tsv": "\t"}
QUOTING_HINT = "a cell that contains the delimiter, a double quote or a line break must be in double quotes"


class TableError(ValueError):
    """A table that cannot be read; ``line`` is the 1-based line it was found on."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def read_table(text: str, delimiter: str, max_cell_chars: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("line N", {column: cell})`` for each row of ``text`` after its header; N is the line the row
    starts on (a quoted cell may span lines). Blank lines are skipped."""
    csv.field_size_limit(max(csv.field_size_limit(), max_cell_chars))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    header_line = start = 0
    try:
        for cells in reader:
            line, start = start + 1, reader.line_num
            if not cells or not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header, header_line = _header(cells, line), line
                continue
            if len(cells) != len(header):
                raise TableError(line, f"{len(cells)} cells where the header (line {header_line}) has "
                                       f"{len(header)}; {QUOTING_HINT}")
            yield f"line {line}", {name: _cell(cell) for name, cell in zip(header, cells, strict=True)}
    except csv.Error as exc:
        # Report where the unreadable row starts: an unclosed quote is only noticed at the end of the file.
        raise TableError(start + 1, f"the row starting here cannot be read ({exc}); {QUOTING_HINT}") from None


def _header(cells: list[str], line: int) -> list[str]:
    names = [cell.strip() for cell in cells]
    for index, name in enumerate(names, 1):
        if not name:
            raise TableError(line, f"column {index} of the header has no name; the first row must name every "
                                   "column, e.g. instruction,input,output")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise TableError(line, f"the header names {', '.join(map(repr, duplicates))} more than once; "
                               "give each column its own name")
    return names


def _cell(text: str) -> Any:
    """The cell's text, or the JSON array of objects or arrays it holds (a conversation column)."""
    stripped = text.strip()
    if stripped.startswith(("[{", "[[")) and stripped.endswith(("}]", "]]")):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text
        if isinstance(value, list) and all(isinstance(item, dict | list) for item in value):
            return value
    return text
