"""Train tab handlers through the real HTTP API (gradio_client against the launched app)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
import yaml
from gradio_client import handle_file

from sage_ft import paths
from sage_ft.config import TrainConfig
from sage_ft.tasks import TaskStatus
from sage_ft.webui import i18n
from tests.fixtures_data import (
    MEMORIZE_PAIRS,
    cache_hub_dataset,
    memorize_rows,
    write_jsonl,
    write_parquet,
    write_table,
)
from tests.fixtures_webui import form_args

FIELDS = TrainConfig.field_names()
TINY = {"max_steps": 4, "cutoff_len": 64, "per_device_train_batch_size": 2, "save_steps": 2,
        "learning_rate": 1e-3, "packing": False}


def _value(values, name):
    return values[FIELDS.index(name)]


def test_preview_shows_the_exact_command_and_yaml(webui_client):
    command, text = webui_client.predict("en", *form_args(lora_rank=16, dataset="d.jsonl"), api_name="/preview")
    assert command.startswith("sage-ft train ")
    assert "--set lora_rank=16" in command and "--set dataset=d.jsonl" in command
    assert yaml.safe_load(text)["lora_rank"] == 16


def test_preview_names_each_invalid_field(webui_client):
    command, text = webui_client.predict("en", *form_args(learning_rate=0, per_device_train_batch_size=0),
                                         api_name="/preview")
    assert "learning_rate: 0 is too small" in command
    assert "per_device_train_batch_size: 0 is too small" in command
    assert text == ""


def test_start_refuses_invalid_values_and_queues_nothing(webui, webui_client):
    before = len(webui.services.tasks.list())
    task_id, message, _ = webui_client.predict("en", *form_args(dataset="x.jsonl", lora_dropout=2),
                                               api_name="/start")
    assert not isinstance(task_id, int)
    assert "lora_dropout: 2 is too large" in message
    _, message, _ = webui_client.predict("en", *form_args(), api_name="/start")
    assert "No dataset chosen" in message
    _, message, _ = webui_client.predict("en", *form_args(dataset=str(Path("/nonexistent/data.jsonl"))),
                                         api_name="/start")
    assert "not started" in message and "/nonexistent/data.jsonl" in message
    assert len(webui.services.tasks.list()) == before


def test_upload_check_and_start_a_run_from_form_values(webui, webui_client, tmp_path):
    data = write_jsonl(memorize_rows() * 2, tmp_path / "my data.jsonl")
    dataset, registered, message = webui_client.predict(handle_file(str(data)), "en", api_name="/upload_dataset")
    stored = Path(dataset)
    assert stored.parent.parent == paths.datasets_dir() / "uploads" and stored.name == "my-data.jsonl"
    assert stored.read_bytes() == data.read_bytes()
    report, histogram, preview = webui_client.predict("en", dataset, "auto", "", None, "demo", "auto", 64,
                                                      api_name="/check_dataset")
    assert "8 usable rows of 8 read, 0 dropped" in report
    assert "Tokens per sample" in report and histogram is not None
    assert memorize_rows()[0]["messages"][0]["content"] in preview and "role-assistant" in preview

    task_id, message, progress = webui_client.predict("en", *form_args(dataset=dataset, **TINY), api_name="/start")
    assert isinstance(task_id, int) and f"Task #{task_id}" in message
    assert webui.services.tasks.task(task_id).name == "demo · my-data"  # the file's own name, no storage prefix
    done = webui.services.tasks.wait(task_id, timeout=240)
    assert done.status is TaskStatus.COMPLETED, done.error
    assert webui_client.predict(task_id, "en", api_name="/train_progress").count("completed") >= 1


def test_a_double_click_on_start_queues_one_run(webui, webui_client, tmp_path):
    """Two Starts a second apart with the same settings queued two identical runs; the second is now
    answered with the first (a Start with other settings, or later, still queues)."""
    data = write_jsonl(memorize_rows(), tmp_path / "twice.jsonl")
    args = form_args(dataset=str(data), **TINY)
    first, _, _ = webui_client.predict("en", *args, api_name="/start")
    again, message, _ = webui_client.predict("en", *args, api_name="/start")
    assert again == first and f"queued as task #{first} a moment ago" in message
    assert [t.id for t in webui.services.tasks.list() if t.config.dataset == str(data.resolve())] == [first]
    other, _, _ = webui_client.predict("en", *form_args(dataset=str(data), **{**TINY, "seed": 7}), api_name="/start")
    assert isinstance(other, int) and other != first
    for task_id in (first, other):
        assert webui.services.tasks.wait(task_id, timeout=240).status is TaskStatus.COMPLETED


def test_check_dataset_reports_bad_rows_with_line_numbers(webui_client, tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [*memorize_rows(), {"messages": [{"role": "user", "content": "no answer"}]}]
    write_jsonl(rows, path)
    report, _, _ = webui_client.predict("en", str(path), "auto", "", None, "demo", "auto", 64,
                                        api_name="/check_dataset")
    assert "1 dropped" in report and "line 5" in report
    path.write_text('{"messages": [}\n', encoding="utf-8")
    report, histogram, _ = webui_client.predict("en", str(path), "auto", "", None, "demo", "auto", 64,
                                                api_name="/check_dataset")
    assert "line 1" in report and "invalid JSON" in report and histogram is None


@pytest.mark.parametrize("name", ["sheet.csv", "train-00000-of-00001.parquet"])
def test_a_table_upload_is_stored_listed_checked_and_previewed(webui_client, tmp_path, name):
    """A spreadsheet's CSV export and a Hub dataset's Parquet file are datasets like any other: the
    browser's file picker and the server's upload check accept them, and the report and preview read
    their rows."""
    rows = [{"instruction": q, "output": a} for q, a in MEMORIZE_PAIRS]
    data = (write_parquet if name.endswith(".parquet") else write_table)(rows, tmp_path / name)
    dataset, registered, _ = webui_client.predict(handle_file(str(data)), "en", api_name="/upload_dataset")
    assert Path(dataset).name == name and Path(dataset).read_bytes() == data.read_bytes()
    assert dataset in [value for _, value in registered["choices"]]
    report, histogram, preview = webui_client.predict("en", dataset, "auto", "", None, "demo", "auto", 64,
                                                      api_name="/check_dataset")
    assert "4 usable rows of 4 read, 0 dropped" in report and histogram is not None
    assert MEMORIZE_PAIRS[0][1] in preview and "role-assistant" in preview


def test_the_check_reads_what_the_run_reads(webui_client, tmp_path):
    """A loaded config's ``dataset: docs-sample`` (configs/demo_cpu.yaml) and a folder of a Hub
    dataset's shards are checked as the run will read them: the check once said "docs-sample: file not
    found" while Start trained on it."""
    report, _, _ = webui_client.predict("en", "docs-sample", "auto", "", None, "demo", "auto", 256,
                                        api_name="/check_dataset")
    assert "file not found" not in report and "usable rows" in report and "sage-ft-docs.jsonl" in report
    shards = tmp_path / "hub-dataset" / "data"
    rows = [{"instruction": q, "output": a} for q, a in MEMORIZE_PAIRS]
    write_parquet(rows[:2], shards / "train-00000-of-00002.parquet")
    write_parquet(rows[2:], shards / "train-00001-of-00002.parquet")
    write_parquet(rows[:1], shards / "test-00000-of-00001.parquet")
    report, _, _ = webui_client.predict("en", str(shards.parent), "auto", "", None, "demo", "auto", 64,
                                        api_name="/check_dataset")
    assert "4 usable rows of 4 read, 0 dropped" in report and "train-00001-of-00002.parquet" in report


