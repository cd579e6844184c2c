"""Do the samples keep an answer within ``cutoff_len``? Checked before a run is queued.

A dataset whose prompts are all longer than ``cutoff_len`` loaded fine, was queued, and failed only
after the base model was loaded ("no sample keeps an assistant token"). Knowing needs the model's
tokenizer and chat template, not its weights: the tokenizer alone loads in a fraction of a second.
Bounded for large datasets: at most ``CHECK_ROWS`` rows, spread evenly over the dataset, are measured
(the report says so), which is enough to tell "every answer is cut off" from "some are".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sage_ft.data.load import DataError, DatasetReport, TokenStats

CHECK_ROWS = 1000
log = logging.getLogger(__name__)


def local_tokenizer(model: str) -> Any | None:
    """The tokenizer of ``model`` when its files are on this machine: the demo model once built, a model
    folder, or a hub id already in the Hugging Face cache. None otherwise: a check made before queuing
    never downloads (the run fetches the model and checks again)."""
    from sage_ft import paths

    name = (model or "").strip()
    if name == "demo":
        from sage_ft.models.demo import is_demo_model

        location = paths.demo_model_dir()
        if not is_demo_model(location):
            return None
    else:
        location = Path(name).expanduser()
    from transformers import AutoTokenizer

    try:
        source = str(location) if location.is_dir() else name
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - not on this machine, or unreadable: an optional pre-check,
        log.info("no tokenizer for %s before the run: %s", name, exc)  # the run's own model checks say why
        return None


def measure_cutoff(report: DatasetReport, model: str, cutoff_len: int, template: str = "auto",
                   max_rows: int | None = CHECK_ROWS) -> TokenStats | None:
    """``report.token_stats`` measured with ``model``'s tokenizer on at most ``max_rows`` rows; None when
    the tokenizer is not on this machine or its chat template cannot render the rows (the model's own
    checks name those problems)."""
    if not report.conversations:
        return None
    tokenizer = local_tokenizer(model)
    if tokenizer is None:
        return None
    try:
        return report.compute_token_stats(tokenizer, cutoff_len, template, max_rows=max_rows)
    except (DataError, ValueError) as exc:
        log.info("token lengths of %s not measured: %s", model, exc)
        return None


def cutoff_problem(report: DatasetReport, config: Any) -> str | None:
    """``"cutoff_len: no sample keeps an assistant token …"`` when truncation at ``config.cutoff_len``
    leaves no sample anything to learn (measured on a sample of rows), else None."""
    stats = measure_cutoff(report, config.model_name_or_path, config.cutoff_len, config.template)
    problem = stats.problem() if stats else None
    return f"cutoff_len: {problem}" if problem else None
