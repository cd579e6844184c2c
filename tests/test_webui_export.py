"""Export tab handlers through the real HTTP API (gradio_client): merge + verify + GGUF + zip of a really
trained run, the result listed as [merged] and served (in-process transformers backend), cancel, and
the refusals (target exists, bad target name, no source, unsupported GGUF architecture)."""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from sage_ft import paths
from sage_ft.models.registry import list_models
from tests.fixtures_training import MEMORIZE_QA
from tests.fixtures_webui import start_webui

pytestmark = pytest.mark.slow  # trains the session's trained_run when run alone

OPTIONS = ("auto", "2GB")  # dtype, shard size


@pytest.fixture(scope="module")
def export_app(tmp_path_factory, demo_model):
    from sage_ft.serving import ServerManager

    manager = ServerManager("demo", backend="transformers", adopt=False)
    app = start_webui(tmp_path_factory.mktemp("webui_export"), start_worker=False)
    app.services.server, app.services.llm_disabled = manager, False
    yield app
    app.close()
    manager.close()


@pytest.fixture(scope="module")
def client(export_app):
    return export_app.client()


@pytest.fixture(scope="module")
def run_in_home(trained_run) -> Path:
    """The session's trained run, copied under the data home's runs/ (where finished runs live)."""
    target = paths.runs_dir() / "memorize-export"
    if not target.exists():
        shutil.copytree(trained_run, target)
    return target


def _export(client, source, target="", overwrite=False, verify=True, gguf="none", make_zip=False):
    return client.predict(str(source), *OPTIONS, target, overwrite, verify, gguf, make_zip, "en",
                          api_name="/export_start")


def test_sources_list_runs_and_their_checkpoints(client, run_in_home):
    update, progress, result, _ = client.predict("en", None, api_name="/export_sources")
    values = [value for _, value in update["choices"]]
    assert str(run_in_home / "lora") in values and str(run_in_home / "checkpoint-30") in values
    assert all("[base" not in label for label, _ in update["choices"])
    assert update["value"] == values[0]  # the newest run, picked for the user; a pick is kept:
    assert client.predict("en", values[1], api_name="/export_sources")[0]["value"] == values[1]
    assert "No export running" in progress and result == ""


def test_export_merges_verifies_writes_gguf_and_zip_and_is_listed_and_servable(client, run_in_home):
    progress, result, download = _export(client, run_in_home / "lora", "ui-merged", gguf="q8_0", make_zip=True)
    out = paths.exports_dir() / "ui-merged"
    assert 'data-state="completed"' in progress and "100%" in progress
    assert result.startswith("✅") and str(out) in result, result
    assert "Merged model vs base + adapter: match" in result and "GGUF vs merged model: match" in result
    assert (out / "config.json").is_file() and (out / "gguf" / "ui-merged-q8_0.gguf").is_file()
    assert json.loads((out / "sage_ft_export.json").read_text())["verify"]["ok"] is True
    with zipfile.ZipFile(download["value"]) as archive:
        names = archive.namelist()
    assert "ui-merged/config.json" in names and "ui-merged/gguf/ui-merged-q8_0.gguf" in names

    entry = next(e for e in list_models() if e.path == str(out))
    assert entry.kind == "merged" and entry.label == "ui-merged [finetuned · merged]"
    labels = [label for label, _ in client.predict("en", None, None, api_name="/chat_models")[0]["choices"]]
    assert "ui-merged [finetuned · merged]" in labels

    status, _, banner, _ = client.predict(str(out), "en", api_name="/chat_switch")
    assert status.startswith("✅") and "[merged]" in banner
    question, answer = MEMORIZE_QA[0]
    history, _ = client.predict(question, [], "", 0.0, 1.0, 16, "en", api_name="/chat_send")
    assert answer.split()[-1].rstrip(".") in history[-1]["content"][0]["text"]  # "pineapple"


def test_refusals_are_clear_and_leave_nothing_behind(client, run_in_home, tmp_path):
    before = sorted(p.name for p in paths.exports_dir().iterdir())
    _, result, _ = _export(client, "", "x")
    assert result.startswith("❌") and "Pick a fine-tuned run" in result
    _, result, _ = _export(client, run_in_home / "lora", "../outside")
    assert result.startswith("❌") and "'../outside' is not allowed" in result
    _, result, _ = _export(client, run_in_home / "lora", "a" * 300)  # refused for its length, not its letters
    assert result.startswith("❌") and "300 characters long; use at most 100" in result and "aaa" not in result
    _, result, _ = _export(client, tmp_path / "nothing-here")
    assert result.startswith("❌") and "does not exist" in result
    (paths.exports_dir() / "taken").mkdir()
    (paths.exports_dir() / "taken" / "notes.txt").write_text("mine")
    progress, result, _ = _export(client, run_in_home / "lora", "taken")
    assert result.startswith("❌") and "already exists" in result and 'data-state="failed"' in progress
    _, result, _ = _export(client, run_in_home / "lora", "taken", overwrite=True)
    assert result.startswith("❌") and "not a sage-ft export" in result
    assert (paths.exports_dir() / "taken" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in paths.exports_dir().iterdir()) == sorted([*before, "taken"])


def test_gguf_of_an_unsupported_architecture_is_refused_before_merging(client, run_in_home, demo_model, tmp_path):
    base = tmp_path / "mistral-shaped"
    shutil.copytree(demo_model, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    run = tmp_path / "odd-run"
    shutil.copytree(run_in_home / "lora", run / "lora")
    meta = json.loads((run_in_home / "finetune_meta.json").read_text())
    (run / "finetune_meta.json").write_text(json.dumps({**meta, "base_model_path": str(base)}))
    progress, result, _ = _export(client, run, "odd-gguf", gguf="f16")
    assert result.startswith("❌") and "does not support architecture MistralForCausalLM" in result
    assert "No export running" in progress and not (paths.exports_dir() / "odd-gguf").exists()


def test_cancel_stops_the_export_and_leaves_nothing(client, run_in_home):
    job = client.submit(str(run_in_home / "checkpoint-30"), *OPTIONS, "cancelled-one", False, True, "none", False,
                        "en", api_name="/export_start")
    while not job.done() and not any('data-state="running"' in str(o[0]) for o in job.outputs()):
        time.sleep(0.02)
    assert "Cancel requested" in client.predict("en", api_name="/export_cancel")
    progress, result, _ = job.result(timeout=120)
    assert 'data-state="cancelled"' in progress and result.startswith("⏹ Export cancelled")
    assert not any(p.name.startswith(("cancelled-one", ".cancelled-one")) for p in paths.exports_dir().iterdir())
    assert "No export is running" in client.predict("en", api_name="/export_cancel")
