"""Answers cut off by ``cutoff_len``: a dataset where no sample keeps an assistant token is refused
before its task is queued (it was queued and failed after loading the model); one where only some do
is a warning. Real files, the demo model's tokenizer, a real task store."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_ft.data import load_dataset
from sage_ft.data.cutoff import measure_cutoff
from tests.fixtures_data import write_jsonl

LONG_PROMPT = " ".join(f"word{i}" for i in range(120))  # far over cutoff_len 128, within the demo model's 2048


def long_rows(n: int) -> list[dict]:
    return [{"instruction": f"{LONG_PROMPT} question {i}?", "output": f"Answer {i}."} for i in range(n)]


def short_rows(n: int) -> list[dict]:
    return [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(n)]


@pytest.fixture
def manager(tmp_path: Path):
    from sage_ft.tasks import TaskManager

    tasks = TaskManager(tmp_path / "tasks.db", start_worker=False)
    yield tasks
    tasks.shutdown()


def _config(dataset: Path, tmp_path: Path, **extra) -> dict:
    return {"model_name_or_path": "demo", "dataset": str(dataset), "cutoff_len": 128, "max_steps": 1,
            "devices": "cpu", "precision": "fp32", "output_dir": str(tmp_path / "run"), **extra}


def test_a_dataset_whose_answers_are_all_cut_off_is_refused_before_it_is_queued(demo_model, manager, tmp_path):
    from sage_ft.tasks import TaskRefused

    data = write_jsonl(long_rows(10), tmp_path / "long.jsonl")
    with pytest.raises(TaskRefused) as err:
        manager.create(_config(data, tmp_path))
    [problem] = err.value.problems
    assert problem.startswith("cutoff_len: no sample keeps an assistant token within cutoff_len 128")
    assert "raise cutoff_len or shorten the prompts" in problem
    assert manager.list() == [] and not (tmp_path / "run").exists()
    assert manager.create(_config(data, tmp_path, cutoff_len=2048)).status.value == "queued"  # room for the answer


def test_some_answers_cut_off_is_a_warning_not_a_refusal(demo_model, manager, tmp_path):
    data = write_jsonl(long_rows(10) + short_rows(3), tmp_path / "mixed.jsonl")
    assert manager.create(_config(data, tmp_path)).status.value == "queued"
    report = load_dataset(data)
    stats = measure_cutoff(report, "demo", 128)
    assert stats.problem() is None and stats.no_labels_after_cutoff == 10
    summary = report.summary()
    assert "WARNING: 10 of 13 samples keep no assistant token within cutoff_len 128" in summary
    assert summary.endswith("OK: the data can be used for training (but see the warning).") and report.ok


def test_a_large_dataset_is_measured_on_rows_spread_over_it(demo_model, tmp_path):
    """The check is bounded (at most ``max_rows`` rows) and says so; the rows are spread over the file,
    so a file whose first half is cut off is not taken for one where everything is."""
    report = load_dataset(write_jsonl(long_rows(150) + short_rows(150), tmp_path / "halves.jsonl"))
    stats = measure_cutoff(report, "demo", 128, max_rows=30)
    assert (stats.count, stats.sampled_from, stats.no_labels_after_cutoff) == (30, 300, 15)
    assert stats.problem() is None and "measured on 30 of the 300 rows" in stats.warning()
    all_cut = load_dataset(write_jsonl(long_rows(40), tmp_path / "all-long.jsonl"))
    stats = measure_cutoff(all_cut, "demo", 128, max_rows=10)
    assert "measured on 10 of the 40 rows" in stats.problem() and not all_cut.ok
    assert "NOT OK: no sample keeps an assistant token" in all_cut.summary()


def test_a_model_whose_tokenizer_is_not_here_is_not_measured(tmp_path):
    """Before queuing nothing is downloaded: a hub id that is not in the cache is left to the run."""
    report = load_dataset(write_jsonl(short_rows(2), tmp_path / "d.jsonl"))
    assert measure_cutoff(report, "nobody/no-such-model-xyz", 128) is None
    assert measure_cutoff(report, str(tmp_path / "missing-model"), 128) is None and report.token_stats is None


def test_the_web_ui_data_report_says_it_too(demo_model, manager, tmp_path):
    """The Train tab's data report said '✅ The data can be used for training' for a dataset Start refuses."""
    from sage_ft.webui import train_tab
    from sage_ft.webui.services import AppServices

    services = AppServices(tasks=manager, configs_dir=tmp_path / "configs")
    long = write_jsonl(long_rows(10), tmp_path / "long.jsonl")
    text, *_ = train_tab.check_dataset(services, "en", str(long), "auto", "", None, "demo", "auto", 128)
    assert "❌" in text and "no sample keeps an assistant token within cutoff_len 128" in text and "✅" not in text
    mixed = write_jsonl(long_rows(10) + short_rows(3), tmp_path / "mixed.jsonl")
    text, *_ = train_tab.check_dataset(services, "en", str(mixed), "auto", "", None, "demo", "auto", 128)
    assert "✅" in text and "⚠️ 10 of 13 samples keep no assistant token" in text
