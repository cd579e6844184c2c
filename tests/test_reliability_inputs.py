"""Bad input, as a user sends it: through the real web API (gradio_client against the launched app)
or the one core call behind it. Each case asserts the specific message (what, where, how to fix),
that nothing was queued or written (task list and runs folder unchanged), and that the app still
answers afterwards. The rows of ``docs/reliability.md`` point here and to the areas' own tests.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import handle_file

from sage_ft import paths
from sage_ft.config import ConfigError, TrainConfig
from sage_ft.tasks import TaskManager, TaskRefused, TaskStatus
from sage_ft.tasks.store import StoreUnavailable
from sage_ft.training import FineTuneRun
from tests.fixtures_data import memorize_rows, write_jsonl, write_parquet
from tests.fixtures_tasks import tiny_task_config
from tests.fixtures_training import training_config
from tests.fixtures_webui import form_args, free_port, start_webui, stop_app_process

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024**2


# ------------------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def app(demo_model, tmp_path_factory):
    """A local app without a training worker: ``create`` validates fully but nothing ever runs."""
    web = start_webui(tmp_path_factory.mktemp("reliability_inputs"), start_worker=False)
    yield web
    web.close()


@pytest.fixture(scope="module")
def client(app):
    return app.client()


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    return write_jsonl(memorize_rows() * 2, tmp_path_factory.mktemp("good") / "good.jsonl")


def _run_dirs() -> set[str]:
    return {p.name for p in paths.runs_dir().iterdir()} if paths.runs_dir().exists() else set()


def _still_answers(client) -> None:
    command, _ = client.predict("en", *form_args(dataset="d.jsonl"), api_name="/preview")
    assert command.startswith("sage-ft train ")


def start_refused(app, client, *needles: str, **overrides) -> str:
    """Press Start with ``overrides``; assert it is refused naming ``needles`` and nothing was queued."""
    tasks_before, runs_before = [t.id for t in app.services.tasks.list()], _run_dirs()
    task_id, message, _ = client.predict("en", *form_args(**overrides), api_name="/start")
    assert not isinstance(task_id, int), f"queued task {task_id}: {message}"
    message = html.unescape(message)
    for needle in needles:
        assert needle in message, (needle, message)
    assert "Traceback" not in message
    assert [t.id for t in app.services.tasks.list()] == tasks_before and _run_dirs() == runs_before
    _still_answers(client)
    return message


def tiny(**overrides):
    return {"max_steps": 2, "cutoff_len": 64, "per_device_train_batch_size": 2, "packing": False, **overrides}


def _copy_model(demo_model: Path, dest: Path) -> Path:
    if not dest.exists():
        shutil.copytree(demo_model, dest)
    return dest


def _model_without_chat_template(demo_model: Path, dest: Path) -> Path:
    model = _copy_model(demo_model, dest)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    for extra in model.glob("chat_template*"):
        extra.unlink()
    return model


# ============================================================================== datasets (through /start)
def test_dataset_invalid_json_names_file_line_and_column(app, client, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text(json.dumps(memorize_rows()[0]) + "\n" + '{"messages": [ oops\n', encoding="utf-8")
    start_refused(app, client, "broken.jsonl", "line 2", "invalid JSON", dataset=str(bad), **tiny())


def test_dataset_in_no_known_format_says_what_it_saw(app, client, tmp_path):
    odd = write_jsonl([{"question": "q", "answer": "a"}], tmp_path / "odd.jsonl")
    message = start_refused(app, client, "odd.jsonl", dataset=str(odd), **tiny())
    assert "question" in message and "column-mapping" in message.replace("_", "-")


def test_dataset_rows_with_missing_or_empty_fields_only(app, client, tmp_path):
    rows = [{"instruction": "q", "output": ""}, {"instruction": "q"}]
    useless = write_jsonl(rows, tmp_path / "useless.jsonl")
    start_refused(app, client, "useless.jsonl", "0 usable rows", "empty response", "missing field",
                  dataset=str(useless), **tiny())


def test_dataset_not_utf8_names_the_byte(app, client, tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"instruction": "caf\u00e9", "output": "a"}\n'.encode("latin-1"))
    start_refused(app, client, "latin1.jsonl", "line 1", "not UTF-8", "re-save the file as UTF-8",
                  dataset=str(latin), **tiny())


def test_dataset_empty_file(app, client, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    start_refused(app, client, "empty.jsonl: the file has no rows", dataset=str(empty), **tiny())


def test_dataset_of_1_gib_is_refused_before_reading(app, client, tmp_path):
    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as fh:  # a sparse 1 GiB file: nothing is written to disk, nothing is read
        fh.truncate(1024 * MiB)
    start_refused(app, client, "huge.jsonl", "limit", "SAGE_FT_MAX_DATASET_BYTES", dataset=str(huge), **tiny())


def test_dataset_binary_renamed_jsonl(app, client, tmp_path):
    blob = tmp_path / "photo.jsonl"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    start_refused(app, client, "photo.jsonl", "binary", dataset=str(blob), **tiny())


def test_dataset_parquet_cut_short(app, client, tmp_path):
    """A Hub download that stopped half-way: the file starts as Parquet but cannot be read."""
    whole = write_parquet(memorize_rows() * 50, tmp_path / "whole.parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    start_refused(app, client, "cut.parquet: not a readable Parquet file", "to_parquet", dataset=str(cut), **tiny())


def test_dataset_zip_bomb_style_single_huge_line(app, client, tmp_path):
    bomb = tmp_path / "bomb.jsonl"
    with bomb.open("wb") as fh:
        fh.write(b'{"instruction": "' + b"a" * (9 * MiB) + b'", "output": "x"}\n')
    start_refused(app, client, "bomb.jsonl: line 1 is longer than 8.0 MiB", "Split it", dataset=str(bomb), **tiny())


def test_dataset_that_does_not_exist_or_is_a_folder(app, client, tmp_path):
    start_refused(app, client, str(tmp_path / "nowhere.jsonl"), dataset=str(tmp_path / "nowhere.jsonl"), **tiny())
    start_refused(app, client, str(tmp_path), dataset=str(tmp_path), **tiny())


def test_dataset_with_a_wrong_extension(app, client, tmp_path):
    sheet = tmp_path / "table.xlsx"
    sheet.write_text("instruction,output\nq,a\n")
    start_refused(app, client, "table.xlsx", "save the sheet as CSV UTF-8", dataset=str(sheet), **tiny())


def test_one_bad_file_among_good_ones_refuses_the_whole_start(app, client, good_data, tmp_path):
    bad = tmp_path / "second.jsonl"
    bad.write_text("{not json}\n")
    start_refused(app, client, "second.jsonl", "line 1", dataset=f"{good_data},{bad}", **tiny())


# ============================================================================== configs
def test_zero_negative_and_non_numeric_values_name_each_key(app, client, good_data):
    message = start_refused(app, client, "learning_rate: 0 is too small; it must be > 0",
                            "per_device_train_batch_size: 0 is too small; it must be >= 1",
                            dataset=str(good_data), learning_rate=0, per_device_train_batch_size=0)
    assert message.startswith("**The settings have problems:**")
    start_refused(app, client, "learning_rate: -0.001 is too small", dataset=str(good_data), learning_rate=-1e-3)
    start_refused(app, client, "max_samples: 'lots' is not a whole number", dataset=str(good_data),
                  max_samples="lots")
    start_refused(app, client, "max_steps: 0 would train nothing", dataset=str(good_data), max_steps=0)


def test_lora_rank_above_any_servable_rank_is_refused_with_the_limit(app, client, good_data):
    start_refused(app, client, "lora_rank: 2048 is too large; it must be <= 1024", dataset=str(good_data),
                  lora_rank=2048)


def test_unknown_key_is_a_warning_and_a_non_sft_stage_an_error(tmp_path):
    config = tmp_path / "lf.yaml"
    config.write_text("model_name_or_path: demo\nstage: sft\nlora_rank: 8\nflash_attn: fa2\n")
    loaded, unknown = TrainConfig.from_yaml(config)
    assert unknown == ["flash_attn"] and loaded.lora_rank == 8
    config.write_text("model_name_or_path: demo\nstage: dpo\n")
    with pytest.raises(ConfigError, match="stage: 'dpo' is not supported; sage-ft runs supervised fine-tuning"):
        TrainConfig.from_yaml(config)


def test_output_dir_that_is_a_file_is_refused(app, client, good_data, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    start_refused(app, client, f"output_dir: {a_file} is a file; give a folder", dataset=str(good_data),
                  output_dir=str(a_file), **tiny())
    assert a_file.read_text() == "mine"


def test_output_dir_that_exists_and_is_not_empty_is_refused(app, client, good_data, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    start_refused(app, client, "exists and is not empty", "overwrite_output_dir", dataset=str(good_data),
                  output_dir=str(used), **tiny())
    assert [p.name for p in used.iterdir()] == ["keep.txt"]


def test_output_dir_that_cannot_be_created_is_refused_at_start(app, client, good_data, tmp_path):
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")  # root ignores permissions, so 'not writable' is a folder below a regular file
    start_refused(app, client, "output_dir", str(a_file), dataset=str(good_data),
                  output_dir=str(a_file / "run"), **tiny())


def test_output_dir_that_cannot_be_created_fails_the_run_naming_it(good_data, tmp_path):
    """The run's own check, for a config that reaches it without Start (e.g. FineTuneRun directly)."""
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    with pytest.raises(OSError) as info:
        FineTuneRun(training_config(good_data, a_file / "run", max_steps=1))
    assert str(a_file / "run") in str(info.value)
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("field", ["model_name_or_path", "output_dir"])
def test_megabyte_path_in_model_or_output_dir_is_refused_naming_the_field(app, client, good_data, field):
    start_refused(app, client, f"{field}:", dataset=str(good_data), **{field: "p" * MiB})


