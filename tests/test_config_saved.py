"""The Train tab's saved configs: what is listed, uploads that fail or repeat, names in any script and
saves over an existing config. The handlers run on real files in the data home; one test goes through
the real app's API, where the Overwrite tick is an optional last argument."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from gradio_client import handle_file

from sage_ft import paths
from sage_ft.config import TrainConfig
from sage_ft.webui import train_tab
from sage_ft.webui.services import AppServices
from tests.fixtures_webui import form_args, start_webui


@pytest.fixture
def services(tmp_path: Path):
    from sage_ft.tasks import TaskManager

    tasks = TaskManager(tmp_path / "tasks.db", start_worker=False)
    yield AppServices(tasks=tasks, configs_dir=tmp_path / "configs")
    tasks.shutdown()


def _upload(services: AppServices, path: Path) -> tuple[list, str, dict]:
    *values, message, listed = train_tab.upload_config(services, str(path), "en")
    return values, message, listed


def _uploads_named(name: str) -> list[Path]:
    return sorted((paths.home() / "configs" / "uploads").glob(f"*/{name}"))


def test_an_upload_that_fails_to_load_is_not_kept_and_shows_every_problem(services, tmp_path):
    """A YAML that failed to load was kept and listed as a saved config; its message showed only the
    first of its problems."""
    bad = tmp_path / "four-mistakes.yaml"
    bad.write_text("learning_rate: abc\nnum_train_epochs: -1\nlora_rank: 0\ntemplate: vicuna\n")
    _, message, listed = _upload(services, bad)
    message = html.unescape(message)
    for problem in ("learning_rate: 'abc' is not a number", "num_train_epochs: -1 is too small",
                    "lora_rank: 0 is too small", "template: 'vicuna' is not allowed"):
        assert problem in message, message
    assert "value" not in listed and not any("four-mistakes" in label for label, _ in listed["choices"])
    assert _uploads_named("four-mistakes.yaml") == []  # not left on disk either


def test_the_same_upload_twice_is_listed_once_and_tagged(services, tmp_path):
    good = tmp_path / "twice-uploaded.yaml"
    good.write_text("model_name_or_path: demo\nlora_rank: 16\n")
    values, message, first = _upload(services, good)
    assert values[TrainConfig.field_names().index("lora_rank")] == 16 and "Config loaded" in message
    _, _, second = _upload(services, good)
    assert second["value"] == first["value"]  # the earlier upload, not a second copy
    listed = [label for label, _ in services.config_choices() if label.startswith("twice-uploaded.yaml")]
    assert listed == ["twice-uploaded.yaml (uploaded)"] and len(_uploads_named("twice-uploaded.yaml")) == 1
    good.write_text("model_name_or_path: demo\nlora_rank: 32\n")  # same name, other content: both listed
    _, _, third = _upload(services, good)
    assert third["value"] != first["value"]
    listed = [label for label, _ in services.config_choices() if label.startswith("twice-uploaded.yaml")]
    assert len(listed) == 2 and listed[0] == "twice-uploaded.yaml (uploaded)" and "(uploaded 20" in listed[1]


def test_save_over_an_existing_name_needs_the_overwrite_tick(services):
    message, listed = train_tab.save_config(services, "my-run", "en", *form_args(lora_rank=16))
    saved = services.configs_dir / "my-run.yaml"
    assert "Config saved" in message and listed["value"] == str(saved)
    message, listed = train_tab.save_config(services, "my-run", "en", *form_args(lora_rank=32))
    assert "exists already" in html.unescape(message) and "Overwrite" in html.unescape(message)
    assert listed is not None and TrainConfig.from_yaml(saved)[0].lora_rank == 16  # untouched
    message, _ = train_tab.save_config(services, "my-run", "en", *form_args(lora_rank=32), overwrite=True)
    assert "Config replaced" in message and TrainConfig.from_yaml(saved)[0].lora_rank == 32


def test_config_names_in_any_script_are_saved_and_only_unsafe_ones_refused(services):
    message, listed = train_tab.save_config(services, "中文配置 v2", "en", *form_args())
    assert "Config saved" in message and (services.configs_dir / "中文配置 v2.yaml").is_file()
    assert ("中文配置 v2.yaml", str(services.configs_dir / "中文配置 v2.yaml")) in services.config_choices()
    for bad in ("../evil", "a/b", "a\\b", ".hidden", "tab\there", "", "x" * 81):
        message, _ = train_tab.save_config(services, bad, "en", *form_args())
        assert "use letters, digits" in message and "no folders" in message, bad
    assert sorted(p.name for p in services.configs_dir.iterdir()) == ["中文配置 v2.yaml"]


def test_the_overwrite_tick_through_the_app_api(tmp_path):
    app = start_webui(tmp_path / "app", start_worker=False)
    try:
        client = app.client()
        message, _ = client.predict("api-run", "en", *form_args(lora_rank=16), api_name="/save_config")
        assert "Config saved" in message
        message, _ = client.predict("api-run", "en", *form_args(lora_rank=32), api_name="/save_config")
        assert "exists already" in html.unescape(message)
        message, _ = client.predict("api-run", "en", *form_args(lora_rank=32), True, api_name="/save_config")
        assert "Config replaced" in message
        assert TrainConfig.from_yaml(app.services.configs_dir / "api-run.yaml")[0].lora_rank == 32
        bad = tmp_path / "bad-upload.yaml"
        bad.write_text("lora_rank: zero\n")
        *_, message, listed = client.predict(handle_file(str(bad)), "en", api_name="/upload_config")
        assert "lora_rank" in message and not any("bad-upload" in str(c) for c in listed["choices"])
    finally:
        app.close()
