"""Datasets: reading and validating files, docs -> dataset, the built-in sample.

``tokenize_conversations`` (in ``sage_ft.data.tokenize``) is re-exported lazily, so importing this
package never pulls in the tokenisation code or its heavy dependencies.
"""

from __future__ import annotations

from typing import Any

from sage_ft.data.docs import DocsDatasetResult, prepare_docs
from sage_ft.data.formats import FORMATS, parse_column_mapping
from sage_ft.data.load import (
    DEFAULT_MAX_BYTES,
    FILE_TYPES,
    MAX_LINE_BYTES,
    SUFFIXES,
    DataError,
    DatasetReport,
    RowIssue,
    TokenStats,
    load_dataset,
)
from sage_ft.data.sample import builtin_sample_dataset

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FILE_TYPES",
    "FORMATS",
    "MAX_LINE_BYTES",
    "SUFFIXES",
    "DataError",
    "DatasetReport",
    "DocsDatasetResult",
    "RowIssue",
    "TokenStats",
    "builtin_sample_dataset",
    "load_dataset",
    "parse_column_mapping",
    "prepare_docs",
    "tokenize_conversations",
]


def __getattr__(name: str) -> Any:
    if name == "tokenize_conversations":
        from sage_ft.data.tokenize import tokenize_conversations

        return tokenize_conversations
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