def test_cutoff_len_above_the_models_context_is_refused_with_the_limit(app, client, good_data):
    start_refused(app, client, "cutoff_len", "2048", dataset=str(good_data), cutoff_len=100_000)


def test_lora_target_matching_no_module_is_refused_at_start(app, client, good_data):
    start_refused(app, client, "attn_qkv", "q_proj", dataset=str(good_data), lora_target="attn_qkv")


# ============================================================================== models
def test_model_directory_missing(app, client, good_data, tmp_path):
    start_refused(app, client, f"model directory {tmp_path / 'gone'} does not exist", "'demo'",
                  dataset=str(good_data), model_name_or_path=str(tmp_path / "gone"))


def test_model_without_weights(app, client, good_data, demo_model, tmp_path):
    broken = _copy_model(demo_model, tmp_path / "no-weights")
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    start_refused(app, client, str(broken), "missing weights", "save_pretrained", dataset=str(good_data),
                  model_name_or_path=str(broken))


def test_model_folder_without_config(app, client, good_data, tmp_path):
    empty = tmp_path / "just-a-folder"
    empty.mkdir()
    (empty / "README.md").write_text("hi")
    start_refused(app, client, str(empty), "config.json", dataset=str(good_data), model_name_or_path=str(empty))


def test_tokenizer_without_chat_template_fails_the_run_naming_the_fix(good_data, demo_model, tmp_path):
    model = _model_without_chat_template(demo_model, tmp_path / "no-template")
    result = FineTuneRun(training_config(good_data, tmp_path / "run", model_name_or_path=str(model),
                                         max_steps=1)).run()
    assert result.status == "failed"
    assert "has no chat template" in result.error and "chatml" in result.error and "template" in result.error
    assert not (tmp_path / "run" / "lora").exists()
    fixed = FineTuneRun(training_config(good_data, tmp_path / "run2", model_name_or_path=str(model),
                                        max_steps=1, template="chatml")).run()
    assert fixed.status == "completed", fixed.error


