"""The run's inputs, checked before any model is loaded: dataset names -> files -> conversations.

Kept free of torch/transformers so the CLI can validate a dataset (and refuse a bad one) in a
fraction of a second, before it commits to loading a model.
"""

from __future__ import annotations

from typing import Any

from sage_ft.config import TrainConfig


def load_run_dataset(config: TrainConfig) -> Any:
    """The validated ``DatasetReport`` of the run's data; raises ``DataError`` when unusable."""
    from sage_ft.data.load import DataError, load_dataset

    report = load_dataset(config.datasets, config.dataset_format, config.column_mapping, config.max_samples)
    if not report.ok:
        raise DataError("the dataset cannot be used for training:\n" + report.summary(), report=report)
    return report


def load_run_eval_dataset(config: TrainConfig) -> Any:
    """The validated ``DatasetReport`` of ``eval_dataset`` (read as ``dataset`` is, all its rows; a
    folder means its test/validation split), None without one. Its ``DataError`` names eval_dataset."""
    from sage_ft.data.load import DataError, load_dataset

    if not config.eval_datasets:
        return None
    try:
        report = load_dataset(config.eval_datasets, config.dataset_format, config.column_mapping, split="eval")
    except DataError as exc:
        raise DataError(f"eval_dataset: {exc}", problems=[f"eval_dataset: {p}" for p in exc.problems],
                        report=exc.report) from None
    if not report.ok:
        raise DataError("eval_dataset: it cannot be used for the eval loss:\n" + report.summary(), report=report)
    return report
