"""The run's inputs, checked before any model is loaded: dataset names -> files -> conversations.

Kept free of torch/transformers so the CLI can validate a dataset (and refuse a bad one) in a
fraction of a second, before it commits to loading a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sage_ft import paths
from sage_ft.config import TrainConfig

BUILTIN_SAMPLE_NAME = "docs-sample"


def resolve_dataset_paths(config: TrainConfig) -> list[Path]:
    """``config.dataset`` entries as files: ``docs-sample`` = the built-in sample (built on demand);
    a bare name that is not a file is looked up in the data home's datasets/ folder."""
    from sage_ft.data.load import FILE_TYPES, SUFFIXES, DataError

    out: list[Path] = []
    for entry in config.datasets:
        if entry == BUILTIN_SAMPLE_NAME:
            try:
                from sage_ft.data.sample import builtin_sample_dataset
            except ImportError:
                raise DataError("the built-in docs-sample dataset is not available in this install; "
                                f"give a {FILE_TYPES} file instead") from None
            out.append(Path(builtin_sample_dataset()))
            continue
        path = Path(entry).expanduser()
        if not _exists(path) and not path.is_absolute() and "/" not in entry:
            for candidate in (paths.datasets_dir() / entry, *(paths.datasets_dir() / f"{entry}{suffix}"
                                                              for suffix in SUFFIXES)):
                if _exists(candidate):
                    path = candidate
                    break
        out.append(path)
    if not out:
        raise DataError(f"dataset: empty; give one or more {FILE_TYPES} files (comma separated) or 'docs-sample'")
    return out


def _exists(path: Path) -> bool:
    """``path.exists()``, False for a name the file system refuses (too long): ``load_dataset`` says why."""
    try:
        return path.exists()
    except OSError:
        return False


def load_run_dataset(config: TrainConfig) -> Any:
    """The validated ``DatasetReport`` of the run's data; raises ``DataError`` when unusable."""
    from sage_ft.data.load import DataError, load_dataset

    report = load_dataset(resolve_dataset_paths(config), config.dataset_format, config.column_mapping,
                          config.max_samples)
    if not report.ok:
        raise DataError("the dataset cannot be used for training:\n" + report.summary(), report=report)
    return report