def test_tokenizer_without_chat_template_is_refused_at_start(app, client, good_data, demo_model, tmp_path):
    model = _model_without_chat_template(demo_model, tmp_path / "no-template")
    start_refused(app, client, "chat template", "template: chatml", dataset=str(good_data),
                  model_name_or_path=str(model))


def test_check_dataset_with_a_template_less_model_explains_the_missing_token_stats(client, good_data, demo_model,
                                                                                 tmp_path):
    model = _model_without_chat_template(demo_model, tmp_path / "no-template")
    report, histogram, _ = client.predict("en", str(good_data), "auto", "", None, str(model), "auto", 64,
                                          api_name="/check_dataset")
    assert "8 usable rows" in report and "no chat template" in report and histogram is None


# ============================================================================== UI / API arguments
def test_empty_fields_everywhere(app, client):
    start_refused(app, client, "No dataset chosen")
    start_refused(app, client, "model_name_or_path: empty", dataset="x.jsonl", model_name_or_path="")
    start_refused(app, client, "lora_target: empty", dataset="x.jsonl", lora_target="")
    report, histogram, _ = client.predict("en", "", "auto", "", None, "demo", "auto", 64, api_name="/check_dataset")
    assert "dataset" in report.lower() and histogram is None
    message, _ = client.predict("", "en", *form_args(), api_name="/save_config")
    assert "config name ''" in html.unescape(message) and "e.g. my-chat-run" in message
    _, help_text = client.predict("", "en", api_name="/add_model")
    assert help_text
    _, message, _ = client.predict(None, "en", api_name="/cancel")
    assert "task" in message.lower()
    _still_answers(client)


def test_unknown_task_ids_are_named(app, client):
    for action in ("/cancel", "/resume"):
        _, message, _ = client.predict(4242, "en", api_name=action)
        assert "There is no task #4242 (deleted?)" in message
    _still_answers(client)