def test_eval_data_is_checked_as_the_run_reads_it(webui_client, tmp_path):
    """Data options' eval_dataset gets its own verdict under it: a Hub-style folder means its validation
    split; a folder without one, or a broken file, says what is wrong before Start is pressed."""
    check = lambda value: webui_client.predict("en", value, "auto", "", api_name="/check_eval_dataset")  # noqa: E731
    assert check("") == ""
    folder = tmp_path / "hub"
    write_jsonl(memorize_rows()[:2], folder / "data" / "validation-00000-of-00001.jsonl")
    write_jsonl(memorize_rows(), folder / "data" / "train-00000-of-00001.jsonl")
    report = check(str(folder))
    assert report.startswith("**✅ Eval data (eval_dataset) can be used") and "2 usable rows of 2 read" in report
    assert "the eval split, 1 file (validation-00000-of-00001.jsonl)" in report
    report = check(str(folder / "data" / "train-00000-of-00001.jsonl").replace("train-00000", "nothing"))
    assert report.startswith("**❌ Eval data (eval_dataset) cannot be used yet") and "file not found" in report
    write_jsonl(memorize_rows(), tmp_path / "train-only" / "train.jsonl")
    assert "no eval split in it" in check(str(tmp_path / "train-only"))


def test_the_suggested_reading_is_applied_with_one_click(webui, tmp_path):
    """A table under its own column names: the report's suggested format and column mapping come with
    a button (not an API output: asked in-process here, clicked in the browser test) that sets both."""
    from sage_ft.webui import train_tab

    data = write_table([{"Question": q, "Answer": a} for q, a in MEMORIZE_PAIRS], tmp_path / "qa.csv")
    check = lambda fmt, mapping: train_tab.check_dataset(webui.services, "en", str(data), fmt, mapping,  # noqa: E731
                                                         None, "demo", "auto", 64)
    report, _, _, reading, button = check("auto", "")
    assert "cannot tell the dataset format" in report and "instruction=Question,output=Answer" in report
    assert reading == ["alpaca", "instruction=Question,output=Answer"] and button["visible"] is True
    fmt, mapping = train_tab.apply_reading(reading)
    report, _, _, reading, button = check(fmt, mapping)
    assert "4 usable rows of 4 read" in report and reading is None and button["visible"] is False
    assert train_tab.apply_reading(None) == (gr.skip(), gr.skip())


