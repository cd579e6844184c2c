"""The built-in sample dataset: the project's own documentation turned into training samples.

This is the UI's "built-in docs sample": it needs no download, so the demo works offline. It is
regenerated only when missing or older than one of its source documents.
"""

from __future__ import annotations

from pathlib import Path

from sage_ft import paths
from sage_ft.data.docs import prepare_docs
from sage_ft.data.load import DataError

SAMPLE_NAME = "sage-ft-docs.jsonl"


def sample_sources(root: Path | None = None) -> list[Path]:
    """README.md and docs/*.md of the source checkout (not the helpers' working notes below docs/)."""
    root = root or paths.project_root()
    sources = [root / "README.md"] if (root / "README.md").is_file() else []
    return sources + sorted((root / "docs").glob("*.md"))


def builtin_sample_dataset(force: bool = False) -> Path:
    """Path of ``sage-ft-docs.jsonl`` in the datasets folder, (re)built from the docs when needed."""
    sources = sample_sources()
    out = paths.datasets_dir() / SAMPLE_NAME
    if not sources:
        if out.is_file():
            return out
        raise DataError(f"{paths.project_root()}: no README.md or docs/*.md found to build the built-in sample "
                        "dataset from; reinstall sage-ft from its source checkout or pick your own dataset")
    newest = max(p.stat().st_mtime for p in sources)
    if force or not out.is_file() or out.stat().st_mtime < newest:
        prepare_docs(sources, out)
    return out