def test_megabyte_text_fields_are_refused_or_bounded(app, client, good_data):
    huge = "x" * MiB
    message = start_refused(app, client, "not a usable file path (File name too long)", dataset=huge)
    assert len(message) < 4000  # the message does not echo 1 MB back
    message = start_refused(app, client, "column_mapping", dataset=str(good_data), column_mapping=huge)
    assert len(message) < 4000
    message, _ = client.predict(huge, "en", *form_args(), api_name="/save_config")
    assert "use letters, digits" in message and len(message) < 4000  # the message does not echo 1 MB back
    report, _, _ = client.predict("en", huge, "auto", "", None, "demo", "auto", 64, api_name="/check_dataset")
    assert "The data cannot be used" in report and "File name too long" in report and len(report) < 4000
    _still_answers(client)


def test_megabyte_run_name_is_accepted_but_bounded(app, client, good_data):
    task_id, message, _ = client.predict("en", *form_args(dataset=str(good_data), run_name="n" * MiB, **tiny()),
                                         api_name="/start")
    assert isinstance(task_id, int), message
    try:
        task = app.services.tasks.task(task_id)
        assert len(task.name) <= 200 and len(Path(task.output_dir).name) < 80
        assert len(message) < 4000
    finally:
        app.services.tasks.cancel(task_id)


