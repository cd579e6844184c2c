"""Rows of a Parquet dataset file, as the Hugging Face Hub stores datasets (``data/train-*.parquet``,
also under ``~/.cache/huggingface/hub/datasets--*``) and as ``pandas.DataFrame.to_parquet`` writes them.

Each row becomes a ``{column: value}`` object of plain Python values (a ``messages`` column is a list
of dicts), so everything after reading (format detection, column mapping, row checks) is shared with
JSON Lines. A null is read as an absent key: Parquet gives every row every column, and every struct
in a list column every field seen in any row, so a message written without ``name`` comes back with
``name: None``; dropping those makes the row read as it was written. pandas' index columns
(``__index_level_0__``) are not data and are left out.

pyarrow is imported when a Parquet file is read, not when the app starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAGIC = b"PAR1"  # a Parquet file starts (and ends) with these bytes
BATCH_ROWS = 1024  # rows decoded at a time: memory stays bounded by a batch, not the file


class ParquetError(ValueError):
    """A Parquet file that cannot be read; the message says why and what to do."""


def read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("index N", {column: value})`` for each row of the file, N counted from 0 as in
    ``pandas.read_parquet(path).iloc[N]`` and the Hub's dataset viewer."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ParquetError("reading a .parquet file needs pyarrow, which this Python lacks: pip install pyarrow "
                           "(or run scripts/install.sh)") from None
    try:
        parquet_file = pq.ParquetFile(path)
        columns = data_columns(parquet_file.schema_arrow)
        index = 0
        for batch in parquet_file.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                yield f"index {index}", without_nulls(row)
                index += 1
    except (pyarrow.ArrowException, OSError) as exc:
        raise ParquetError(f"not a readable Parquet file ({exc}); re-export it, e.g. with pandas "
                           "df.to_parquet(path) or datasets' Dataset.to_parquet(path)") from None


def data_columns(schema: Any) -> list[str]:
    """The schema's column names without pandas' index columns."""
    metadata = schema.pandas_metadata or {}
    index_columns = {c for c in metadata.get("index_columns", []) if isinstance(c, str)}
    return [name for name in schema.names if name not in index_columns]


def without_nulls(value: Any) -> Any:
    """``value`` with every dict entry whose value is None removed, at every depth (list items stay:
    a null turn in an alpaca ``history`` pair is an error the row check names)."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value