def test_builtin_sample_and_dataset_list(webui_client, tmp_path, monkeypatch):
    cache_hub_dataset(tmp_path / "hf-cache", "tiny-org/alpaca-like")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    dataset, registered, _ = webui_client.predict("en", api_name="/use_sample")
    assert Path(dataset).name == "sage-ft-docs.jsonl" and Path(dataset).is_file()
    assert registered["value"] == dataset
    assert ["🤗 tiny-org/alpaca-like", "tiny-org/alpaca-like"] in registered["choices"]  # a cached Hub dataset


def test_save_then_load_round_trips_every_field(webui, webui_client):
    config = dict(TINY, dataset="a.jsonl", lora_rank=32, lora_alpha=8, use_rslora=True, optim="sgd",
                  max_samples=5, run_name="saved run")
    message, listed = webui_client.predict("cfg-one", "en", *form_args(**config), api_name="/save_config")
    saved = webui.services.configs_dir / "cfg-one.yaml"
    assert saved.is_file() and listed["value"] == str(saved) and "Config saved" in message
    *values, message = webui_client.predict(str(saved), "en", api_name="/load_config")
    assert values == form_args(**config)
    assert "Config loaded" in message


def test_a_saved_config_goes_to_the_data_home_and_never_over_a_shipped_example(webui):
    """Saving "demo_cpu" wrote over the project's commented configs/demo_cpu.yaml (in the source
    tree, or site-packages). Saved configs now live in the data home; the shipped ones are listed as
    examples to load, and models.yaml (the model list, not a run config) is not offered."""
    from sage_ft.webui import train_tab
    from sage_ft.webui.services import AppServices

    services = AppServices(tasks=webui.services.tasks)  # the app's defaults, as `python webui.py` has them
    shipped = services.examples_dir / "demo_cpu.yaml"
    before = shipped.read_bytes()
    message, listed = train_tab.save_config(services, "demo_cpu", "en", *form_args(**TINY, dataset="a.jsonl"))
    saved = paths.home() / "configs" / "demo_cpu.yaml"
    try:
        assert shipped.read_bytes() == before and saved.is_file() and listed["value"] == str(saved)
        assert TrainConfig.from_yaml(saved)[0].max_steps == TINY["max_steps"]
        choices = services.config_choices()
        assert ("demo_cpu.yaml", str(saved)) in choices and ("demo_cpu.yaml (example)", str(shipped)) in choices
        assert not any(path.endswith("models.yaml") for _, path in choices)
    finally:
        saved.unlink(missing_ok=True)