def test_data_report_shows_what_to_fix_without_a_click(client, good_data, tmp_path):
    """A file that cannot be used opens its report on the problem (file, line, what to do); a usable
    file's report stays folded."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text(good_data.read_text().splitlines()[0] + '\n{"instruction": "a", "output": \n')
    report, _, _ = client.predict("en", str(broken), "auto", "", None, "demo", "auto", 64, api_name="/check_dataset")
    assert "The data cannot be used" in report and "<details open>" in report
    assert "line 2" in report.split("<details open>")[1] and "invalid JSON" in report
    report, _, _ = client.predict("en", str(good_data), "auto", "", None, "demo", "auto", 64, api_name="/check_dataset")
    assert "can be used" in report and "<details>" in report and "<details open>" not in report


def test_unicode_and_emoji_names_and_paths(app, client, tmp_path):
    data = write_jsonl(memorize_rows() * 2, tmp_path / "données 🚀 数据.jsonl")
    report, _, _ = client.predict("en", str(data), "auto", "", None, "demo", "auto", 64, api_name="/check_dataset")
    assert "8 usable rows" in report
    task_id, message, _ = client.predict("en", *form_args(dataset=str(data), run_name="模型 🚀 run", **tiny()),
                                         api_name="/start")
    assert isinstance(task_id, int), message
    try:
        task = app.services.tasks.task(task_id)
        assert task.name == "模型 🚀 run" and task.status is TaskStatus.QUEUED
        assert Path(task.output_dir).name.isascii()  # the folder name is a safe slug
        assert yaml_dataset(task) == str(data.resolve())
    finally:
        app.services.tasks.cancel(task_id)
    message, _ = client.predict("配置🚀", "en", *form_args(), api_name="/save_config")
    assert "Config saved" in message  # a name in any script is kept; only folders and control characters are refused


def yaml_dataset(task) -> str:
    import yaml

    return yaml.safe_load(task.config_yaml)["dataset"]


def test_path_traversal_strings(app, client, tmp_path):
    message, _ = client.predict("../../../tmp/evil", "en", *form_args(), api_name="/save_config")
    assert "no folders" in message and not Path("/tmp/evil.yaml").exists()
    start_refused(app, client, ".json", dataset="../../../../etc/passwd", **tiny())
    evil = tmp_path / "..%2f..%2fevil;rm -rf ~.jsonl"
    write_jsonl(memorize_rows(), evil)
    stored, _, _ = client.predict(handle_file(str(evil)), "en", api_name="/upload_dataset")
    assert Path(stored).parent.parent == paths.datasets_dir() / "uploads" and ";" not in Path(stored).name
    _still_answers(client)


# ============================================================================== the app itself
def test_webui_on_a_taken_port_says_so_and_exits(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "webui.py", "--no-llm", "--port", str(port), "--data-home",
                              str(tmp_path / "home")], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "--port" in out.stderr
    assert "Traceback" not in out.stderr


def test_webui_that_cannot_start_leaves_queued_runs_queued(tmp_path, task_dataset):
    """An app that fails to start (here: its port is taken) must not take the queue down with it."""
    home = tmp_path / "home"
    with TaskManager(home / "sage_ft.db", start_worker=False) as manager:
        queued = manager.create(tiny_task_config(task_dataset), name="waits")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = subprocess.run([sys.executable, "webui.py", "--no-llm", "--port", str(taken.getsockname()[1]),
                              "--data-home", str(home)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 1 and "cannot listen on" in out.stderr
    with TaskManager(home / "sage_ft.db", start_worker=False) as manager:
        task = manager.task(queued.id)
    assert task.status is TaskStatus.QUEUED and task.started_at is None, task


def test_webui_behind_an_http_proxy_still_reaches_itself(tmp_path):
    """HTTP(S)_PROXY/ALL_PROXY set (corporate machines): loopback must bypass it, or Gradio refuses to
    start ("localhost is not accessible") and the chat server's checks and API key go to the proxy."""
    with socket.socket() as dead:  # a proxy address where nothing answers
        dead.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(HTTP_PROXY=proxy, HTTPS_PROXY=proxy, ALL_PROXY=proxy, http_proxy=proxy, https_proxy=proxy)
    app = subprocess.Popen([sys.executable, "webui.py", "--no-llm", "--port", str(port), "--data-home",
                            str(tmp_path / "home")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and app.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        time.sleep(3)  # past Gradio's own start-up check, which is what failed behind a proxy
        assert app.poll() is None, app.stderr.read()[-2000:]
        import httpx

        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30, trust_env=False)
        assert page.status_code == 200 and "SAGE" in page.text
    finally:
        stop_app_process(app)


def test_webui_with_an_unusable_data_home_says_so_and_exits(tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    out = subprocess.run([sys.executable, "webui.py", "--no-llm", "--port", str(free_port()), "--data-home",
                          str(blocker / "home")], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 1, out.stderr[-2000:]
    assert str(blocker / "home") in out.stderr and "SAGE_FT_HOME" in out.stderr
    assert "Traceback" not in out.stderr
    assert blocker.read_text() == "x"


def test_task_store_in_an_unusable_data_home_is_a_clear_error(tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    with pytest.raises(StoreUnavailable, match="set SAGE_FT_HOME to a writable folder"):
        TaskManager(blocker / "home" / "tasks.db", start_worker=False)
    env = {**os.environ, "SAGE_FT_HOME": str(blocker / "home")}
    out = subprocess.run([sys.executable, "-m", "sage_ft", "tasks", "list"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "SAGE_FT_HOME" in out.stderr and "Traceback" not in out.stderr


def test_core_create_refuses_the_same_inputs_without_the_ui(idle_manager, task_dataset, tmp_path):
    """The CLI and scripts go through the same check (``TaskManager.create``)."""
    with pytest.raises(TaskRefused) as info:
        idle_manager.create(tiny_task_config(task_dataset, output_dir=str(task_dataset)))
    assert any("is a file; give a folder" in p for p in info.value.problems)
    assert idle_manager.list() == []


# ============================================================================== faults inside the app
@pytest.mark.slow
def test_failing_runs_in_the_app_keep_the_queue_and_the_page_alive(demo_model, tmp_path):
    """A NaN loss (raised inside a training step) fails its task with the reason and a log tail; the next
    task still runs although its dataset file is deleted while it runs (the data is already loaded);
    a browser that goes away mid-run changes nothing and a new one re-attaches to the same task."""
    from safetensors.torch import load_file, save_file

    bad = _copy_model(demo_model, tmp_path / "nan-model")
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.0.mlp.down_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    data = write_jsonl(memorize_rows() * 2, tmp_path / "deleted-mid-run.jsonl")
    web = start_webui(tmp_path / "app", start_worker=True)
    try:
        first = web.client()
        nan_id, _, _ = first.predict("en", *form_args(dataset=str(data), model_name_or_path=str(bad),
                                                      **tiny(max_steps=3)), api_name="/start")
        good_id, _, _ = first.predict("en", *form_args(dataset=str(data), **tiny(max_steps=6, save_steps=2)),
                                      api_name="/start")
        first.close()  # the browser goes away with both tasks queued
        failed = web.services.tasks.wait(nan_id, timeout=240)
        assert failed.status is TaskStatus.FAILED and failed.icon == "❌"
        assert "nan" in failed.error.lower() and "learning_rate" in failed.error
        assert web.services.tasks.get(nan_id).log_tail
        deadline = time.monotonic() + 240
        while web.services.tasks.task(good_id).step < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        data.unlink()
        done = web.services.tasks.wait(good_id, timeout=240)
        assert (done.status, done.step) == (TaskStatus.COMPLETED, 6), done.error
        second = web.client()  # a new browser: the page re-attaches to the newest task
        assert "completed" in second.predict(good_id, "en", api_name="/train_progress")
        _still_answers(second)
    finally:
        web.close()