def test_save_refuses_a_name_with_folders(webui, webui_client):
    message, _ = webui_client.predict("../../evil", "en", *form_args(), api_name="/save_config")
    assert "no folders" in message
    assert not (webui.services.configs_dir.parent.parent / "evil.yaml").exists()


def test_llamafactory_yaml_fills_the_form_and_lists_unknown_keys(webui_client, tmp_path):
    lf = tmp_path / "llama3_lora_sft.yaml"
    lf.write_text(yaml.safe_dump({
        "model_name_or_path": "demo", "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 16, "lora_target": "all", "dataset": "identity", "template": "llama3", "cutoff_len": 2048,
        "learning_rate": 1.0e-4, "num_train_epochs": 3.0, "bf16": True, "flash_attn": "auto",
        "deepspeed": "ds_z3.json", "lerning_rate": 2.0e-4}), encoding="utf-8")
    *values, message, listed = webui_client.predict(handle_file(str(lf)), "en", api_name="/upload_config")
    assert Path(listed["value"]).parent.parent == paths.home() / "configs" / "uploads"
    assert Path(listed["value"]).name == "llama3_lora_sft.yaml"
    assert _value(values, "lora_rank") == 16 and _value(values, "template") == "llama3"
    assert _value(values, "precision") == "bf16" and _value(values, "cutoff_len") == 2048
    assert "deepspeed" in message and "flash_attn" in message
    assert "lerning_rate (did you mean learning_rate?)" in message  # a typo is named with the key it meant


def test_presets_and_language_switch(webui_client):
    *values, message = webui_client.predict("code", "en", *form_args(lora_rank=4), api_name="/apply_preset")
    assert _value(values, "cutoff_len") == 2048 and _value(values, "lora_rank") == 16
    assert "code" in message
    updates = webui_client.predict("zh", api_name="/set_lang")
    flat = str(updates)
    # Buttons and tabs are not API outputs; their relabelling is checked by the browser test.
    assert "### 数据集" in flat and "LoRA 秩 (lora_rank)" in flat and "SAGE 微调工作室" in flat


def test_add_local_model_refuses_a_folder_that_is_not_a_model(webui_client, tmp_path):
    _, help_text = webui_client.predict(str(tmp_path), "en", api_name="/add_model")
    assert str(tmp_path) in help_text and "⚠️" in help_text


def test_the_data_report_and_preview_follow_the_language(webui, webui_client, tmp_path):
    """Picking 中文 re-renders the data report, its histogram and the preview (they stayed in English:
    'Row 1', 'USER', the histogram's title), with the roles named in the language too."""
    path = tmp_path / "memorise.jsonl"
    write_jsonl(memorize_rows(), path)
    _, histogram, preview = webui_client.predict("zh", str(path), "auto", "", None, "demo", "auto", 64,
                                                 api_name="/check_dataset")
    assert "第 1 行" in preview and "用户" in preview and "助手" in preview and "Row" not in preview
    assert histogram is not None and i18n.t("train.histogram", "zh") in str(histogram)
    reg = webui.demo.registry
    report_id, lang_id = reg["train.data_report"]._id, reg["top.lang"]._id
    rechecks = [f for f in webui.demo.fns.values() if (lang_id, "change") in [tuple(t) for t in f.targets]
                and report_id in [c._id for c in f.outputs]]
    assert len(rechecks) == 1 and rechecks[0].trigger_mode == "always_last"


def test_a_relative_output_dir_goes_under_the_data_homes_runs(webui, webui_client, tmp_path):
    """A LLaMA-Factory file's `output_dir: saves/…` started from the browser wrote into the app's working
    folder (the source tree); it goes under runs/, and the command preview says so."""
    data = write_jsonl(memorize_rows(), tmp_path / "rel.jsonl")
    wanted = paths.runs_dir() / "saves" / "lf-run"
    command, text = webui_client.predict("en", *form_args(dataset=str(data), output_dir="saves/lf-run"),
                                         api_name="/preview")
    assert f"output_dir={wanted}" in command and yaml.safe_load(text)["output_dir"] == str(wanted)
    task_id, message, _ = webui_client.predict("en", *form_args(dataset=str(data), output_dir="saves/lf-run", **TINY),
                                               api_name="/start")
    assert Path(webui.services.tasks.task(int(task_id)).output_dir) == wanted, message
    webui.services.tasks.cancel(int(task_id))
